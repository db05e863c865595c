"""WebDataset shards of rendered orbits (docs/design.md section 3, a contract).

One sample per (object, orbit), key ``<uid>_o<k>``, members

    <key>.<ii>.rgba.png     ii = 00..15, 8-bit RGBA PNG, straight alpha
    <key>.<ii>.ccm.png      16-bit RGB PNG, round(ccm * 65535), 0 where alpha == 0
    <key>.cameras.npy       float32 [16, 4, 4] c2w, OpenCV axes
    <key>.intrinsics.npy    float32 [16, 3, 3] K in pixels
    <key>.json              the render's metadata

A shard is one work unit's objects (:func:`write_shard`, webdataset's ``TarWriter``), written
whole on the worker's local disk and then committed to the output under its final name in one
step (:class:`data_pipeline.storage.Store`), so a shard is never half-written under that name;
its index ``shard-%06d.index.json`` (uids, keys, size and checksum) is written after it. The
samples of one object (its orbits) always go to the same shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np
import webdataset as wds

from common.conventions import (
    NUM_FRAMES,
    decode_ccm_png,
    encode_ccm_png,
    frame_member,
    key_uid,
)
from common.orbit import OrbitRender

SHARD_PATTERN = "shard-%06d.tar"
SHARD_GLOB = "shard-*.tar"
_SHARD_RE = re.compile(r"^shard-(\d{6,})\.tar$")
INDEX_SUFFIX = ".index.json"  # shard-000000.tar -> shard-000000.index.json


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
def encode_sample(render: OrbitRender) -> dict:
    """One orbit render -> a webdataset sample dict (``__key__`` = ``render.key`` + member suffix
    -> bytes).

    Args:
        render: rgba uint8 [16, H, W, 4], ccm float32 [16, H, W, 3] in [0, 1], c2w [16, 4, 4],
            K [16, 3, 3], meta dict (JSON-serialisable).
    """
    key = render.key
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


def decode_sample(sample: dict, frames=None, ccm: bool = True) -> OrbitRender:
    """A raw webdataset sample (member suffix -> bytes, no ``.decode()``) -> its orbit.

    Every member of the contract must be present (an incomplete sample is corrupt), but only
    the PNGs of ``frames`` (default: all 16, in order) are decoded, and the CCM PNGs only with
    ``ccm`` (the 16-bit CCM PNGs cost more to decode than the RGBA ones).

    Returns:
        OrbitRender of the F selected frames: key, rgba uint8 [F, H, W, 4], ccm float32
        [F, H, W, 3] in [0, 1] (None without ``ccm``), c2w float32 [F, 4, 4], K float32
        [F, 3, 3], meta dict.
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
    rgba, ccms = [], []
    for i in frames:
        name = names[i, "rgba"]
        rgba.append(_png_array(member(_suffix(name, key)), 4, np.uint8, key, name))
        if ccm:
            name = names[i, "ccm"]
            ccms.append(decode_ccm_png(_png_array(member(_suffix(name, key)), 3, np.uint16, key, name)))
    sizes = {frame.shape[:2] for frame in rgba + ccms}
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
    return OrbitRender(key=key, rgba=np.stack(rgba), ccm=np.stack(ccms) if ccm else None,
                       c2w=c2w[frames], K=K[frames], meta=meta)


def encode_object(renders: list[OrbitRender]) -> list[dict]:
    """All orbits of one object -> its samples, keys ``<uid>_o<k>``."""
    return [encode_sample(render) for render in renders]


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
    """Finished shards ``shard-NNNNNN.tar`` in a local folder, by index."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if is_shard_name(p.name))


def is_shard_name(name: str) -> bool:
    return _SHARD_RE.match(name) is not None


def shard_index(path: str | Path) -> int:
    match = _SHARD_RE.match(Path(str(path)).name)
    if match is None:
        raise ValueError(f"{path}: not a shard name like {SHARD_PATTERN % 0}")
    return int(match.group(1))


def index_name(shard_name: str) -> str:
    """The index file of a shard: ``shard-000000.tar`` -> ``shard-000000.index.json``."""
    return shard_name.removesuffix(".tar") + INDEX_SUFFIX


@dataclass
class ShardInfo:
    """What a finished shard holds: its index (``<shard>.index.json``), a few hundred bytes."""

    name: str
    uids: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    num_bytes: int = 0
    sha256: str = ""

    def add_member(self, member_name: str) -> None:
        """Count a tar member ``<key>.<suffix>`` read in shard order: its key and uid, once each."""
        key = member_name.split(".", 1)[0]
        if not self.keys or self.keys[-1] != key:
            self.keys.append(key)
        if key_uid(key) not in self.uids:
            self.uids.append(key_uid(key))

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "ShardInfo":
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError) as error:
            raise ValueError(f"{where}: not a shard index ({error})") from None


def _size_and_sha256(path: str | Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def write_shard(path: str | Path, name: str, objects: Iterable[tuple[str, list[dict]]]) -> ShardInfo:
    """Write objects' samples (``(uid, samples)`` pairs, samples from :func:`encode_object`) into
    the local tar file ``path``, flushed; the caller commits it under ``name``.

    Returns:
        the shard's index (uids in order, sample keys, size, SHA-256 of the file).
    """
    info = ShardInfo(name=name)
    with open(path, "wb") as handle:
        with wds.TarWriter(handle) as tar:
            for uid, samples in objects:
                for sample in samples:
                    tar.write(sample)
                    info.keys.append(sample["__key__"])
                info.uids.append(uid)
        handle.flush()
    info.num_bytes, info.sha256 = _size_and_sha256(path)
    return info


def copy_shard_without(stream, path: str | Path, name: str, drop_uids: set[str]) -> ShardInfo:
    """Copy a shard read from ``stream`` (one pass) into the local file ``path``, leaving out every
    sample of the objects ``drop_uids``; members are copied byte for byte, in order.

    Returns:
        the copy's index.
    """
    info = ShardInfo(name=name)
    with tarfile.open(fileobj=stream, mode="r|") as source, tarfile.open(path, "w") as copy:
        for member in source:
            if key_uid(member.name.split(".", 1)[0]) in drop_uids:
                continue
            copy.addfile(member, source.extractfile(member))
            info.add_member(member.name)
    info.num_bytes, info.sha256 = _size_and_sha256(path)
    return info
