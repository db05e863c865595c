"""The render job writing to an object store: a real S3 server (moto, on loopback, started by the
fixtures), reached only through the standard AWS configuration (``AWS_ENDPOINT_URL`` ...).

Shards are written by the workers, whole; a kill at any moment and a re-run leave every object in
exactly one shard and no unfinished multipart upload; the store going away mid-job is retried;
the driver's results do not grow with the resolution.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time

import fsspec
import numpy as np
import pytest
from conftest import run_pipeline
from data_paths import REPO
from PIL import Image

from common import conventions as C
from data_pipeline.manifest import parse_manifest
from data_pipeline.shards import ShardInfo, decode_sample

FAST = ["--resolution", "32", "--samples", "2", "--no-denoise", "--workers", "2"]


def s3() -> fsspec.AbstractFileSystem:
    return fsspec.filesystem("s3", skip_instance_cache=True)


def unfinished_uploads(fs, bucket: str) -> list:
    return fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])


def check_exactly_once(fs, url: str, uids: int) -> dict:
    """Every object done once: manifest rows ``done``, each key in exactly one shard, each shard
    whole (its index's size and checksum) and named by its objects' rows. Returns the rows."""
    root = url.removeprefix("s3://")
    rows = parse_manifest(fs.cat_file(f"{root}/manifest.parquet"), url)
    assert len(rows) == uids and {r.status for r in rows.values()} == {"done"}, rows
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    shards = [n for n in names if n.endswith(".tar")]
    assert not [n for n in names if n.endswith(".tmp")]
    keys = []
    for shard in shards:
        data = fs.cat_file(f"{root}/{shard}")
        index = ShardInfo.from_json(fs.cat_file(f"{root}/{shard.removesuffix('.tar')}.index.json"), shard)
        assert index.num_bytes == len(data)
        assert index.sha256 == hashlib.sha256(data).hexdigest()  # no partial object under a final name
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            shard_keys = list(dict.fromkeys(n.split(".")[0] for n in tar.getnames()))
        assert shard_keys == index.keys
        for uid in index.uids:
            assert rows[uid].shard == shard
        keys += shard_keys
    assert sorted(keys) == sorted(C.sample_key(uid, k) for uid in rows for k in (0, 1))  # once each
    assert unfinished_uploads(fs, root.split("/")[0]) == []
    return rows


@pytest.mark.slow
@pytest.mark.blender
def test_render_job_writes_shards_manifest_and_sheet_to_s3(s3_bucket):
    url = f"{s3_bucket}/run"
    run_pipeline(["render", "--source", "demo", "--count", "3", "--seed", "5", "--per-shard", "2", *FAST,
                  "--output", url])
    fs = s3()
    rows = check_exactly_once(fs, url, 3)
    root = url.removeprefix("s3://")
    assert {"manifest.parquet", "contact_sheet.png", "job_summary.json"} <= {
        p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
    sheet = Image.open(io.BytesIO(fs.cat_file(f"{root}/contact_sheet.png")))
    assert sheet.size == (8 * 96, 3 * (96 + 14))
    assert json.loads(fs.cat_file(f"{root}/job_summary.json"))["done"] == 3
    shard = rows[sorted(rows)[0]].shard
    with tarfile.open(fileobj=io.BytesIO(fs.cat_file(f"{root}/{shard}"))) as tar:
        raw = {}
        for member in tar.getmembers():
            key, suffix = member.name.split(".", 1)
            raw.setdefault(key, {"__key__": key})[suffix] = tar.extractfile(member).read()
    for sample in raw.values():
        decoded = decode_sample(sample)
        assert decoded.rgba.shape == (16, 32, 32, 4) and decoded.rgba[..., 3].any()


@pytest.mark.slow
@pytest.mark.blender
def test_kill_and_resume_against_the_store(s3_bucket):
    """SIGKILL of the whole job twice: once as soon as its plan is in the manifest (no shard yet),
    once when its first shard is in the bucket; an unfinished multipart upload left as a kill
    mid-upload leaves one; then the same command: exactly once, nothing unfinished, and the
    units planned by the first run kept their names."""
    url = f"{s3_bucket}/job"
    root = url.removeprefix("s3://")
    args = ["render", "--source", "demo", "--count", "4", "--seed", "6", "--per-shard", "2", *FAST,
            "--output", url, "--no-contact-sheet"]
    fs = s3()

    def run_until(ready) -> None:
        job = subprocess.Popen([sys.executable, "-m", "data_pipeline", *args], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 400
            while not ready():
                assert job.poll() is None, "the job ended before the moment to kill it"
                assert time.monotonic() < deadline, "the moment to kill never came"
                time.sleep(0.2)
                fs.invalidate_cache()
        finally:
            os.killpg(job.pid, signal.SIGKILL)  # the job, its Ray and its Blender workers
            job.wait()
        fs.invalidate_cache()

    run_until(lambda: fs.exists(f"{root}/manifest.parquet"))
    plan = parse_manifest(fs.cat_file(f"{root}/manifest.parquet"), url)
    assert {r.status for r in plan.values()} == {"pending"} and all(r.shard for r in plan.values())
    run_until(lambda: fs.glob(f"{root}/shard-*.tar"))
    killed_with = fs.glob(f"{root}/shard-*.tar")
    assert 1 <= len(killed_with) < 4
    fs.call_s3("create_multipart_upload", Bucket=root.split("/")[0], Key="job/shard-000099.tar")
    assert len(unfinished_uploads(fs, root.split("/")[0])) == 1

    run_pipeline(args)
    fs.invalidate_cache()
    rows = check_exactly_once(fs, url, 4)
    assert set(killed_with) <= set(fs.glob(f"{root}/shard-*.tar"))  # committed shards were kept
    assert {uid: row.shard for uid, row in rows.items()} == {uid: row.shard for uid, row in plan.items()}


@pytest.mark.slow
@pytest.mark.blender
def test_the_store_going_away_mid_job_is_retried_to_completion(s3_bucket, s3_server):
    """The S3 server stops once the first shard is in (moto's state lives in this process and
    survives) and comes back 12 s later, while units are still being written: the job's writes
    are retried (botocore's own retries set to one try, so that the store's show) and it
    completes, exactly once."""
    from moto.server import ThreadedMotoServer

    url = f"{s3_bucket}/flaky"
    root = url.removeprefix("s3://")
    fs = s3()
    job = subprocess.Popen([sys.executable, "-m", "data_pipeline", "render", "--source", "demo", "--count", "6",
                            "--seed", "7", "--per-shard", "2", *FAST, "--output", url, "--no-contact-sheet"],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=dict(os.environ, AWS_MAX_ATTEMPTS="1"))
    try:
        deadline = time.monotonic() + 400
        while not fs.glob(f"{root}/shard-*.tar"):
            assert job.poll() is None, job.stdout.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
            fs.invalidate_cache()
        s3_server["server"].stop()
        time.sleep(12)
        s3_server["server"] = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_server["port"], verbose=False)
        s3_server["server"].start()
        out, _ = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out[-3000:]
    assert "retry" in out, out[-3000:]  # the outage was met, and retried
    fs.invalidate_cache()
    check_exactly_once(fs, url, 6)


def test_a_store_that_stays_away_is_a_clear_error_naming_the_url(monkeypatch):
    """Bounded retries, then StorageError with the URL that could not be written."""
    import socket

    import s3fs

    from data_pipeline.storage import Store, StorageError

    # a port held bound but never listening: connections are refused, and no other process (a
    # test server beside this one) can take the port while the test runs
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{sock.getsockname()[1]}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries, standard AWS configuration
        # fsspec hands back a filesystem made earlier in this process (under the moto server's
        # endpoint, by the tests before this one) unless its cache is cleared
        s3fs.S3FileSystem.clear_instance_cache()
        store = Store("s3://nowhere/prefix", retries=2, retry_pause_s=0.05)
        start = time.monotonic()
        with pytest.raises(StorageError, match=r"could not write s3://nowhere/prefix/manifest.parquet"):
            store.write_bytes("manifest.parquet", b"x")
        assert time.monotonic() - start < 60


@pytest.mark.blender
def test_results_sent_to_the_driver_do_not_grow_with_the_resolution(tmp_path):
    """render_unit's result (what crosses Ray to the driver) against the renders' own size."""
    from data_pipeline.render import RenderSettings
    from data_pipeline.render_workers import Unit, render_unit
    from data_pipeline.sources import demo_objects

    (record,) = demo_objects(1, tmp_path / "objects", seed=3)
    sizes, rows = {}, {}
    for resolution in (32, 64):
        settings = RenderSettings(resolution=resolution, samples=2, denoise=False)
        for previews in (0, 1):
            out = tmp_path / f"out{resolution}_{previews}"
            result = render_unit(Unit("shard-000000.tar", [record], previews), settings, str(out))
            assert result.objects[0].ok, result.objects[0].reason
            sizes[resolution, previews] = len(pickle.dumps(result))
        rows[resolution] = np.asarray(Image.open(io.BytesIO(result.previews[0])))
        sizes[resolution, "shard"] = (out / "shard-000000.tar").stat().st_size
    assert sizes[64, "shard"] > 1.8 * sizes[32, "shard"]  # the renders grow with the resolution
    assert sizes[64, 0] <= sizes[32, 0] + 16 and sizes[64, 0] < 2000  # the result does not
    # a preview row is the same picture size at any resolution, a PNG no larger than its pixels
    assert rows[32].shape == rows[64].shape == (14 + 96, 8 * 96, 3)
    assert sizes[64, 1] - sizes[64, 0] < rows[64].nbytes
