"""The prepared GPU check (bench/gpu_check.sh): its CPU dry run, and the wheel bundle's choices."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.version import Version
from data_paths import REPO

sys.path.insert(0, str(REPO / "tools"))

import gpu_wheels  # noqa: E402


@pytest.mark.slow
def test_dry_run_prints_every_row_of_the_table(tmp_path):
    """The same code as on the GPU, tiny sizes: every section runs and passes, one table."""
    out = tmp_path / "rows.json"
    # no bundle to install; the script's 8-minute limit is the GPU's, not a shared CPU's
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", GPU_CHECK_BUNDLE=str(tmp_path / "none"),
               GPU_CHECK_TIMEOUT="1400", PYTHONPATH=str(REPO))
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--steps", "1", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1500, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {check: (setting, result, verdict) for check, setting, result, verdict in json.loads(out.read_text())}
    assert rows["rasterizer: gsplat vs torch"][1] == "skipped (no CUDA)"
    assert "forward + backward" in rows["rasterizer: torch reference"][1]
    assert rows["train step (Algorithm 1)"][2] == "PASS" and "bf16, ZeRO-2" in rows["train step (Algorithm 1)"][0]
    assert float(rows["train step: achieved TFLOP/s"][1].split()[0]) > 0  # FLOPs were counted
    assert rows["sampling (Algorithm 2)"][2] == "PASS" and "bfloat16" in rows["sampling (Algorithm 2)"][0]
    assert "images/s" in rows["metrics: PSNR + SSIM + LPIPS"][1]
    table = proc.stdout[proc.stdout.index("| check |"):]
    assert table.count("\n|") == len(rows) + 1  # header rule + one line per row


def _wheel(folder: Path, name: str, version: str, *requires: str) -> Path:
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)
    return path


def test_select_installs_what_the_machine_lacks_or_has_too_old(tmp_path):
    wheels = [
        _wheel(tmp_path, "deepspeed", "0.19.8", "hjson", "pydantic>=2.0", "packaging>=20", "torch",
               'colorama; sys_platform == "win32"'),
        _wheel(tmp_path, "hjson", "3.1.0"),
        _wheel(tmp_path, "pydantic", "2.14.4", "pydantic-core==2.50.5"),
        _wheel(tmp_path, "pydantic-core", "2.50.5"),
        _wheel(tmp_path, "packaging", "26.4"),
        _wheel(tmp_path, "unused", "1.0"),
    ]
    machine = {"packaging": "24.0", "pydantic": "1.10.0", "torch": "2.11.0"}

    def installed(name):
        return Version(machine[name]) if name in machine else None

    chosen, missing = gpu_wheels.select(wheels, top_level=("deepspeed",), installed=installed)
    names = sorted(gpu_wheels.wheel_metadata(p)[0] for p in chosen)
    # hjson: absent; pydantic: too old, so also its pinned core; packaging 24 satisfies >= 20;
    # torch is installed; colorama's marker does not apply; "unused" is nobody's requirement
    assert names == ["deepspeed", "hjson", "pydantic", "pydantic-core"]
    assert missing == []
    machine.pop("torch")
    _, missing = gpu_wheels.select(wheels, top_level=("deepspeed",), installed=installed)
    assert len(missing) == 1 and missing[0].startswith("torch")


def test_pins_are_this_environments_versions_without_the_machines_own_packages():
    pins = dict(p.split("==") for p in gpu_wheels.pins())
    for name in gpu_wheels.TOP_LEVEL:
        assert pins[gpu_wheels.canonical(name)] == md.version(name)
    assert {"hjson", "py-cpuinfo", "msgpack", "ninja", "pydantic", "jaxtyping", "braceexpand"} <= set(pins)
    assert not {"torch", "torchvision", "numpy", "scipy", "pillow"} & set(pins)
    assert not any(name.startswith("nvidia-") for name in pins)


def test_conflicts_name_installed_packages_that_the_bundle_would_break(tmp_path):
    class Dist:
        def __init__(self, name, version, requires):
            self.metadata, self.version, self.requires = {"Name": name}, version, requires

    hub = _wheel(tmp_path, "huggingface-hub", "2.4.0")
    installed = [Dist("transformers", "4.40.0", ["huggingface-hub<1.0,>=0.19", "numpy"]),
                 Dist("accelerate", "1.0.0", ["huggingface-hub>=0.21"])]
    found = gpu_wheels.conflicts([hub], distributions=lambda: installed)
    assert found == ["transformers 4.40.0 requires huggingface-hub<1.0,>=0.19; the bundle brings huggingface-hub 2.4.0"]
