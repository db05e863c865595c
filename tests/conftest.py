"""Shared fixtures.

``demo_shards``: shards + manifest of 4 procedural demo objects (2 orbits each, 64 px, 4
samples) rendered by the real job (CLI subprocess: local Ray + Blender). The result is cached
between test sessions under ``$OUROBOROS_TEST_CACHE`` (default: the system temp folder), keyed
by a hash of the data pipeline's source, so that editing the pipeline re-renders it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from data_paths import FIXTURES, REPO

DEMO_SHARDS_ARGS = ["--source", "demo", "--count", "4", "--seed", "0", "--resolution", "64",
                    "--samples", "4", "--per-shard", "4", "--workers", "2"]


def _pipeline_hash(args: list[str]) -> str:
    digest = hashlib.sha256(" ".join(args).encode())
    for path in [*sorted((REPO / "data_pipeline").glob("*.py")), REPO / "common" / "atomic.py",
                 REPO / "common" / "conventions.py"]:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def run_pipeline(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m data_pipeline <args>`` in a subprocess; fails the test with its output."""
    proc = subprocess.run([sys.executable, "-m", "data_pipeline", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"data_pipeline {' '.join(args)} exited {proc.returncode}:\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def demo_shards() -> Path:
    """Folder with ``shard-*.tar`` (2 shards x 2 objects x 2 orbits) and ``manifest.parquet``
    of 4 demo objects at 64 px. Treat it as read-only: it is shared between sessions."""
    cache = Path(os.environ.get("OUROBOROS_TEST_CACHE", tempfile.gettempdir())) / "ouroboros3d-test-cache"
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / f"demo_shards-{_pipeline_hash(DEMO_SHARDS_ARGS)}"
    with open(cache / "demo_shards.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be rendering the same
        if not (final / "manifest.parquet").exists():
            build = Path(tempfile.mkdtemp(prefix="demo_shards-", dir=cache))
            try:
                run_pipeline(["render", *DEMO_SHARDS_ARGS, "--output", str(build)])
                os.replace(build, final)
            finally:
                shutil.rmtree(build, ignore_errors=True)
    return final


OBJAVERSE_FIXTURE = FIXTURES / "objaverse"


@pytest.fixture
def objaverse_cache(tmp_path, monkeypatch) -> Path:
    """The objaverse package pointed at a copy of tests/fixtures/objaverse (real layout) with
    procedural .glb files at ``glbs/<group>/<uid>.glb``; any download attempt fails the test.
    Returns the ``_VERSIONED_PATH`` folder."""
    import gzip
    import json
    import urllib.request

    import objaverse

    from data_pipeline.sources import make_demo_object

    base = tmp_path / ".objaverse"
    versioned = base / "hf-objaverse-v1"
    shutil.copytree(OBJAVERSE_FIXTURE / "hf-objaverse-v1", versioned)
    with gzip.open(versioned / "object-paths.json.gz", "rt") as handle:
        for index, object_path in enumerate(sorted(json.load(handle).values())):
            target = versioned / object_path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(make_demo_object(index, seed=7)[1].export(file_type="glb"))

    def no_network(url, *args, **kwargs):
        raise AssertionError(f"objaverse tried to download {url}")

    monkeypatch.setattr(objaverse, "BASE_PATH", str(base))
    monkeypatch.setattr(objaverse, "_VERSIONED_PATH", str(versioned))
    monkeypatch.setattr(urllib.request, "urlretrieve", no_network)
    return versioned


@pytest.fixture(scope="session")
def tiny_checkpoint(demo_shards, tmp_path_factory) -> str:
    """Export folder (``Ouroboros3D.save_pretrained``) of the full tiny preset (feedback adapters
    + LGM, joint training) after one optimizer step of the real trainer (``training/main.py``,
    DeepSpeed ZeRO-2 on CPU) on ``demo_shards``. The weights are barely trained: use it to
    exercise code paths, not to judge quality."""
    import yaml

    run = tmp_path_factory.mktemp("tiny_checkpoint")
    cfg = yaml.safe_load((REPO / "training" / "configs" / "tiny.yaml").read_text())
    cfg.update(max_steps=1, checkpoint_every=1, images_every=1000)
    cfg["data"]["num_workers"] = 0
    cfg["optim"].update(total_batch=1, micro_batch=1)
    (run / "train.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, str(REPO / "training" / "main.py"), "--config", str(run / "train.yaml"),
           "--data", str(demo_shards), "--output", str(run / "out")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))  # see tests/test_trainer.py
    if proc.returncode != 0:
        pytest.fail(f"training/main.py exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return str(run / "out" / "export")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server (moto's server mode) on a free loopback port, for the session. Tests reach
    it through the ``s3_bucket`` fixture, only by the standard AWS configuration."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield {"server": server, "endpoint": f"http://127.0.0.1:{port}", "port": port}
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch) -> str:
    """``s3://test-bucket`` on a freshly reset ``s3_server``, with the AWS environment a user of a
    MinIO would set (``AWS_ENDPOINT_URL``, keys, region); subprocesses inherit it."""
    import urllib.request

    import fsspec

    urllib.request.urlopen(urllib.request.Request(f"{s3_server['endpoint']}/moto-api/reset", method="POST"))
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["endpoint"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir("test-bucket")
    return "s3://test-bucket"
