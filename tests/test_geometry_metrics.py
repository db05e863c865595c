"""Geometry metrics of the benchmark (eval/geometry.py) on cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import trimesh

from eval import geometry
from model.gaussians_ply import load_ply
from tests.surface_gaussians import normalised_mesh, write_surface_gaussians


def _square(z: float) -> trimesh.Trimesh:
    v = np.array([[-0.5, -0.5, z], [0.5, -0.5, z], [0.5, 0.5, z], [-0.5, 0.5, z]])
    return trimesh.Trimesh(v, [[0, 1, 2], [0, 2, 3]], process=False)


def test_parallel_squares_give_their_distance_and_thresholded_fscores():
    m = geometry.surface_metrics(_square(0.0), _square(0.03))
    # nearest samples: sqrt(0.03^2 + in-plane gap^2), the gap ~ the sample spacing (0.007) / 2
    assert m["chamfer"] == pytest.approx(0.03, rel=0.05)
    assert m["fscore_2pct"] == 0.0 and m["fscore_5pct"] == 1.0
    same = geometry.surface_metrics(_square(0.0), _square(0.0))
    assert same["chamfer"] < 0.005 and same["fscore_2pct"] == 1.0


def test_missing_part_lowers_recall_not_precision():
    half = trimesh.Trimesh(_square(0.0).vertices, [[0, 1, 2]], process=False)  # one of two triangles
    m = geometry.surface_metrics(half, _square(0.0))
    # precision 1, recall ~ 0.5 (+ the 2% band beyond the diagonal): F ~ 2 * 0.53 / 1.53
    assert 0.64 < m["fscore_2pct"] < 0.72 and m["chamfer"] > 0.05


def test_ground_truth_mesh_is_moved_by_the_render_normalisation_then_the_condition_frame(tmp_path):
    box = trimesh.creation.box(extents=(2.0, 4.0, 1.0))
    box.export(tmp_path / "box.ply")
    source_to_world = np.diag([0.25, 0.25, 0.25, 1.0])
    source_to_world[:3, 3] = [0.1, 0.0, 0.0]
    rot_z90 = np.eye(4)
    rot_z90[:2, :2] = [[0.0, -1.0], [1.0, 0.0]]
    mesh = geometry.ground_truth_mesh(tmp_path / "box.ply", source_to_world.tolist(), rot_z90)
    # box x in [-1, 1] -> world [-0.15, 0.35] -> model y; y in [-2, 2] -> [-0.5, 0.5] -> model -x
    np.testing.assert_allclose(mesh.bounds, [[-0.5, -0.15, -0.125], [0.5, 0.35, 0.125]], atol=1e-12)
    with pytest.raises(ValueError, match="nowhere.obj"):
        geometry.ground_truth_mesh(tmp_path / "nowhere.obj", np.eye(4), np.eye(4))


def test_gaussians_vs_mesh_on_a_real_asset_and_nan_without_a_surface(tmp_path):
    spot = normalised_mesh("spot.obj")
    write_surface_gaussians(spot, 20000, tmp_path / "g.ply")
    g = load_ply(tmp_path / "g.ply")
    m = geometry.gaussians_vs_mesh(g, spot)
    assert m["chamfer"] < 0.015 and m["fscore_2pct"] > 0.9 and m["fscore_5pct"] > 0.99
    faint = g.clone()
    faint[:, 3] = 0.01  # opacities too low for the field to reach the level
    assert all(math.isnan(v) for v in geometry.gaussians_vs_mesh(faint, spot).values())
    assert set(m) == set(geometry.COLUMNS)


def test_aggregate_counts_objects_with_a_surface():
    rows = [dict(variant="ouroboros", chamfer=0.01, fscore_2pct=0.8, fscore_5pct=0.9),
            dict(variant="ouroboros", chamfer=math.nan, fscore_2pct=math.nan, fscore_5pct=math.nan),
            dict(variant="ouroboros", chamfer=0.03, fscore_2pct=0.6, fscore_5pct=1.0)]  # fmt: skip
    (agg,) = geometry.aggregate(rows)
    assert (agg.pop("split"), agg.pop("variant")) == ("test", "ouroboros")
    assert agg == pytest.approx(dict(with_surface=2, objects=3, chamfer=0.02, fscore_2pct=0.7, fscore_5pct=0.95))
