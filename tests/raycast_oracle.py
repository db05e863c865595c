"""Test helpers: ground truth by ray casting with trimesh's ray-triangle intersector, and a
one-thread torch fixture.

trimesh's pure-Python caster wants an ``rtree`` index for its broad phase, and neither
``rtree`` nor ``embreex`` is installed here; :class:`BruteForceTree` answers the same
``intersection`` queries by testing every triangle's bounding box, so the narrow phase (the
actual intersection maths) is still trimesh's.
"""


import numpy as np
import trimesh
from trimesh.ray.ray_triangle import ray_triangle_id

from common import conventions as C
from data_paths import ASSETS


class BruteForceTree:
    """Duck-typed stand-in for an rtree index of triangle bounding boxes (interleaved)."""

    def __init__(self, triangles: np.ndarray):
        self.boxes = np.hstack([triangles.min(1), triangles.max(1)])  # [T, 6]
        self.bounds = np.hstack([self.boxes[:, :3].min(0), self.boxes[:, 3:].max(0)])

    def intersection(self, query):
        q = np.asarray(query)
        overlap = (self.boxes[:, :3] <= q[3:]).all(1) & (self.boxes[:, 3:] >= q[:3]).all(1)
        return np.nonzero(overlap)[0]


def normalised_mesh(name: str) -> trimesh.Trimesh:
    """An asset from tests/assets, normalised into [-0.5, 0.5]^3 (docs/design.md section 2)."""
    mesh = trimesh.load(ASSETS / name, force="mesh")
    scale, offset = C.normalization_from_bounds(*mesh.bounds)
    mesh.apply_scale(scale)
    mesh.apply_translation(offset)
    return mesh


def first_hits(mesh: trimesh.Trimesh, origins: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """First surface point of each ray in front of its origin.

    Args:
        origins, directions: [R, 3].
    Returns:
        [R, 3] hit points, NaN where the ray misses.
    """
    triangles = np.asarray(mesh.triangles, dtype=np.float64)
    tri, ray, loc = ray_triangle_id(
        triangles, origins, directions, tree=BruteForceTree(triangles), multiple_hits=True
    )
    hits = np.full(origins.shape, np.nan)
    dist = np.full(len(origins), np.inf)
    t = np.einsum("ij,ij->i", loc - origins[ray], directions[ray])
    for r, p, ti in zip(ray, loc, t):
        if 0 < ti < dist[r]:
            dist[r], hits[r] = ti, p
    return hits


def one_torch_thread():
    """Generator for a pytest fixture: run with one torch thread, then restore the setting.

    On the project's 2-core machines shared by several jobs, torch's OpenMP threads spin
    against each other and small ops get 10-20x slower; results do not depend on it.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
