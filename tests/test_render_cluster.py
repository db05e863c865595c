"""The render job's cluster path (``--ray-address``) against a real local Ray cluster.

The test starts a Ray head node itself (``ray start --head --block`` on 127.0.0.1, a free port,
2 CPUs, its own temp dir), runs ``scripts/render_job.py --ray-address <it>`` (the entry point
``ray submit`` runs) on 2 demo objects at tiny resolution with an in-flight window of 1, and
watches the cluster's free CPUs meanwhile from a second driver: with a window of 1 never more
than one render task holds a CPU, and one does at some point. Afterwards the cluster is still up
with every CPU free again (the job left nothing behind), and the head is stopped by signalling
the process the test started (not ``ray stop``, which stops every Ray process on the machine,
other people's included); none of the cluster's processes may outlive it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO

from common import conventions as C
from data_pipeline.manifest import read_manifest
from data_pipeline.shards import decode_sample, iter_shard, list_shards

pytestmark = [pytest.mark.slow, pytest.mark.blender]

RAY = Path(sys.executable).parent / "ray"
# This checkout on the path of the job and of the cluster's workers: scripts/render_job.py does
# not put its repository on sys.path itself (unlike training/main.py and eval/gso_benchmark.py),
# so without it another installed copy of the project would be what runs.
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           RAY_USAGE_STATS_ENABLED="0",
           # Ray >= 2.5x turns on token authentication for `ray start`; the drivers here would
           # need the head's token. The cluster only lives for this test: opt out.
           RAY_AUTH_MODE="disabled")  # fmt: skip
MONITOR = """
import sys, time, ray
for attempt in range(60):  # the head's port opens before its node is ready: retry for a minute
    try:
        ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
        break
    except Exception as err:
        print(f"attempt {attempt}: {err}", file=sys.stderr, flush=True)
        time.sleep(1.0)
print("ready", flush=True)
while True:
    print(ray.available_resources().get("CPU", 0.0), flush=True)
    time.sleep(0.2)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.fixture
def ray_head():
    """(address, port, temp dir, process) of a Ray head node started for this test."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="rayt-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    log = open(Path(temp) / "head.log", "w")
    cmd = [str(RAY), "start", "--head", "--block", "--port", str(port), "--node-ip-address", "127.0.0.1",
           "--num-cpus", "2", "--include-dashboard", "false", "--temp-dir", temp, "--disable-usage-stats"]  # fmt: skip
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=ENV)
    try:
        deadline = time.monotonic() + 180
        while not _port_open(port):
            assert head.poll() is None, f"ray start exited {head.returncode}: {(Path(temp) / 'head.log').read_text()[-2000:]}"
            assert time.monotonic() < deadline, "the Ray head did not listen within 180 s"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", port, temp, head
    finally:
        if head.poll() is None:  # the test failed before stopping it: stop it, by its process group
            os.killpg(head.pid, signal.SIGTERM)
            try:
                head.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
        log.close()


def test_render_job_on_a_ray_cluster_window_and_clean_shutdown(ray_head, tmp_path):
    address, port, temp, head = ray_head
    monitor_log = open(tmp_path / "monitor.log", "w")
    monitor = subprocess.Popen([sys.executable, "-c", MONITOR, address], stdout=subprocess.PIPE, env=ENV,
                               stderr=monitor_log, text=True, start_new_session=True)  # fmt: skip
    try:
        ready = monitor.stdout.readline().strip()
        assert ready == "ready", (tmp_path / "monitor.log").read_text()[-3000:]
        out = tmp_path / "job"
        args = [sys.executable, "scripts/render_job.py", "--ray-address", address, "--source", "demo",
                "--count", "2", "--seed", "3", "--resolution", "32", "--samples", "1", "--no-denoise",
                "--max-in-flight", "1", "--per-shard", "2", "--output", str(out), "--no-contact-sheet"]  # fmt: skip
        job = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900, env=ENV)
        assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-2000:]
    finally:
        os.killpg(monitor.pid, signal.SIGTERM)
        samples, _ = monitor.communicate(timeout=60)
        monitor_log.close()
    free = [float(v) for v in samples.split()]
    assert free and max(free) == 2.0
    # the window: one render task at a time (each holds 1 of the 2 CPUs), and one was seen
    assert min(free) == 1.0, f"free CPUs seen while rendering: {sorted(set(free))}"

    rows = read_manifest(out / "manifest.parquet")
    assert len(rows) == 2 and {r.status for r in rows.values()} == {"done"}
    keys = []
    for shard in list_shards(out):
        for raw in iter_shard(shard):
            sample = decode_sample(raw)
            assert sample.rgba.shape == (16, 32, 32, 4)
            keys.append(raw["__key__"])
    assert sorted(keys) == sorted(C.sample_key(uid, k) for uid in rows for k in (0, 1))
    assert not list(out.glob("*.tmp"))

    # the job disconnected and left nothing running: the cluster is up, all its CPUs free
    probe = subprocess.run([sys.executable, "-c", "import sys, ray; ray.init(address=sys.argv[1], "
                            "logging_level='ERROR'); print(ray.available_resources().get('CPU'))", address],
                           capture_output=True, text=True, timeout=120, env=ENV)  # fmt: skip
    assert probe.returncode == 0 and probe.stdout.split()[-1] == "2.0", probe.stdout + probe.stderr[-1500:]

    # clean shutdown of the cluster the test started
    cluster = _processes_mentioning(temp)
    assert len(cluster) >= 2  # gcs_server, raylet, ... (their command lines name the session dir)
    head.send_signal(signal.SIGTERM)
    head.wait(120)
    deadline = time.monotonic() + 60
    while (alive := [p for p in cluster if Path(f"/proc/{p}").exists() and not _zombie(p)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive, f"Ray processes left after stopping the head: {alive}"
    assert not _port_open(port)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False
