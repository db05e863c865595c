"""The render job end to end with the real renderer (local Ray + Blender, 64 px, few samples):
the demo_shards fixture, resume after a kill, bad inputs; the Ray cluster config."""

import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import trimesh
import yaml
from conftest import REPO, run_pipeline
from data_paths import ASSETS
from PIL import Image

from common import conventions as C
from data_pipeline.manifest import read_manifest
from data_pipeline.shards import decode_sample, iter_shard, list_shards

FAST = ["--resolution", "64", "--samples", "4", "--workers", "2"]


def all_keys(folder: Path) -> list[str]:
    """Every sample key of every finished shard, read with plain tarfile (checks readability)."""
    keys = []
    for shard in list_shards(folder):
        with tarfile.open(shard) as tar:
            names = tar.getnames()
        per_key = Counter(name.split(".", 1)[0] for name in names)
        assert all(n == 35 for n in per_key.values()), f"{shard}: incomplete samples {per_key}"
        keys += list(per_key)
    return keys


@pytest.mark.blender
def test_demo_shards_fixture(demo_shards):
    rows = read_manifest(demo_shards / "manifest.parquet")
    assert len(rows) == 4 and all(r.status == "done" and r.attempts == 1 for r in rows.values())
    keys = all_keys(demo_shards)
    assert sorted(keys) == sorted(C.sample_key(uid, k) for uid in rows for k in (0, 1))
    assert len(list_shards(demo_shards)) == 2
    for shard in list_shards(demo_shards):
        for raw in iter_shard(shard):
            sample = decode_sample(raw)
            uid, orbit = sample.meta["uid"], sample.meta["orbit"]
            assert raw["__key__"] == C.sample_key(uid, orbit) and rows[uid].shard == shard.name
            assert sample.rgba.shape == (16, 64, 64, 4)
            elevation, start = C.draw_orbit(uid, orbit)  # cameras are the uid's orbit
            np.testing.assert_allclose(sample.c2w, C.orbit_c2w(elevation, C.orbit_azimuths(start)), atol=1e-5)
            alpha = sample.rgba[..., 3] > 0
            assert alpha.mean() > 0.02 and np.all(sample.ccm[~alpha] == 0)
    sheet = Image.open(demo_shards / "contact_sheet.png")
    assert sheet.size[0] == 8 * 96 and sheet.size[1] == 4 * (96 + 14)


@pytest.mark.slow
@pytest.mark.blender
def test_resume_after_kill_never_loses_or_duplicates(tmp_path):
    """In the per-object worker mode (the other tests run the default, persistent one)."""
    out = tmp_path / "job"
    args = ["render", "--source", "demo", "--count", "3", "--seed", "5", "--per-shard", "2",
            *FAST, "--output", str(out), "--no-contact-sheet", "--worker-mode", "per-object"]
    job = subprocess.Popen([sys.executable, "-m", "data_pipeline", *args], cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while not (out / "shard-000000.tar").exists():
            assert job.poll() is None, "the job ended before its first shard"
            assert time.monotonic() < deadline, "no shard after 400 s"
            time.sleep(0.2)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the job, its Ray and its Blender workers
        job.wait()
    killed_with = all_keys(out)
    assert 0 < len(killed_with) < 6

    run_pipeline(args)
    rows = read_manifest(out / "manifest.parquet")
    assert len(rows) == 3 and {r.status for r in rows.values()} == {"done"}
    keys = all_keys(out)
    assert sorted(keys) == sorted(C.sample_key(uid, k) for uid in rows for k in (0, 1))  # once each
    assert set(killed_with) <= set(keys)
    for shard in list_shards(out):
        for raw in iter_shard(shard):
            assert rows[decode_sample(raw).meta["uid"]].shard == shard.name
    assert not list(out.glob("*.tmp"))


def _descendants(pid: int) -> dict[int, str]:
    """{pid: command line} of every live descendant of a process (from /proc)."""
    parents, commands = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
                commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, ValueError):
                pass
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, p in parents.items():
            if p == parent and child not in found:
                found[child] = commands[child]
                frontier.append(child)
    return found


@pytest.mark.slow
@pytest.mark.blender
def test_a_killed_render_actor_is_restarted_and_its_object_retried(tmp_path):
    """Persistent mode, one actor: once the first object is in a shard, the actor process is
    killed (SIGKILL) while it renders the next. Ray restarts it, its Blender (dead with its
    parent) is fresh, the object is rendered again, and every sample is in the shards once."""
    out = tmp_path / "job"
    args = ["render", "--source", "demo", "--count", "3", "--seed", "6", "--per-shard", "2", "--actors", "1",
            "--resolution", "32", "--samples", "4", "--workers", "1", "--output", str(out), "--no-contact-sheet"]
    job = subprocess.Popen([sys.executable, "-m", "data_pipeline", *args], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, killed = time.monotonic() + 400, None
        while killed is None:
            assert job.poll() is None, "the job ended before the actor could be killed"
            assert time.monotonic() < deadline, "no shard after 400 s"
            if (out / "shard-000000.tar").exists():
                procs = _descendants(job.pid)
                actor = [p for p, cmd in procs.items() if cmd.startswith("ray::RenderActor")]
                rendering = [p for p, cmd in procs.items() if "data_pipeline.blender_worker" in cmd]
                if actor and rendering:
                    os.kill(actor[0], signal.SIGKILL)
                    killed = actor[0]
            time.sleep(0.1)
        output, _ = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode == 0, output[-3000:]
    rows = read_manifest(out / "manifest.parquet")
    assert len(rows) == 3 and {r.status for r in rows.values()} == {"done"}, rows
    assert sorted(all_keys(out)) == sorted(C.sample_key(uid, k) for uid in rows for k in (0, 1))  # once each
    assert not list(out.glob("*.tmp"))


def _bad_inputs(folder: Path) -> None:
    folder.mkdir()
    (folder / "empty.glb").write_bytes(b"")
    duck = (ASSETS / "Duck.glb").read_bytes()
    (folder / "truncated.glb").write_bytes(duck[: len(duck) // 3])
    (folder / "text.glb").write_text("this is not a mesh\n")
    points = trimesh.PointCloud(np.random.default_rng(0).random((50, 3)))
    (folder / "no_faces.ply").write_bytes(points.export(file_type="ply"))
    (folder / "no_texture").mkdir()
    for name in ("fuze.obj", "fuze.obj.mtl"):  # the MTL names a JPEG that is not there
        shutil.copy(ASSETS / "fuze" / name, folder / "no_texture" / name)


@pytest.mark.blender
def test_bad_inputs_fail_with_reasons_and_the_job_completes(tmp_path):
    inputs, out = tmp_path / "inputs", tmp_path / "job"
    _bad_inputs(inputs)
    run_pipeline(["render", "--input", str(inputs), "--output", str(out), *FAST, "--max-retries", "0"])
    rows = read_manifest(out / "manifest.parquet")
    for uid, words in [("empty", "empty"), ("truncated", "truncated"), ("text", "gltf"),
                       ("no_faces", "face")]:
        assert rows[uid].status == "failed" and rows[uid].attempts == 1, rows[uid]
        assert words in rows[uid].reason.lower() and rows[uid].reason.split(":")[0], rows[uid].reason
    missing = rows["no_texture_fuze"]
    if missing.status == "done":  # rendered without its texture, and the sample says so
        metas = [decode_sample(raw).meta for raw in iter_shard(out / missing.shard)
                 if raw["__key__"].startswith("no_texture_fuze_")]
        assert metas and all("texture" in " ".join(m["warnings"]).lower() for m in metas)
    else:
        assert "texture" in missing.reason.lower()
    shards_before = list_shards(out)

    # a re-run with no retries left renders nothing and changes nothing
    proc = run_pipeline(["render", "--input", str(inputs), "--output", str(out), *FAST, "--max-retries", "0"])
    assert "0 rendered, 0 failed" in proc.stdout
    again = read_manifest(out / "manifest.parquet")
    assert {u: (r.status, r.attempts) for u, r in again.items()} == {u: (r.status, r.attempts) for u, r in rows.items()}
    assert list_shards(out) == shards_before


def test_cluster_config_is_valid_for_the_ray_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "infra" / "render.yaml").read_text())
    prepared = prepare_config(config)
    validate_config(prepared)  # Ray's own JSON schema for cluster configs
    assert prepared["provider"]["type"] == "aws"
    workers = prepared["available_node_types"]["gpu_worker"]
    assert workers["node_config"]["InstanceType"].startswith(("g5", "g6", "p4", "p5"))
    assert prepared["available_node_types"][prepared["head_node_type"]]["resources"] == {"CPU": 0}
    assert "." in prepared["file_mounts"].values()  # the repository goes to every node
    mount = next(k for k, v in prepared["file_mounts"].items() if v == ".")
    assert any("pip install" in cmd and mount in cmd for cmd in prepared["setup_commands"])
    # the on-premise variant: Ray's local provider, the store's settings copied to every node
    onprem = prepare_config(yaml.safe_load((REPO / "infra" / "render_onprem.yaml").read_text()))
    validate_config(onprem)
    assert onprem["provider"]["type"] == "local" and onprem["provider"]["worker_ips"]
    assert any(target.endswith("/.aws") for target in onprem["file_mounts"])
    assert "." in onprem["file_mounts"].values()
    # the submitted script is a real entry point of the render command
    proc = subprocess.run([sys.executable, "scripts/render_job.py", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--ray-address" in proc.stdout and "--source" in proc.stdout


@pytest.mark.slow
@pytest.mark.blender
def test_objaverse_job_downloads_in_the_workers_and_records_filtered_objects(objaverse_cache, tmp_path):
    """The CLI on Objaverse: the driver filters through the package, the Ray workers fetch the
    objects with objaverse.load_objects from their (HOME-based) cache, filtered objects get rows."""
    import hashlib

    home = objaverse_cache.parent.parent  # objaverse.BASE_PATH = ~/.objaverse
    uid = {name: hashlib.md5(name.encode()).hexdigest() for name in ("mug", "grey_bust", "tiny_cube")}
    out = tmp_path / "job"
    args = ["render", "--source", "objaverse", "--uids", *uid.values(), "--output", str(out),
            "--resolution", "32", "--samples", "1", "--workers", "1"]
    proc = subprocess.run([sys.executable, "-m", "data_pipeline", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=600, env={**os.environ, "HOME": str(home)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = read_manifest(out / "manifest.parquet")
    mug = rows[uid["mug"]]
    glb = objaverse_cache / "glbs" / "000-000" / f"{uid['mug']}.glb"
    assert mug.status == "done" and mug.sha256 == hashlib.sha256(glb.read_bytes()).hexdigest()
    assert mug.path.startswith("https://huggingface.co/datasets/allenai/objaverse/")
    assert (rows[uid["grey_bust"]].status, rows[uid["grey_bust"]].reason) == ("filtered", "no texture")
    assert (rows[uid["tiny_cube"]].status, rows[uid["tiny_cube"]].reason) == ("filtered", "too few faces")
    assert sorted(all_keys(out)) == [f"{uid['mug']}_o0", f"{uid['mug']}_o1"]
    (sample,) = [decode_sample(raw) for raw in iter_shard(out / mug.shard) if raw["__key__"].endswith("_o0")]
    assert sample.meta["source"] == "objaverse" and sample.rgba.shape == (16, 32, 32, 4)
    assert (out / "filter_summary.json").is_file()


def test_render_one_records_objects_it_cannot_fetch(objaverse_cache):
    from data_pipeline.render import RenderSettings
    from data_pipeline.render_workers import render_one
    from data_pipeline.sources import ObjectRecord

    with pytest.warns(UserWarning):  # objaverse warns about the unknown uid
        missing, samples = render_one(ObjectRecord("f" * 32, "objaverse", "https://example/x.glb"),
                                      RenderSettings(resolution=32, samples=1))
    assert not missing.ok and missing.reason.startswith("error: FileNotFoundError") and samples is None
