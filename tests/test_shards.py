"""Shard format (docs/design.md section 3) read back with plain tarfile + independent decoders, and with
webdataset; write_shard's index; CorruptSampleError on damaged samples."""

import hashlib
import io
import json
import struct
import tarfile
import zlib

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from common import conventions as C
from common.orbit import OrbitRender
from data_pipeline.shards import (
    CorruptSampleError,
    ShardInfo,
    decode_sample,
    encode_object,
    encode_sample,
    index_name,
    iter_shard,
    write_shard,
)


def fake_render(uid: str, orbit: int, size: int = 12, seed: int = 0) -> OrbitRender:
    """An OrbitRender from arrays: random colours, a disc of alpha, CCM in [0, 1]."""
    rng = np.random.default_rng([seed, orbit])
    rgba = rng.integers(0, 256, (16, size, size, 4), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    rgba[..., 3] = np.where(disc, rgba[..., 3] | 1, 0)
    ccm = rng.random((16, size, size, 3), dtype=np.float32)
    ccm[:, ~disc] = 0
    elevation, start = C.draw_orbit(uid, orbit)
    c2w = C.orbit_c2w(elevation, C.orbit_azimuths(start)).astype(np.float32)
    K = np.repeat(C.intrinsics(C.DEFAULT_FOV_DEG, size)[None], 16, 0).astype(np.float32)
    meta = {"uid": uid, "orbit": orbit, "elevation": elevation, "resolution": size}
    return OrbitRender(key=C.sample_key(uid, orbit), rgba=rgba, ccm=ccm, c2w=c2w, K=K, meta=meta)


def png16_reference(data: bytes) -> np.ndarray:
    """Independent 16-bit RGB PNG decoder (zlib + the five PNG row filters). [H, W, 3] uint16."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, color_type = header[:4]
    assert (depth, color_type) == (16, 2), "expected 16-bit RGB"
    bpp, stride = 6, width * 6
    raw, rows, prev = zlib.decompress(idat), [], bytearray(stride)
    for y in range(height):
        ftype, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if ftype == 1:
                line[i] = (line[i] + a) & 255
            elif ftype == 2:
                line[i] = (line[i] + b) & 255
            elif ftype == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return np.frombuffer(b"".join(rows), ">u2").reshape(height, width, 3).astype(np.uint16)


def write_objects(path, uids) -> ShardInfo:
    """One shard at ``path`` holding both orbits of each uid's fake render."""
    objects = ((uid, encode_object([fake_render(uid, 0), fake_render(uid, 1)])) for uid in uids)
    return write_shard(path, path.name, objects)


def test_members_follow_the_contract_with_plain_tarfile(tmp_path):
    render = fake_render("obj-A_1", 1)
    shard = tmp_path / "shard-000000.tar"
    write_shard(shard, shard.name, [("obj-A_1", [encode_sample(render)])])
    with tarfile.open(shard) as tar:
        names = tar.getnames()
        expected = {C.frame_member("obj-A_1_o1", i, k) for i in range(16) for k in ("rgba", "ccm")}
        expected |= {"obj-A_1_o1.cameras.npy", "obj-A_1_o1.intrinsics.npy", "obj-A_1_o1.json"}
        assert set(names) == expected and len(names) == len(expected)
        read = lambda name: tar.extractfile(name).read()  # noqa: E731
        for i in (0, 7, 15):
            rgba = np.asarray(Image.open(io.BytesIO(read(f"obj-A_1_o1.{i:02d}.rgba.png"))))
            assert rgba.dtype == np.uint8 and rgba.shape == (12, 12, 4)
            np.testing.assert_array_equal(rgba, render.rgba[i])  # straight alpha, lossless
            ccm16 = png16_reference(read(f"obj-A_1_o1.{i:02d}.ccm.png"))
            expected16 = np.round(render.ccm[i].astype(np.float64) * 65535).astype(np.uint16)
            expected16[render.rgba[i, ..., 3] == 0] = 0
            np.testing.assert_array_equal(ccm16, expected16)
        cameras = np.load(io.BytesIO(read("obj-A_1_o1.cameras.npy")))
        K = np.load(io.BytesIO(read("obj-A_1_o1.intrinsics.npy")))
        assert cameras.dtype == np.float32 and cameras.shape == (16, 4, 4)
        assert K.dtype == np.float32 and K.shape == (16, 3, 3)
        np.testing.assert_array_equal(cameras, render.c2w)
        assert json.loads(read("obj-A_1_o1.json")) == render.meta


def test_webdataset_reads_and_decode_sample_round_trips(tmp_path):
    shard = tmp_path / "shard-000000.tar"
    write_objects(shard, ["a", "b", "c"])
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["a_o0", "a_o1", "b_o0", "b_o1", "c_o0", "c_o1"]
    decoded = decode_sample(samples[3])
    ref = fake_render("b", 1)
    np.testing.assert_array_equal(decoded.rgba, ref.rgba)
    assert np.abs(decoded.ccm - ref.ccm).max() <= 0.5 / 65535 + 1e-7
    np.testing.assert_array_equal(decoded.c2w, ref.c2w)
    np.testing.assert_array_equal(decoded.K, ref.K)
    assert decoded.meta == ref.meta and decoded.key == "b_o1"
    assert [s["__key__"] for s in iter_shard(shard)] == [s["__key__"] for s in samples]


def test_index_holds_the_shards_uids_keys_size_and_checksum(tmp_path):
    shard = tmp_path / "shard-000007.tar"
    info = write_objects(shard, ["u0", "u1", "u2"])
    data = shard.read_bytes()
    assert info.name == "shard-000007.tar" and index_name(info.name) == "shard-000007.index.json"
    assert info.uids == ["u0", "u1", "u2"] and info.keys == [f"u{i}_o{k}" for i in range(3) for k in (0, 1)]
    assert info.num_bytes == len(data) and info.sha256 == hashlib.sha256(data).hexdigest()
    with tarfile.open(shard) as tar:  # orbits of an object are in its shard, keys in order
        assert list(dict.fromkeys(n.split(".")[0] for n in tar.getnames())) == info.keys
    assert ShardInfo.from_json(info.to_json(), "x") == info
    with pytest.raises(ValueError, match="bad.index.json: not a shard index"):
        ShardInfo.from_json(b"[1, 2]", "bad.index.json")


def _sample(uid="x"):
    return encode_sample(fake_render(uid, 0))


@pytest.mark.parametrize(
    "damage, member, reason",
    [
        (lambda s: s.pop("05.ccm.png"), "x_o0.05.ccm.png", "missing"),
        (lambda s: s.update({"03.rgba.png": b"\x89PNG garbage"}), "x_o0.03.rgba.png", "PNG"),
        (lambda s: s.update({"02.ccm.png": s["02.rgba.png"]}), "x_o0.02.ccm.png", "channels"),
        (lambda s: s.update({"cameras.npy": s["intrinsics.npy"]}), "x_o0.cameras.npy", "[16, 4, 4]"),
        (lambda s: s.update({"json": b"{not json"}), "x_o0.json", "JSON"),
    ],
)
def test_corrupt_samples_name_member_and_reason(damage, member, reason):
    sample = _sample()
    damage(sample)
    with pytest.raises(CorruptSampleError) as info:
        decode_sample(sample)
    assert info.value.key == "x_o0" and info.value.member == member
    assert reason in info.value.reason and member in str(info.value)


def test_encode_rejects_wrong_shapes():
    render = fake_render("x", 0)
    render.rgba = render.rgba[:8]
    with pytest.raises(ValueError, match="rgba"):
        encode_sample(render)
