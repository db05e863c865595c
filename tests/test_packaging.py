"""The project as a stranger gets it: a clone with nothing beside it, and an installed wheel.

- No tracked text file names an absolute path of a particular machine (or the folder beside
  the development checkout): a clone elsewhere must not depend on them.
- The wheel holds every file of the packages (run-time files are package data, read with
  ``importlib.resources``), and the wheel, installed on its own and run from a folder outside
  the clone, renders a demo object, summarises the model, finds its training and DeepSpeed
  configs and turns an image into 3D.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from data_paths import REPO
from PIL import Image

PACKAGES = ("common", "data_pipeline", "model", "training", "inference", "eval", "infra")
# Paths that exist only on some machine: the development machines' tree, home folders (the Ray
# image's home is the same in every container, so it is allowed) and the folder beside the
# development checkout. Each is written with a character class so that this line is no match.
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:wor[k]|roo[t]|User[s]|hom[e](?!/ray/))/|\.\./share[d]\b")


def tracked_files() -> list[Path]:
    """The repository's files: git's list in a clone, else every file outside ignored folders."""
    if (REPO / ".git").exists() and shutil.which("git"):
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
        return [REPO / name for name in out.stdout.decode().split("\0") if name]
    skip = {".git", ".venv", "__pycache__", "outputs", "runs", "build", ".pytest_cache"}
    return [p for p in REPO.rglob("*") if p.is_file() and not skip & set(p.relative_to(REPO).parts)]


def test_no_tracked_file_names_a_machine_path():
    own = str(REPO)
    hits = []
    for path in tracked_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):
            continue  # binary (images, meshes) or deleted in the working tree
        for number, line in enumerate(text.splitlines(), 1):
            if MACHINE_PATH.search(line) or own in line:
                hits.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:120]}")
    assert not hits, "machine-specific absolute paths:\n" + "\n".join(hits)


def test_machine_path_pattern_catches_what_it_should():
    bad_paths = ["/".join(parts) for parts in (("", "work", "shared", "assets", "Duck.glb"),
                                               ("..", "shared", "DESIGN.md"), ("", "home", "alice", "x"),
                                               ("", "root", ".cache"))]  # fmt: skip
    for bad in bad_paths:
        assert MACHINE_PATH.search(bad), bad
    for fine in ("tests/assets/Duck.glb", "/home/ray/ouroboros3d", "/data/shards", "s3://b/p", "kitchen/home/tools"):
        assert not MACHINE_PATH.search(fine), fine


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built from a copy of its sources (nothing written into the clone)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for package in PACKAGES:
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--quiet", "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = dist.glob("ouroboros3d-*.whl")
    return path


def test_wheel_holds_every_file_of_the_packages(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        p.relative_to(REPO).as_posix()
        for package in PACKAGES
        for p in (REPO / package).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert not expected - names, f"not in the wheel (add them to package-data): {sorted(expected - names)}"
    for needed in ("infra/deepspeed/zero2_cpu_fp32.json", "training/configs/tiny.yaml",
                   "data_pipeline/objaverse_lists/lgm_kiuisobj_v1_merged_80K.csv", "eval/gso_selection.txt",
                   "inference/examples/demo1000_0001_sphere_stripes.png"):
        assert needed in names


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> dict:
    """The wheel installed alone into a folder of its own; the environment that runs it from a
    folder outside the clone (dependencies from this interpreter's site-packages)."""
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target",
                           str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = dict(os.environ, PYTHONPATH=str(target), OMP_NUM_THREADS="1")
    return {"env": env, "cwd": tmp_path_factory.mktemp("elsewhere"), "target": target}


def run_installed(installed, *args, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=installed["cwd"], env=installed["env"],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_installed_packages_are_the_wheels(installed):
    code = f"import importlib; print(*(importlib.import_module(p).__file__ for p in {PACKAGES!r}))"
    files = run_installed(installed, "-c", code).stdout.split()
    assert len(files) == len(PACKAGES)
    for name in files:
        assert Path(name).is_relative_to(installed["target"]), name
        assert not Path(name).is_relative_to(REPO), name


def test_installed_trainer_finds_its_configs(installed):
    code = """
from training.config import load_config, preset_names
from training.engine import deepspeed_config
names = preset_names()
assert {"tiny", "full", "tiny_joint", "tiny_lgm", "tiny_diffusion"} <= set(names), names
for name in names:
    load_config(name)
cfg = load_config("tiny", ["optim.precision=bf16"])
print(deepspeed_config(cfg, 1)["bf16"]["enabled"], deepspeed_config(load_config("tiny"), 2)["zero_optimization"]["stage"])
"""
    assert run_installed(installed, "-c", code).stdout.split() == ["True", "2"]
    proc = subprocess.run([sys.executable, "-c", "from training.config import load_config; load_config('nope')"],
                          cwd=installed["cwd"], env=installed["env"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "nope: no such training config file" in proc.stderr and "tiny" in proc.stderr


def test_installed_model_summary(installed):
    out = run_installed(installed, "-m", "model", "summary", "--preset", "tiny").stdout
    assert "preset 'tiny'" in out and re.search(r"total\s+[\d,]+", out), out


@pytest.mark.slow
@pytest.mark.blender
def test_installed_render_then_image_to_3d(installed, tiny_checkpoint):
    """``python -m data_pipeline render`` of one demo object and ``python -m inference.image_to_3d`` of
    its first frame, both from the installed wheel, outside the clone."""
    out = installed["cwd"] / "shards"
    run_installed(installed, "-m", "data_pipeline", "render", "--source", "demo", "--count", "1",
                  "--resolution", "32", "--samples", "2", "--workers", "1", "--per-shard", "2",
                  "--no-contact-sheet", "--output", str(out))
    (shard,) = out.glob("shard-*.tar")
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("_o0.00.rgba.png"))
        frame = Image.open(tar.extractfile(member)).convert("RGBA")
    assert np.asarray(frame)[..., 3].any()  # the object is in the frame
    image = installed["cwd"] / "input.png"
    frame.save(image)
    result = installed["cwd"] / "image_to_3d"
    run_installed(installed, "-m", "inference.image_to_3d", "--image", str(image), "--checkpoint", tiny_checkpoint,
                  "--output", str(result), "--steps", "1", "--orbit-frames", "4", "--no-mesh")
    for name in ("views.png", "gaussians.ply"):
        assert (result / name).stat().st_size > 0, name
