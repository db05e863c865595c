"""WebDataset shards of rendered orbits (docs/design.md section 3, a contract).

One sample per (object, orbit), key ``<uid>_o<k>``, members

    <key>.<ii>.rgba.png     ii = 00..15, 8-bit RGBA PNG, straight alpha
    <key>.<ii>.ccm.png      16-bit RGB PNG, round(ccm * 65535), 0 where alpha == 0
    <key>.cameras.npy       float32 [16, 4, 4] c2w, OpenCV axes
    <key>.intrinsics.npy    float32 [16, 3, 3] K in pixels
    <key>.json              the render's metadata

Shards are written by webdataset's ``TarWriter`` into ``shard-%06d.tar.tmp`` and renamed to
``shard-%06d.tar`` once complete, so a shard is never half-written under its final name. The
samples of one object (its orbits) always go to the same shard.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import cv2
import numpy as np
import webdataset as wds

from data_pipeline.conventions import (
    NUM_FRAMES,
    decode_ccm_png,
    encode_ccm_png,
    frame_member,
    sample_key,
)

if TYPE_CHECKING:
    from data_pipeline.render import OrbitRender

SHARD_PATTERN = "shard-%06d.tar"
_SHARD_RE = re.compile(r"^shard-(\d{6,})\.tar$")
TMP_SUFFIX = ".tmp"


class CorruptSampleError(ValueError):
    """A shard sample that cannot be decoded: names the sample key, the member and why."""

    def __init__(self, key: str, member: str, reason: str):
        self.key, self.member, self.reason = key, member, reason
        super().__init__(f"sample {key!r}, member {member!r}: {reason}")


# ----------------------------------------------------------------------------- members
def _suffix(member_name: str, key: str) -> str:
    """Member suffix as webdataset sees it: ``<key>.<suffix>`` -> ``<suffix>``."""
    return member_name[len(key) + 1 :]


def _png_bytes(image: np.ndarray) -> bytes:
    """Lossless PNG of an RGB(A) image, uint8 or uint16 (OpenCV keeps 16 bits; it wants BGR)."""
    bgr = cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA if image.shape[-1] == 4 else cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", bgr)
    if not ok:
        raise RuntimeError("OpenCV failed to encode a PNG")
    return buf.tobytes()


def _png_array(data: bytes, channels: int, dtype, key: str, member: str) -> np.ndarray:
    """Decode a PNG and check its channel count and bit depth. Returns RGB(A) [H, W, C]."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise CorruptSampleError(key, member, "not a decodable PNG")
    if image.ndim != 3 or image.shape[-1] != channels or image.dtype != dtype:
        raise CorruptSampleError(
            key, member, f"expected {channels} channels of {np.dtype(dtype).name}, got "
            f"shape {image.shape} {image.dtype}"
        )
    code = cv2.COLOR_BGRA2RGBA if channels == 4 else cv2.COLOR_BGR2RGB
    return cv2.cvtColor(image, code)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def _npy_array(data: bytes, shape: tuple, key: str, member: str) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise CorruptSampleError(key, member, f"not a readable .npy file ({error})") from None
    if array.shape != shape or array.dtype != np.float32:
        raise CorruptSampleError(
            key, member, f"expected float32 {list(shape)}, got {array.dtype} {list(array.shape)}"
        )
    if not np.all(np.isfinite(array)):
        raise CorruptSampleError(key, member, "holds non-finite values")
    return array


# ----------------------------------------------------------------------------- samples
def encode_sample(render: "OrbitRender", key: str) -> dict:
    """One orbit render -> a webdataset sample dict (``__key__`` + member suffix -> bytes).

    Args:
        render: rgba uint8 [16, H, W, 4], ccm float32 [16, H, W, 3] in [0, 1], c2w [16, 4, 4],
            K [16, 3, 3], meta dict (JSON-serialisable).
        key: ``sample_key(uid, orbit)``.
    """
    rgba = np.asarray(render.rgba)
    ccm = np.asarray(render.ccm)
    frames, height, width = rgba.shape[:3]
    if rgba.dtype != np.uint8 or rgba.shape != (NUM_FRAMES, height, width, 4):
        raise ValueError(f"{key}: rgba must be uint8 [16, H, W, 4], got {rgba.dtype} {rgba.shape}")
    if ccm.shape != (NUM_FRAMES, height, width, 3):
        raise ValueError(f"{key}: ccm must be [16, {height}, {width}, 3], got {ccm.shape}")
    sample = {"__key__": key}
    for i in range(NUM_FRAMES):
        sample[_suffix(frame_member(key, i, "rgba"), key)] = _png_bytes(rgba[i])
        ccm_png = encode_ccm_png(ccm[i], rgba[i, ..., 3])
        sample[_suffix(frame_member(key, i, "ccm"), key)] = _png_bytes(ccm_png)
    sample["cameras.npy"] = _npy_bytes(np.asarray(render.c2w).reshape(NUM_FRAMES, 4, 4))
    sample["intrinsics.npy"] = _npy_bytes(np.asarray(render.K).reshape(NUM_FRAMES, 3, 3))
    sample["json"] = json.dumps(render.meta, sort_keys=True).encode()
    return sample


def decode_sample(sample: dict, frames=None) -> dict:
    """A raw webdataset sample (member suffix -> bytes, no ``.decode()``) -> arrays.

    Every member of the contract must be present (an incomplete sample is corrupt), but only
    the PNGs of ``frames`` (default: all 16, in order) are decoded.

    Returns:
        dict(key, rgba uint8 [F, H, W, 4], ccm float32 [F, H, W, 3], c2w float32 [F, 4, 4],
        K float32 [F, 3, 3], meta dict) for the F selected frames.
    Raises:
        CorruptSampleError naming the key and member when a member is missing or malformed.
    """
    key = sample.get("__key__", "?")
    frames = list(range(NUM_FRAMES)) if frames is None else [int(i) for i in frames]

    def member(suffix: str) -> bytes:
        if suffix not in sample:
            raise CorruptSampleError(key, f"{key}.{suffix}", "missing")
        return sample[suffix]

    names = {(i, kind): frame_member(key, i, kind) for i in range(NUM_FRAMES) for kind in ("rgba", "ccm")}
    for name in names.values():
        member(_suffix(name, key))
    rgba, ccm = [], []
    for i in frames:
        name = names[i, "rgba"]
        rgba.append(_png_array(member(_suffix(name, key)), 4, np.uint8, key, name))
        name = names[i, "ccm"]
        ccm.append(decode_ccm_png(_png_array(member(_suffix(name, key)), 3, np.uint16, key, name)))
    sizes = {frame.shape[:2] for frame in rgba + ccm}
    if len(sizes) != 1:
        raise CorruptSampleError(key, f"{key}.*.png", f"frames differ in size: {sorted(sizes)}")
    try:
        meta = json.loads(member("json"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptSampleError(key, f"{key}.json", f"not valid JSON ({error})") from None
    if not isinstance(meta, dict):
        raise CorruptSampleError(key, f"{key}.json", "is not a JSON object")
    c2w = _npy_array(member("cameras.npy"), (NUM_FRAMES, 4, 4), key, f"{key}.cameras.npy")
    K = _npy_array(member("intrinsics.npy"), (NUM_FRAMES, 3, 3), key, f"{key}.intrinsics.npy")
    return dict(key=key, rgba=np.stack(rgba), ccm=np.stack(ccm), c2w=c2w[frames], K=K[frames], meta=meta)


def encode_object(renders: list["OrbitRender"], uid: str) -> list[dict]:
    """All orbits of one object -> its samples, keys ``<uid>_o<k>``."""
    return [encode_sample(render, sample_key(uid, render.orbit)) for render in renders]


def iter_shard(path: str | Path) -> Iterator[dict]:
    """Raw samples of one finished shard, in order (webdataset's tar reader, no decoding)."""
    dataset = wds.WebDataset(str(path), shardshuffle=False, empty_check=False)
    for sample in dataset:
        sample = dict(sample)
        sample.pop("__url__", None)
        sample.pop("__local_path__", None)
        yield sample


# ----------------------------------------------------------------------------- writing
def list_shards(out_dir: str | Path) -> list[Path]:
    """Finished shards ``shard-NNNNNN.tar`` in a folder, by index."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if _SHARD_RE.match(p.name))


def shard_index(path: str | Path) -> int:
    match = _SHARD_RE.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path}: not a shard name like {SHARD_PATTERN % 0}")
    return int(match.group(1))


@dataclass
class ClosedShard:
    """A shard that was completed and renamed to its final name."""

    path: Path
    uids: list[str] = field(default_factory=list)
    num_samples: int = 0
    num_bytes: int = 0


class ShardWriter:
    """Writes objects' samples into ``shard-%06d.tar``, ``samples_per_shard`` samples each.

    A shard is written under ``<name>.tmp`` and renamed when it holds ``samples_per_shard``
    samples (or ``max_bytes``), or on :meth:`close`. Numbering continues after the shards
    already in ``out_dir``; leftover ``.tmp`` shards of an interrupted run are deleted (their
    samples were never committed). One writer per folder at a time.
    """

    def __init__(self, out_dir: str | Path, samples_per_shard: int, max_bytes: int = 1 << 30):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.max_bytes = max_bytes
        for stale in self.out_dir.glob("shard-*.tar" + TMP_SUFFIX):
            stale.unlink()
        existing = list_shards(self.out_dir)
        self._next_index = shard_index(existing[-1]) + 1 if existing else 0
        self._writer: wds.TarWriter | None = None
        self._file = None
        self._current: ClosedShard | None = None

    def _open(self) -> None:
        path = self.out_dir / (SHARD_PATTERN % self._next_index)
        self._next_index += 1
        self._file = open(str(path) + TMP_SUFFIX, "wb")
        self._writer = wds.TarWriter(self._file)
        self._current = ClosedShard(path=path)

    def add_object(self, uid: str, samples: list[dict]) -> ClosedShard | None:
        """Append all samples of one object to the open shard.

        Returns:
            the shard this call completed, or None while it stays open.
        """
        if self._writer is None:
            self._open()
        for sample in samples:
            self._current.num_bytes += self._writer.write(sample)
            self._current.num_samples += 1
        self._current.uids.append(uid)
        full = self._current.num_samples >= self.samples_per_shard
        return self.close() if full or self._current.num_bytes >= self.max_bytes else None

    def close(self) -> ClosedShard | None:
        """Finish the open shard (flush, fsync, rename). Returns it, or None if none was open."""
        if self._writer is None:
            return None
        self._writer.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        closed = self._current
        os.replace(str(closed.path) + TMP_SUFFIX, closed.path)
        self._writer = self._file = self._current = None
        return closed

    def abort(self) -> None:
        """Drop the open shard without committing it."""
        if self._writer is not None:
            self._writer.close()
            self._file.close()
            Path(str(self._current.path) + TMP_SUFFIX).unlink(missing_ok=True)
            self._writer = self._file = self._current = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
