"""The loader and the trainer reading shards from an object store: a real S3 server (moto's
server mode on loopback, the ``s3_bucket`` fixture), reached only through the standard AWS
environment, with the rendered ``demo_shards`` (2 shards x 4 samples) as data.

Covered: listing (prefix, glob, braces, ``::`` mixes, other files of a render's output are not
shards, clear errors), the same samples as from the local copy, a corrupt object skipped and
counted, the store refusing or not answering (bounded retries, then skipped shards and a clear
error, never a hang), the store coming back while a shard is re-opened, re-opening at the failed
byte, and 2 trainer ranks from ``s3://`` against a local copy (per-step losses, resume mid-epoch).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import fsspec
import pytest
import torch
from moto.server import ThreadedMotoServer
from test_trainer import deepspeed_launcher, losses, run_main, write_config

from training.loader import LoaderConfig, StreamingLoader, shard_files
from training.shard_store import ReadPolicy, ReopeningReader, ShardUnreadableError, expand_shards

# short timeouts: a dead store is given up on in seconds here (defaults: minutes)
FAST = ReadPolicy(connect_timeout_s=0.5, read_timeout_s=0.5, attempts=2, reopens=1, reopen_pause_s=0.1)


def upload(folder: Path, url: str, names: list[str] | None = None) -> None:
    """Copy the files of ``folder`` (or only ``names``) under the prefix ``url``."""
    fs, path = fsspec.core.url_to_fs(url)
    for name in names or sorted(p.name for p in folder.iterdir() if p.is_file()):
        fs.put_file(str(folder / name), f"{path}/{name}")


def loader_config(**changes) -> LoaderConfig:
    """Demo shards at 32 px with the CCM, one sample a batch, no shuffle buffer: the stream order is
    the shards'."""
    return LoaderConfig(**dict(dict(resolution=32, num_workers=0, shuffle_buffer=1, shuffle_initial=1, ccm=True), **changes))


def take(loader: StreamingLoader, n: int) -> list[dict]:
    batches = iter(loader)
    return [next(batches) for _ in range(n)]


def assert_same_batches(want: list[dict], got: list[dict]) -> None:
    assert [b["key"] for b in want] == [b["key"] for b in got]
    for a, b in zip(want, got):
        for name in ("images", "alphas", "ccm", "c2w", "K"):
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


@contextmanager
def store_down(s3_server, stalled: bool):
    """The session's S3 server stopped (connections refused) or, ``stalled``, replaced by a socket
    that accepts connections and never answers; a new server on the same port afterwards (moto's
    state lives in this process: the buckets come back)."""
    s3_server["server"].stop()
    hole = None
    if stalled:
        hole = socket.socket()
        hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hole.bind(("127.0.0.1", s3_server["port"]))
        hole.listen(64)
    try:
        yield
    finally:
        if hole is not None:
            hole.close()
        restart(s3_server)


def restart(s3_server) -> None:
    s3_server["server"] = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_server["port"], verbose=False)
    s3_server["server"].start()


# ----------------------------------------------------------------------------- listing
def test_listing_prefix_glob_braces_and_mixes(s3_bucket, demo_shards):
    prefix = f"{s3_bucket}/shards"
    upload(demo_shards, prefix)  # the shards beside the manifest, index files, job summary, ...
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.pipe_file(f"{prefix}/more/shard-000009.tar", b"a nested prefix is not a shard of the prefix")
    shards = [f"{prefix}/shard-000000.tar", f"{prefix}/shard-000001.tar"]
    assert any(not name.endswith(".tar") for name in fs.ls(prefix, detail=False))
    assert expand_shards(prefix) == shards
    assert expand_shards(f"{prefix}/") == shards
    assert expand_shards(f"{prefix}/shard-00000*.tar") == shards
    assert expand_shards(f"{prefix}/shard-{{000000..000001}}.tar") == shards
    local = str(demo_shards / "shard-000000.tar")
    assert expand_shards(f"{shards[1]}::{local}::{prefix}/more") == [shards[1], local, f"{prefix}/more/shard-000009.tar"]
    # a listing is fresh: a shard committed after an earlier listing is seen
    fs.pipe_file(f"{prefix}/shard-000002.tar", b"new")
    assert expand_shards(prefix) == [*shards, f"{prefix}/shard-000002.tar"]

    upload(demo_shards, f"{s3_bucket}/no-shards", ["manifest.parquet", "job_summary.json"])
    with pytest.raises(FileNotFoundError, match="no shard .* under the prefix s3://test-bucket/no-shards"):
        expand_shards(f"{s3_bucket}/no-shards")
    with pytest.raises(FileNotFoundError, match="s3://test-bucket/nothing does not exist"):
        expand_shards(f"{s3_bucket}/nothing")
    with pytest.raises(FileNotFoundError, match="shard-000003.tar does not exist"):
        expand_shards(f"{prefix}/shard-{{000000..000003}}.tar")
    with pytest.raises(FileNotFoundError, match="no shard matches s3://test-bucket/shards/shard-9"):
        expand_shards(f"{prefix}/shard-9*.tar")


# ----------------------------------------------------------------------------- reading
def test_loader_yields_the_same_samples_from_s3_as_from_the_local_copy(s3_bucket, demo_shards):
    prefix = f"{s3_bucket}/shards"
    upload(demo_shards, prefix)
    cfg = loader_config(batch_size=2, num_workers=1, seed=3)  # a DataLoader worker opens the store
    want = take(StreamingLoader(str(demo_shards), cfg), 6)  # 1.5 epochs of 8 samples
    got = take(StreamingLoader(prefix, cfg), 6)
    assert_same_batches(want, got)
    assert len({k for b in got[:4] for k in b["key"]}) == 8


def test_resume_from_s3_continues_mid_epoch_and_warns_when_shards_were_added(s3_bucket, demo_shards, caplog):
    prefix = f"{s3_bucket}/shards"
    upload(demo_shards, prefix, ["shard-000000.tar", "shard-000001.tar"])
    cfg = loader_config(num_workers=2, seed=5)
    full = take(StreamingLoader(prefix, cfg), 6)
    first = StreamingLoader(prefix, cfg)
    take(first, 3)  # mid-epoch (8 samples an epoch); odd: the next batch is the other worker's
    state = first.state_dict()
    resumed = StreamingLoader(prefix, cfg)
    resumed.load_state_dict(state)
    assert_same_batches(full[3:], take(resumed, 3))
    assert "shard list differs" not in caplog.text
    # a render job committed another shard meanwhile: the epoch's order changes, and a warning says so
    fsspec.filesystem("s3").copy(f"{prefix}/shard-000000.tar", f"{prefix}/shard-000002.tar")
    StreamingLoader(prefix, cfg).load_state_dict(state)
    assert "shard list differs from the one the loader position was saved with (now 3 shard(s))" in caplog.text


def _truncated(data: bytes) -> bytes:
    return data[: int(len(data) * 0.6)]  # inside the third of its 4 samples


def _garbage(data: bytes) -> bytes:
    return os.urandom(len(data))


def members(url: str) -> tuple[list[str], list[str]]:
    """The sample keys of the tar members :func:`shard_files` reads from ``url``, and the URLs it
    reported broken."""
    broken = []
    keys = {m["fname"].split(".", 1)[0] for m in shard_files([url], FAST, lambda u, e: broken.append(u)) if m}
    return sorted(keys), broken


@pytest.mark.parametrize("damage", [_garbage, _truncated], ids=["garbage", "truncated"])
def test_corrupt_object_is_skipped_and_counted(s3_bucket, demo_shards, tmp_path, caplog, damage):
    """A broken shard-000001.tar in the bucket: shard-000000's samples all come, the broken shard is
    skipped (what it held before the damage still comes), each read of it counted once and named;
    the loader behaves exactly as on a local copy of the same bytes."""
    local = tmp_path / "shards"
    local.mkdir()
    shutil.copy(demo_shards / "shard-000000.tar", local)
    (local / "shard-000001.tar").write_bytes(damage((demo_shards / "shard-000001.tar").read_bytes()))
    prefix = f"{s3_bucket}/shards"
    upload(local, prefix)
    bad = f"{prefix}/shard-000001.tar"
    good_keys, broken = members(f"{prefix}/shard-000000.tar")
    assert len(good_keys) == 4 and broken == []
    held, broken = members(bad)  # truncated: the members before the cut
    assert broken == [bad]  # reported once per read, not once per failing member

    cfg = loader_config(seed=1)
    s3_loader, local_loader = StreamingLoader(prefix, cfg), StreamingLoader(str(local), cfg)
    s3_batches, local_batches = iter(s3_loader), iter(local_loader)
    keys = []
    for _ in range(12):
        batch = next(s3_batches)
        assert_same_batches([next(local_batches)], [batch])
        assert s3_loader.skipped == local_loader.skipped
        keys += batch["key"]
    assert s3_loader.skipped["shards"] >= 1  # 12 samples: at least one epoch read whole
    assert s3_loader.state_dict()["streams"][0]["skipped_shards"] == s3_loader.skipped["shards"]
    assert f"skipping (the rest of) shard {bad}" in caplog.text
    assert f"shard {prefix}/shard-000000.tar" not in caplog.text
    assert set(good_keys) <= set(keys) <= set(good_keys) | set(held)
    if held:  # the complete samples before the cut come (the cut one is a skipped sample)
        assert set(keys) & set(held) and s3_loader.skipped["samples"] >= 1


@pytest.mark.parametrize("stalled", [False, True], ids=["refused", "stalled"])
def test_unreachable_store_gives_up_after_bounded_retries(s3_bucket, s3_server, demo_shards, caplog, stalled):
    """Listed while the store is up, then the store refuses connections or accepts them and never
    answers: each shard is re-opened ``reopens`` times, then skipped with a warning naming it; an
    epoch with no sample is an error naming the shards, and listing a clear error: in seconds."""
    prefix = f"{s3_bucket}/shards"
    upload(demo_shards, prefix)
    loader = StreamingLoader(prefix, loader_config(reads=FAST))
    with store_down(s3_server, stalled):
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"epoch 0 gave no samples from 2 shard\(s\)"):
            next(iter(loader))
        with pytest.raises(OSError, match=f"could not list {prefix}"):
            expand_shards(prefix, FAST)
        elapsed = time.monotonic() - start
    for n in range(2):
        assert f"re-opening {prefix}/shard-00000{n}.tar at byte 0" in caplog.text
        assert f"skipping (the rest of) shard {prefix}/shard-00000{n}.tar" in caplog.text
    assert "ShardUnreadableError: could not read" in caplog.text
    # per shard: 2 opens x 2 attempts x 0.5 s timeouts + backoff + 0.1 s pause
    assert elapsed < 30, elapsed


def test_store_back_while_a_shard_is_reopened(s3_bucket, s3_server, demo_shards, caplog):
    """The store down when reading starts and back 1 s later, within the re-opens' pauses
    (0.5 + 1 + 2 + 4 s): every sample comes, nothing is skipped."""
    prefix = f"{s3_bucket}/shards"
    upload(demo_shards, prefix)
    reads = ReadPolicy(connect_timeout_s=1, read_timeout_s=1, attempts=1, reopens=4, reopen_pause_s=0.5)
    cfg = loader_config(reads=reads)
    loader = StreamingLoader(prefix, cfg)
    s3_server["server"].stop()
    back = threading.Timer(1.0, restart, args=(s3_server,))
    back.start()
    try:
        got = take(loader, 8)
    finally:
        back.join()
    assert_same_batches(take(StreamingLoader(str(demo_shards), cfg), 8), got)
    assert loader.skipped == dict(samples=0, shards=0)
    assert "re-opening s3://test-bucket/shards/shard-00000" in caplog.text


class _FlakyFile(io.BytesIO):
    """``data`` from some offset whose reads fail once ``fail_at`` bytes of it were read."""

    def __init__(self, data: bytes, fail_at: int | None):
        super().__init__(data)
        self.fail_at = fail_at

    def readinto(self, buffer) -> int:
        if self.fail_at is None:
            return super().readinto(buffer)
        if self.tell() >= self.fail_at:
            raise ConnectionResetError("connection reset by peer")
        return super().readinto(memoryview(buffer)[: self.fail_at - self.tell()])


def test_reopening_reader_continues_at_the_failed_byte():
    data = os.urandom(100_000)
    url = "s3://bucket/shard-000000.tar"
    opens = []

    def open_at(offset: int):
        opens.append(offset)
        if len(opens) == 2:
            raise ConnectionRefusedError("refused")  # a failed open counts as a failure too
        return _FlakyFile(data[offset:], 30_000 if len(opens) < 4 else None)

    def read(reopens: int) -> bytes:
        opens.clear()
        reader = ReopeningReader(url, open_at, ReadPolicy(reopens=reopens, reopen_pause_s=0))
        return io.BufferedReader(reader).read()

    assert read(reopens=3) == data
    assert opens == [0, 30_000, 30_000, 60_000]
    with pytest.raises(ShardUnreadableError, match=f"could not read {url}: 3 failed opens/reads"):
        read(reopens=2)

    def missing(offset: int):
        opens.append(offset)
        raise FileNotFoundError(url)

    opens.clear()
    with pytest.raises(FileNotFoundError):
        io.BufferedReader(ReopeningReader(url, missing, ReadPolicy(reopen_pause_s=0))).read()
    assert opens == [0]  # no retry brings a missing object back


# ----------------------------------------------------------------------------- the trainer
@pytest.mark.slow
def test_two_ranks_train_from_s3_as_from_a_local_copy_and_resume_mid_epoch(
        s3_bucket, demo_shards, tmp_path, monkeypatch):
    """2 CPU ranks through the deepspeed launcher: steps 1-5 from the local folder; from the
    bucket steps 1-2, stopped (mid-epoch: 4 steps an epoch), resumed to 5. Every step's losses
    equal the local run's."""
    prefix = f"{s3_bucket}/shards"
    upload(demo_shards, prefix)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    config = write_config(tmp_path / "train.yaml", max_steps=5, checkpoint_every=10, log_every=1,
                          images_every=1000, optim=dict(total_batch=2))
    local, remote = tmp_path / "local", tmp_path / "s3"
    with ThreadPoolExecutor(2) as pool:  # two independent runs side by side on the 2 cores
        list(pool.map(lambda args: run_main(config, *args, launcher=deepspeed_launcher()),
                      [(str(demo_shards), local), (prefix, remote, "--max-steps", "2")]))
    proc = run_main(config, prefix, remote, "--resume", "auto", launcher=deepspeed_launcher())
    text = proc.stdout + proc.stderr
    assert "resumed from" in text and "2 rank(s), 2 shard(s)" in text
    want, got = losses(local), losses(remote)
    assert sorted(got) == list(range(1, 6))
    for step in range(1, 6):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-6, abs=1e-7), step
        assert got[step]["grad_norm"] == pytest.approx(want[step]["grad_norm"], rel=1e-5), step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(remote / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    skipped = {e.step: e.value for e in events.Scalars("data/skipped_shards")}
    assert set(skipped) >= {3, 4, 5} and set(skipped.values()) == {0.0}
