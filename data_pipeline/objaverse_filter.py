"""The Objaverse filter (paper Sec. 4.1: "following LGM, remove bad models with bad captions or
missing texture", about 80K objects remain).

Two ways, combinable: a published keep list (CSV rows ``glb-group,uid``; LGM's own list ships
with the project, :data:`LGM_LIST`) and rules on the Objaverse annotations (Sketchfab metadata):
no texture, face count and file size bounds, words in name/tags/categories/captions that mark
scenes or bad models. Every object gets the first rule that rejects it, and each rule's count
goes into a summary; with both a list and annotations, the summary also says how far the two
agree (kept by both, by the list only, by the rules only).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path


# LGM's keep list (MIT, see objaverse_lists/README.md): the paper's ~80K objects, package data.
LGM_LIST = resources.files("data_pipeline") / "objaverse_lists" / "lgm_kiuisobj_v1_merged_80K.csv"
# Objaverse 1.0 uids: 32 hex digits, and a few Sketchfab-style ids of 26-27 letters and digits.
OBJAVERSE_UID = re.compile(r"[0-9a-f]{32}|[0-9A-Za-z]{26,27}")
AGREEMENT_KEYS = ("kept by both", "kept by the list only", "kept by the rules only", "kept by neither")

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
    agreement: dict[str, int] | None = None  # keep list against rules, AGREEMENT_KEYS

    def count(self, reason: str, n: int = 1) -> None:
        if n:
            self.removed[reason] = self.removed.get(reason, 0) + n

    def __str__(self) -> str:
        lines = [f"objects considered: {self.total}", f"kept: {self.kept}"]
        lines += [f"  removed, {reason}: {n}" for reason, n in sorted(self.removed.items())]
        if self.agreement is not None:
            lines.append("keep list against the rules: " + ", ".join(
                f"{key} {self.agreement[key]}" for key in AGREEMENT_KEYS))
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def read_keep_list(path: str | Path) -> set[str]:
    """A published keep list: CSV rows ``glb-group,uid`` (or just ``uid``), '#' comments.

    Raises:
        ValueError naming the file and line of a row whose uid is not an Objaverse uid.
    """
    uids = set()
    with open(path, newline="") as handle:
        for line_number, row in enumerate(csv.reader(handle), 1):
            if not row or row[0].startswith("#"):
                continue
            uid = row[-1].strip()
            if not OBJAVERSE_UID.fullmatch(uid):
                if line_number == 1:
                    continue  # a header row
                raise ValueError(f"{path}:{line_number}: {uid!r} is not an Objaverse uid")
            uids.add(uid)
    return uids


def list_label(path: str | Path) -> str:
    """How a manifest names the list its objects came from: file name and content hash."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    return f"{Path(path).name} (sha256 {digest})"


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


def filter_objects(uids, annotations: dict | None, rules: FilterRules | None = None,
                   keep_list: set[str] | None = None, captions: dict[str, str] | None = None,
                   apply_rules: bool = True):
    """Decide every uid: outside ``keep_list`` (when given) -> "not in the keep list"; else, when
    ``apply_rules``, the first rule it fails; else kept.

    With a keep list and ``annotations`` the rules are evaluated on every uid, whichever
    decides, and the summary's ``agreement`` counts how the list and the rules agree.
    ``annotations=None`` (allowed only without ``apply_rules``) skips the rules entirely.

    Returns:
        ({uid: None if kept else reason}, FilterSummary)
    """
    if apply_rules and annotations is None:
        raise ValueError("the rules need the annotations")
    rules = rules or FilterRules()
    pattern = _words_pattern(rules.bad_words) if rules.bad_words else None
    decisions, counts, agreement = {}, Counter(), Counter()
    for uid in uids:
        rule = None
        if annotations is not None:
            rule = reject_reason(annotations.get(uid), rules, (captions or {}).get(uid), pattern)
        listed = keep_list is None or uid in keep_list
        if not listed:
            reason = "not in the keep list"
        else:
            reason = rule if apply_rules else None
        if keep_list is not None and annotations is not None:
            agreement[AGREEMENT_KEYS[(not listed) * 2 + (rule is not None)]] += 1
        decisions[uid] = reason
        counts[reason] += 1
    summary = FilterSummary(total=len(decisions), kept=counts.pop(None, 0))
    for reason, n in counts.items():
        summary.count(reason, n)
    if keep_list is not None and annotations is not None:
        summary.agreement = {key: agreement[key] for key in AGREEMENT_KEYS}
    return decisions, summary
