"""Streaming loader: batch layout, frame selection, model frame, determinism, resume, corrupt data.

Shards are written here from arrays in the docs/design.md section 3 format with webdataset's own
TarWriter; expected values come from independent constructions (scipy rotations, the
shard's own arrays), not from the loader's code.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os

import cv2
import numpy as np
import pytest
import torch
import webdataset as wds
from scipy.spatial.transform import Rotation

from common import conventions as cv
from training.loader import LoaderConfig, StreamingLoader, expand_shards

SIZE = 32  # shard resolution
RES = 16  # model resolution
BG = (0.25, 0.5, 1.0)


def _png(image: np.ndarray) -> bytes:
    code = cv2.COLOR_RGBA2BGRA if image.shape[2] == 4 else cv2.COLOR_RGB2BGR
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, code))
    assert ok
    return buf.tobytes()


def _npy(a: np.ndarray) -> bytes:
    f = io.BytesIO()
    np.save(f, a)
    return f.getvalue()


def frame_point(frame: int) -> np.ndarray:
    """The (world) surface point every foreground pixel of ``frame`` shows: frame-coded."""
    return np.array([0.02 * frame - 0.15, 0.3 - 0.03 * frame, 0.01 * frame])


def make_sample(uid: str, orbit: int = 0, size: int = SIZE) -> dict:
    """One contract sample: frame i has red = 10 i, a centred opaque square, CCM = frame_point."""
    elevation, azimuth0 = cv.draw_orbit(uid, orbit)
    azimuths = cv.orbit_azimuths(azimuth0)
    c2w = cv.orbit_c2w(elevation, azimuths).astype(np.float32)
    K = np.repeat(cv.intrinsics(cv.DEFAULT_FOV_DEG, size)[None], 16, 0).astype(np.float32)
    key = cv.sample_key(uid, orbit)
    sample = {"__key__": key, "cameras.npy": _npy(c2w), "intrinsics.npy": _npy(K)}
    q = size // 4
    for i in range(16):
        rgba = np.zeros((size, size, 4), np.uint8)
        rgba[..., 0], rgba[..., 1], rgba[..., 2] = 10 * i, 200, 50
        rgba[q:-q, q:-q, 3] = 255
        ccm = np.broadcast_to(cv.world_to_ccm(frame_point(i)), (size, size, 3))
        sample[f"{i:02d}.rgba.png"] = _png(rgba)
        sample[f"{i:02d}.ccm.png"] = _png(cv.encode_ccm_png(ccm, rgba[..., 3]))
    sample["json"] = json.dumps(
        dict(uid=uid, orbit=orbit, elevation=elevation, azimuths=azimuths.tolist(),
             radius=cv.DEFAULT_RADIUS, fov=cv.DEFAULT_FOV_DEG, resolution=size)
    ).encode()
    return sample


def write_shards(folder, samples_per_shard: list[list[dict]]) -> str:
    os.makedirs(folder, exist_ok=True)
    for n, samples in enumerate(samples_per_shard):
        with wds.TarWriter(os.path.join(folder, f"shard-{n:06d}.tar")) as sink:
            for s in samples:
                sink.write(s)
    return str(folder)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """3 shards x 4 samples of distinct objects."""
    folder = tmp_path_factory.mktemp("shards")
    return write_shards(folder, [[make_sample(f"obj{s}{k}", k % 2) for k in range(4)] for s in range(3)])


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_batch_layout_frames_and_model_frame(shards):
    cfg = LoaderConfig(resolution=RES, batch_size=2, background=BG, num_workers=0, seed=3, ccm=True)
    batch = next(iter(StreamingLoader(shards, cfg)))
    B, V = 2, 8
    assert batch["images"].shape == (B, V, 3, RES, RES) and batch["images"].dtype == torch.float32
    assert batch["alphas"].shape == (B, V, 1, RES, RES)
    assert batch["ccm"].shape == (B, V, 3, RES, RES)
    assert batch["c2w"].shape == (B, V, 4, 4) and batch["K"].shape == (B, V, 3, 3)
    assert len(batch["key"]) == B
    for b, key in enumerate(batch["key"]):
        uid, orbit = key.rsplit("_o", 1)
        elevation, azimuth0 = cv.draw_orbit(uid, int(orbit))
        # which frames: red channel codes the frame index (centre pixel is opaque)
        red = batch["images"][b, :, 0, RES // 2, RES // 2] * 255
        frames = np.round(red.numpy() / 10).astype(int)
        s = frames[0]
        np.testing.assert_array_equal(frames, [(s + 2 * k) % 16 for k in range(8)])
        # background: corner pixels are fully transparent -> the background colour
        corner = batch["images"][b, :, :, 0, 0]
        np.testing.assert_allclose(corner.numpy(), np.broadcast_to(BG, (8, 3)), atol=1e-6)
        assert torch.all(batch["alphas"][b, :, :, 0, 0] == 0)
        assert torch.all(batch["alphas"][b, :, :, RES // 2, RES // 2] == 1)
        # model frame: rotation about +Z by minus the condition azimuth (scipy reference)
        az = azimuth0 + 22.5 * frames
        R = Rotation.from_euler("z", -az[0], degrees=True).as_matrix()
        for v in range(8):
            eye = cv.spherical_to_position(elevation, az[v], cv.DEFAULT_RADIUS)
            np.testing.assert_allclose(batch["c2w"][b, v, :3, 3].numpy(), R @ eye, atol=1e-5)
            expected_ccm = R @ frame_point(frames[v]) + 0.5
            got = batch["ccm"][b, v, :, RES // 2, RES // 2].numpy()
            np.testing.assert_allclose(got, expected_ccm, atol=2e-4)
            assert torch.all(batch["ccm"][b, v, :, 0, 0] == 0)
        cond = batch["c2w"][b, 0, :3, 3].numpy()
        assert cond[0] > 0 and abs(cond[1]) < 1e-5
        np.testing.assert_allclose(
            batch["K"][b].numpy(), np.broadcast_to(cv.intrinsics(cv.DEFAULT_FOV_DEG, RES), (8, 3, 3)),
            rtol=1e-6,
        )


def test_same_seed_same_stream_other_seed_other_stream(shards):
    def keys(seed):
        cfg = LoaderConfig(resolution=RES, batch_size=2, num_workers=0, seed=seed, shuffle_buffer=4,
                           shuffle_initial=2)
        return [tuple(b["key"]) for b in _take(StreamingLoader(shards, cfg), 9)]

    a, b, c = keys(1), keys(1), keys(2)
    assert a == b
    assert a != c
    # 9 batches x 2 = 18 > 12 samples: the first epoch holds every sample once
    first_epoch = [k for batch in a for k in batch][:12]
    assert len(set(first_epoch)) == 12


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_where_it_stopped(shards, workers):
    cfg = LoaderConfig(resolution=RES, batch_size=2, num_workers=workers, seed=5, shuffle_buffer=4,
                       shuffle_initial=2, ccm=True)
    reference = StreamingLoader(shards, cfg)
    full = _take(reference, 10)
    first = StreamingLoader(shards, cfg)
    _take(first, 7)  # odd: the next batch comes from the other worker
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON round trip
    resumed = StreamingLoader(shards, cfg)
    resumed.load_state_dict(state)
    rest = _take(resumed, 3)
    for want, got in zip(full[7:], rest):
        assert want["key"] == got["key"]
        for name in ("images", "alphas", "ccm", "c2w", "K"):
            torch.testing.assert_close(want[name], got[name], rtol=0, atol=0)


def test_resume_refuses_another_worker_count(shards):
    cfg = LoaderConfig(resolution=RES, num_workers=0)
    loader = StreamingLoader(shards, cfg)
    _take(loader, 1)
    other = StreamingLoader(shards, LoaderConfig(resolution=RES, num_workers=2))
    with pytest.raises(ValueError, match="cannot resume"):
        other.load_state_dict(loader.state_dict())


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    bad_png = make_sample("badpng")
    bad_png["03.rgba.png"] = b"\x89PNG not really"
    missing = make_sample("missing")
    del missing["11.ccm.png"]
    wrong_shape = make_sample("wrongshape")
    wrong_shape["cameras.npy"] = _npy(np.zeros((15, 4, 4), np.float32))
    small = make_sample("small", size=SIZE // 2)
    mixed = make_sample("mixed")
    for i in range(1, 16):  # any 8 selected frames include one of another size
        mixed[f"{i:02d}.ccm.png"] = small[f"{i:02d}.ccm.png"]
    good = [make_sample(f"good{i}") for i in range(3)]
    folder = write_shards(tmp_path, [[good[0], bad_png, missing, good[1], wrong_shape, mixed, good[2]]])
    cfg = LoaderConfig(resolution=RES, num_workers=0, shuffle_buffer=1, shuffle_initial=1, ccm=True)
    loader = StreamingLoader(folder, cfg)
    keys = [b["key"][0] for b in _take(loader, 3)]
    assert sorted(keys) == ["good0_o0", "good1_o0", "good2_o0"]
    assert loader.skipped == dict(samples=4, shards=0)
    assert loader.state_dict()["streams"][0]["skipped_samples"] == 4


def test_ccm_members_are_decoded_only_when_asked_for(tmp_path):
    """Without ``ccm`` the batch has no CCM and the CCM PNGs are not decoded (a garbage one
    passes), but every member must still be there (a missing one still skips the sample)."""
    garbage = make_sample("garbage")
    for i in range(16):
        garbage[f"{i:02d}.ccm.png"] = b"\x89PNG not really"
    missing = make_sample("missing")
    del missing["11.ccm.png"]
    folder = write_shards(tmp_path, [[garbage, missing, make_sample("good")]])
    cfg = LoaderConfig(resolution=RES, num_workers=0, shuffle_buffer=1, shuffle_initial=1)
    loader = StreamingLoader(folder, cfg)
    batches = _take(loader, 2)
    assert [b["key"][0] for b in batches] == ["garbage_o0", "good_o0"]
    assert sorted(batches[0]) == ["K", "alphas", "c2w", "images", "key"]
    assert loader.skipped == dict(samples=1, shards=0)
    with_ccm = StreamingLoader(folder, dataclasses.replace(cfg, ccm=True))
    assert [b["key"][0] for b in _take(with_ccm, 1)] == ["good_o0"]


def test_truncated_shard_is_skipped_and_counted(tmp_path):
    folder = write_shards(tmp_path, [[make_sample("a0"), make_sample("a1")], [make_sample("b0")]])
    path = os.path.join(folder, "shard-000000.tar")
    data = open(path, "rb").read()
    with open(path, "wb") as f:  # cut inside the second sample
        f.write(data[: int(len(data) * 0.75)])
    cfg = LoaderConfig(resolution=RES, num_workers=0, shuffle_buffer=1, shuffle_initial=1, seed=0)
    loader = StreamingLoader(folder, cfg)
    keys = {b["key"][0] for b in _take(loader, 4)}
    assert "b0_o0" in keys and "a0_o0" in keys
    assert loader.skipped["shards"] >= 1


def test_no_valid_sample_is_a_clear_error(tmp_path):
    bad = make_sample("bad")
    bad["json"] = b"{not json"
    folder = write_shards(tmp_path, [[bad]])
    loader = StreamingLoader(folder, LoaderConfig(resolution=RES, num_workers=0))
    with pytest.raises(RuntimeError, match="no valid sample"):
        next(iter(loader))


@pytest.mark.parametrize("num_shards", [1, 4])
def test_ranks_read_disjoint_parts(tmp_path, monkeypatch, num_shards):
    per = 8 // num_shards
    folder = write_shards(
        tmp_path, [[make_sample(f"s{n}x{k}") for k in range(per)] for n in range(num_shards)]
    )
    cfg = LoaderConfig(resolution=RES, num_workers=0)
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append({b["key"][0] for b in _take(StreamingLoader(folder, cfg), 4)})
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 8


def test_expand_shards(tmp_path):
    folder = write_shards(tmp_path, [[make_sample("x")], [make_sample("y")]])
    a, b = (os.path.join(folder, f"shard-{i:06d}.tar") for i in range(2))
    assert expand_shards(folder) == [a, b]
    assert expand_shards(os.path.join(folder, "shard-{000000..000001}.tar")) == [a, b]
    assert expand_shards(os.path.join(folder, "shard-*.tar")) == [a, b]
    assert expand_shards(f"{a}::pipe:cat {b}") == [a, f"pipe:cat {b}"]
    with pytest.raises(FileNotFoundError, match="shard-000009.tar"):
        expand_shards(os.path.join(folder, "shard-000009.tar"))


def test_pipe_urls_stream(tmp_path):
    folder = write_shards(tmp_path, [[make_sample("p")]])
    cfg = LoaderConfig(resolution=RES, num_workers=0)
    batch = next(iter(StreamingLoader(f"pipe:cat {folder}/shard-000000.tar", cfg)))
    assert batch["key"] == ["p_o0"]


@pytest.mark.timeout(120)
def test_workers_start_after_this_process_decoded_large_frames(tmp_path):
    """Frames of 384 px decoded in this process (``num_workers=0``) used OpenCV's thread pool;
    DataLoader workers forked after that used to hang for ever in ``cv2.setNumThreads``."""
    folder = write_shards(tmp_path, [[make_sample(f"big{i}", size=384) for i in range(2)]])
    _take(StreamingLoader(folder, LoaderConfig(resolution=RES, num_workers=0)), 2)
    forked = StreamingLoader(folder, LoaderConfig(resolution=RES, num_workers=2, shuffle_buffer=1))
    assert {b["key"][0] for b in _take(forked, 2)} == {"big0_o0", "big1_o0"}
