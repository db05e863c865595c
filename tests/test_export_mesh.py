"""Mesh export from Gaussians (inference/export_mesh.py, inference/mesh_from_gaussians.py) against real
meshes: Gaussians sampled on each asset's surface and written by plyfile in the INRIA layout
(tests/surface_gaussians.py), exported at the default settings, compared with the source."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import trimesh

from inference.export_mesh import export_mesh
from tests.surface_gaussians import chamfer_and_fscore, colour_at, normalised_mesh, write_surface_gaussians
from data_paths import REPO

LGM_GAUSSIANS = 65536  # LGM's output: 4 views x 128 x 128 pixels


@pytest.mark.parametrize("asset", ["Duck.glb", "spot.obj", "teapot.obj"])
def test_mesh_matches_the_source_surface_and_colours(tmp_path, asset):
    source = normalised_mesh(asset)  # extent (longest side) 1
    n = write_surface_gaussians(source, LGM_GAUSSIANS, tmp_path / "g.ply")
    start = time.process_time()
    mesh = export_mesh(tmp_path / "g.ply", tmp_path / "mesh.ply")
    cpu_s = time.process_time() - start
    chamfer, fscore = chamfer_and_fscore(mesh, source, threshold=0.02)
    print(f"{asset}: {n} Gaussians, {len(mesh.faces)} faces, Chamfer {chamfer:.4f}, F@2% {fscore:.3f}, "
          f"CPU {cpu_s:.1f} s")  # fmt: skip
    assert chamfer <= 0.015 and fscore >= 0.85
    assert len(mesh.faces) <= 100_000  # the default decimation target
    rgb = np.asarray(mesh.visual.vertex_colors)[:, :3] / 255.0
    assert np.abs(rgb - colour_at(np.asarray(mesh.vertices))).mean() < 0.03


def test_cli_writes_each_format_in_its_frame(tmp_path):
    """.glb and .obj are +Y up (world +Z -> +Y), .ply stays in the world frame (+Z up)."""
    source = normalised_mesh("fuze/fuze.obj")  # tall along its file's z
    source.vertices = source.vertices * [0.5, 0.5, 1.0]  # keep it tall, smaller: fewer voxels
    write_surface_gaussians(source, 8000, tmp_path / "g.ply")
    lo, hi = source.bounds
    for suffix in (".glb", ".obj", ".ply"):
        out = tmp_path / f"mesh{suffix}"
        proc = subprocess.run([sys.executable, "-m", "inference.export_mesh", "--gaussians", str(tmp_path / "g.ply"),
                               "--output", str(out), "--resolution", "64"], cwd=REPO, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        loaded = trimesh.load(str(out), force="mesh", process=False)
        b = loaded.bounds
        if suffix == ".ply":
            np.testing.assert_allclose(b, [lo, hi], atol=0.03)
        else:  # glTF / OBJ (x, y, z) = world (x, z, -y)
            np.testing.assert_allclose(b[:, 1], [lo[2], hi[2]], atol=0.03)
            np.testing.assert_allclose(sorted(-b[:, 2]), [lo[1], hi[1]], atol=0.03)
        assert loaded.visual.kind == "vertex" and len(loaded.visual.vertex_colors) == len(loaded.vertices)
    assert not list(tmp_path.glob(".*tmp"))


def test_bad_inputs_exit_2_naming_the_file(tmp_path):
    (tmp_path / "bad.ply").write_bytes(b"not a ply")
    for gaussians, output, message in [(tmp_path / "bad.ply", tmp_path / "m.glb", "bad.ply"),
                                       (tmp_path / "bad.ply", tmp_path / "m.stl", "m.stl: unknown mesh format")]:  # fmt: skip
        proc = subprocess.run([sys.executable, "-m", "inference.export_mesh", "--gaussians", str(gaussians),
                               "--output", str(output)], cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
