"""Test oracle: 3D Gaussians sampled on the surface of a real mesh, written as a standard
INRIA-layout 3DGS .ply with plyfile directly (independently of model.gaussians_ply).

Gaussians are flat discs in the surface (the shape 3DGS converges to on opaque surfaces):
centres evenly spread over the mesh (trimesh.sample.sample_surface_even), tangent scale the
mean spacing, normal scale a tenth of it, opacity 0.8, colour a smooth function of position
(:func:`colour_at`), so a mesh made from them can be checked against the source mesh and
its colours against the function.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trimesh
from plyfile import PlyData, PlyElement
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation
from data_paths import ASSETS

SH_C0 = 0.28209479177387814


def colour_at(p: np.ndarray) -> np.ndarray:
    return 0.5 + 0.4 * np.sin(np.stack([3 * p[:, 0] + 1, 4 * p[:, 1] - 2, 5 * p[:, 2]], -1))


def normalised_mesh(name: str) -> trimesh.Trimesh:
    """The asset centred with its longest side 1 (file coordinates, no axis change)."""
    mesh = trimesh.load(str(ASSETS / name), force="mesh", process=False)
    lo, hi = mesh.bounds
    return trimesh.Trimesh((mesh.vertices - (lo + hi) / 2) / (hi - lo).max(), mesh.faces, process=False)


def write_surface_gaussians(mesh: trimesh.Trimesh, n: int, path: Path, seed: int = 0) -> int:
    """Write about ``n`` surface Gaussians of ``mesh`` to ``path``; returns how many."""
    pts, fid = trimesh.sample.sample_surface_even(mesh, n, seed=seed)
    normals = mesh.face_normals[fid]
    z = np.array([0.0, 0.0, 1.0])
    axis = np.cross(z, normals)
    sin = np.linalg.norm(axis, axis=1)
    axis = np.where(sin[:, None] > 1e-9, axis / np.maximum(sin, 1e-12)[:, None], [1.0, 0.0, 0.0])
    quat = Rotation.from_rotvec(axis * np.arctan2(sin, normals @ z)[:, None]).as_quat()  # x y z w
    spacing = np.sqrt(mesh.area / len(pts))
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2",
             *(f"f_rest_{i}" for i in range(45)), "opacity", "scale_0", "scale_1", "scale_2",
             "rot_0", "rot_1", "rot_2", "rot_3"]  # fmt: skip
    rec = np.zeros(len(pts), dtype=[(k, "f4") for k in names])
    rec["x"], rec["y"], rec["z"] = pts.T
    for i, c in enumerate(((colour_at(pts) - 0.5) / SH_C0).T):
        rec[f"f_dc_{i}"] = c
    rec["opacity"] = np.log(0.8 / 0.2)
    rec["scale_0"] = rec["scale_1"] = np.log(spacing)
    rec["scale_2"] = np.log(0.1 * spacing)
    rec["rot_0"], rec["rot_1"], rec["rot_2"], rec["rot_3"] = quat[:, 3], quat[:, 0], quat[:, 1], quat[:, 2]
    PlyData([PlyElement.describe(rec, "vertex")]).write(str(path))
    return len(pts)


def chamfer_and_fscore(a: trimesh.Trimesh, b: trimesh.Trimesh, threshold: float, n: int = 30000):
    """(Chamfer = mean of both directions' mean nearest distance, F-score at ``threshold``)
    between surface samples of ``a`` and ``b``."""
    pa = trimesh.sample.sample_surface(a, n, seed=1)[0]
    pb = trimesh.sample.sample_surface(b, n, seed=2)[0]
    dab, dba = cKDTree(pb).query(pa)[0], cKDTree(pa).query(pb)[0]
    precision, recall = (dab < threshold).mean(), (dba < threshold).mean()
    return 0.5 * (dab.mean() + dba.mean()), 2 * precision * recall / max(precision + recall, 1e-12)
