"""The Objaverse filter (paper Sec. 4.1: "following LGM, remove bad models with bad captions or
missing texture", about 80K objects remain).

Two ways, combinable: a published keep list (LGM's list: CSV rows ``glb-group,uid``) and rules
on the Objaverse annotations (Sketchfab metadata): no texture, face count and file size
bounds, words in name/tags/categories/captions that mark scenes or bad models. Every object
gets the first rule that rejects it, and each rule's count goes into a summary.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_pipeline.atomic import atomic_write_text

# Words that mark scenes, environments and non-objects (matched as whole words, lower case).
DEFAULT_BAD_WORDS = (
    "scene", "room", "interior", "landscape", "terrain", "city", "town", "street",
    "environment", "level", "map", "building", "house", "diorama", "panorama", "hdri",
    "pointcloud", "point cloud", "particles", "nsfw", "untitled", "test",
)


@dataclass
class FilterRules:
    """Rule thresholds; ``None`` disables a bound."""

    require_texture: bool = True
    min_faces: int | None = 100
    max_faces: int | None = 500_000
    min_bytes: int | None = 10_000
    max_bytes: int | None = 100 * 2**20
    max_animations: int | None = 0
    bad_words: tuple[str, ...] = DEFAULT_BAD_WORDS


@dataclass
class FilterSummary:
    """How many objects each rule removed, and how many were kept."""

    total: int = 0
    kept: int = 0
    removed: dict[str, int] = field(default_factory=dict)

    def count(self, reason: str, n: int = 1) -> None:
        if n:
            self.removed[reason] = self.removed.get(reason, 0) + n

    def __str__(self) -> str:
        lines = [f"objects considered: {self.total}", f"kept: {self.kept}"]
        lines += [f"  removed, {reason}: {n}" for reason, n in sorted(self.removed.items())]
        return "\n".join(lines)

    def save(self, path: str | Path) -> None:
        """Write the summary as JSON (atomically)."""
        atomic_write_text(path, json.dumps(asdict(self), indent=2, sort_keys=True))


def read_keep_list(path: str | Path) -> set[str]:
    """A published keep list: CSV rows ``glb-group,uid`` (or just ``uid``), '#' comments."""
    uids = set()
    with open(path, newline="") as handle:
        for line_number, row in enumerate(csv.reader(handle), 1):
            if not row or row[0].startswith("#"):
                continue
            uid = row[-1].strip()
            if not re.fullmatch(r"[0-9a-f]{32}", uid):
                if line_number == 1:
                    continue  # a header row
                raise ValueError(f"{path}:{line_number}: {uid!r} is not an Objaverse uid")
            uids.add(uid)
    return uids


def read_captions(path: str | Path) -> dict[str, str]:
    """Captions CSV (Cap3D's layout): rows ``uid,caption``."""
    with open(path, newline="") as handle:
        return {row[0]: row[1] for row in csv.reader(handle) if len(row) >= 2}


def _words_pattern(words) -> re.Pattern:
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


def reject_reason(annotation: dict | None, rules: FilterRules, caption: str | None = None,
                  pattern: re.Pattern | None = None) -> str | None:
    """The first rule an annotated object fails, or None if it passes.

    Args:
        annotation: the object's Objaverse annotation (``objaverse.load_annotations`` value).
        caption: an optional caption to check for bad words too.
    """
    if annotation is None:
        return "no annotation"
    glb = (annotation.get("archives") or {}).get("glb") or {}
    if rules.require_texture and not glb.get("textureCount"):
        return "no texture"
    faces = annotation.get("faceCount", glb.get("faceCount"))
    if faces is not None:
        if rules.min_faces is not None and faces < rules.min_faces:
            return "too few faces"
        if rules.max_faces is not None and faces > rules.max_faces:
            return "too many faces"
    size = glb.get("size")
    if size is not None:
        if rules.min_bytes is not None and size < rules.min_bytes:
            return "file too small"
        if rules.max_bytes is not None and size > rules.max_bytes:
            return "file too large"
    if rules.max_animations is not None and (annotation.get("animationCount") or 0) > rules.max_animations:
        return "animated"
    if rules.bad_words:
        pattern = pattern or _words_pattern(rules.bad_words)
        texts = [annotation.get("name") or ""]
        texts += [t.get("name", "") for t in annotation.get("tags") or []]
        texts += [c.get("name", "") for c in annotation.get("categories") or []]
        if pattern.search(" | ".join(texts)):
            return "bad words in name/tags"
        if caption and pattern.search(caption):
            return "bad words in caption"
    return None


def filter_objects(uids, annotations: dict, rules: FilterRules | None = None,
                   keep_list: set[str] | None = None, captions: dict[str, str] | None = None):
    """Decide every uid.

    Returns:
        ({uid: None if kept else reason}, FilterSummary)
    """
    rules = rules or FilterRules()
    pattern = _words_pattern(rules.bad_words) if rules.bad_words else None
    decisions, counts = {}, Counter()
    for uid in uids:
        if keep_list is not None and uid not in keep_list:
            reason = "not in the keep list"
        else:
            reason = reject_reason(annotations.get(uid), rules, (captions or {}).get(uid), pattern)
        decisions[uid] = reason
        counts[reason] += 1
    summary = FilterSummary(total=len(decisions), kept=counts.pop(None, 0))
    for reason, n in counts.items():
        summary.count(reason, n)
    return decisions, summary
