"""Geometry metrics of the GSO benchmark: Chamfer distance and F-score between the generated 3D
and the ground-truth mesh, in the normalised object frame (protocol: docs/evaluation.md).

* Generated surface: the mesh of the final Gaussians (:func:`inference.mesh_from_gaussians.mesh_from_gaussians`,
  default settings), in the model frame the Gaussians are in.
* Ground truth: the object's mesh file moved by the renderer's own recorded normalisation
  (``source_to_world``: the importer's axes, scale and offset into [-0.5, 0.5]^3) and then
  by the condition-frame rotation (``conventions.condition_frame_transform``), so both are
  in one frame with no fitting or alignment.
* ``SAMPLES`` points drawn uniformly on each surface (area-weighted, fixed seeds); distances
  from each sample to the nearest sample of the other set.
* ``chamfer`` = mean of the two directions' mean distances (unsquared, in units of the
  object's longest side); ``fscore_Xpct`` = harmonic mean of precision (generated samples
  within X% of the ground truth) and recall (ground-truth samples within X% of the generated).
* Where the Gaussians have no surface (the field never reaches the level, as with an
  untrained model), the metrics are NaN and the tables count only objects with a surface.
"""

from __future__ import annotations

import math

import numpy as np

SAMPLES = 20_000
THRESHOLDS = {"fscore_2pct": 0.02, "fscore_5pct": 0.05}
COLUMNS = ("chamfer", *THRESHOLDS)
HEADERS = {"chamfer": "Chamfer ↓", "fscore_2pct": "F-score@2% ↑", "fscore_5pct": "F-score@5% ↑"}


def ground_truth_mesh(mesh_path, source_to_world, world_to_model):
    """The ground-truth mesh in the model frame: ``world_to_model @ source_to_world @ p``.

    Args:
        source_to_world: 4x4 from the render's metadata (``meta["normalization"]``).
        world_to_model: 4x4 rotation (``conventions.condition_frame_transform``).
    """
    import trimesh

    try:
        mesh = trimesh.load(str(mesh_path), force="mesh", process=False)
    except Exception as err:
        raise ValueError(f"{mesh_path}: cannot read the ground-truth mesh ({err})") from err
    M = np.asarray(world_to_model, np.float64) @ np.asarray(source_to_world, np.float64)
    vertices = np.asarray(mesh.vertices, np.float64) @ M[:3, :3].T + M[:3, 3]
    return trimesh.Trimesh(vertices, mesh.faces, process=False)


def surface_metrics(pred, target, samples: int = SAMPLES) -> dict[str, float]:
    """Chamfer and F-scores (module docstring) between two ``trimesh.Trimesh`` surfaces."""
    import trimesh
    from scipy.spatial import cKDTree

    a = trimesh.sample.sample_surface(pred, samples, seed=0)[0]
    b = trimesh.sample.sample_surface(target, samples, seed=1)[0]
    d_ab, d_ba = cKDTree(b).query(a)[0], cKDTree(a).query(b)[0]
    out = {"chamfer": 0.5 * float(d_ab.mean() + d_ba.mean())}
    for name, t in THRESHOLDS.items():
        precision, recall = float((d_ab < t).mean()), float((d_ba < t).mean())
        out[name] = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return out


def gaussians_vs_mesh(gaussians, target) -> dict[str, float]:
    """:func:`surface_metrics` of the Gaussians' mesh against ``target``; NaN without a surface."""
    from inference.mesh_from_gaussians import mesh_from_gaussians

    try:
        pred = mesh_from_gaussians(gaussians)
    except ValueError:  # no surface at the level: nothing to measure
        return {k: float("nan") for k in COLUMNS}
    return surface_metrics(pred, target)


def aggregate(rows: list[dict]) -> list[dict]:
    """Per objects set and variant: objects with a surface and the mean of each metric over them.

    Returns:
        [{"split", "variant", "with_surface", "objects", "chamfer", ...}] in order of appearance.
    """
    out = []
    for split, variant in dict.fromkeys((r.get("split", "test"), r["variant"]) for r in rows):
        group = [r for r in rows if r.get("split", "test") == split and r["variant"] == variant]
        sel = [r for r in group if math.isfinite(r["chamfer"])]
        out.append({"split": split, "variant": variant, "with_surface": len(sel), "objects": len(group),
                    **{k: float(np.mean([r[k] for r in sel])) if sel else float("nan") for k in COLUMNS}})  # fmt: skip
    return out
