"""A triangle mesh from 3D Gaussians: their opacity field on a grid, marching cubes, cleaning,
vertex colours from the nearby Gaussians.

1. **Field.** ``F(x) = sum_i o_i exp(-0.5 (x - mu_i)^T Sigma_i^-1 (x - mu_i))`` (opacity-weighted
   Gaussian densities, as DreamGaussian's and LGM's mesh export compute it) on a regular grid
   over the Gaussians (``resolution`` voxels along the longest side, cubic voxels, 3 empty voxels
   of margin). Each Gaussian is splatted into the voxels within 3 sigma of its centre, at most
   ``MAX_RADIUS_VOXELS`` voxels away (larger, faint Gaussians are cut there). Every Gaussian is
   first widened to at least half a voxel (``Sigma + (0.5 voxel)^2 I``, opacity kept): 3DGS
   surface Gaussians are flat discs, often far thinner than a voxel, and a grid sampling such a
   shell between its voxel centres would see holes in it. This thickens the surface by about
   a voxel (the iso-surface sits ~1 voxel outside the Gaussians' plane).
2. **Surface.** Voxels that no path from the border reaches through ``F <= level`` (the object's
   inside, ``scipy.ndimage.binary_fill_holes``, after a morphological closing of 2 voxels that
   bridges the gaps between sparse Gaussians) are raised above ``level``, so a closed shell of
   surface Gaussians gives one outer surface, not an outer and an inner one; then
   ``skimage.measure.marching_cubes`` at ``level`` (triangles wound so normals point outwards).
3. **Cleaning.** Connected components smaller than ``min_component`` of the largest (in faces)
   are removed; Taubin smoothing (volume-preserving, a few iterations); optional quadric
   decimation to ``target_faces`` (``fast-simplification``, through trimesh).
4. **Colour.** Each vertex gets the mean colour of its 8 nearest Gaussians (centres), weighted
   by each Gaussian's opacity-weighted density at the vertex (the nearest one alone where all
   weights vanish).

Input and output are in the Gaussians' frame (the project's world: +Z up); the writers in
:mod:`inference.export_mesh` move it to each file format's convention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.gaussians import OPACITY, RGB, ROTATION, SCALE, XYZ, check_gaussians, quaternion_to_matrix

MAX_RADIUS_VOXELS = 8
MIN_SCALE_VOXELS = 0.5
CLOSING_VOXELS = 2
MARGIN_VOXELS = 3
MIN_OPACITY = 0.005  # Gaussians fainter than this are ignored
SPLAT_CHUNK = 2_000_000  # (Gaussian, voxel) pairs per vectorised step


@dataclass(frozen=True)
class MeshSettings:
    resolution: int = 128
    level: float = 1.0
    min_component: float = 0.1
    smooth_iterations: int = 5
    target_faces: int = 100_000  # 0: no decimation


@dataclass(frozen=True)
class Grid:
    origin: np.ndarray  # [3] world position of voxel (0, 0, 0)
    voxel: float
    shape: tuple[int, int, int]


def _grid_for(xyz: torch.Tensor, sigma3: torch.Tensor, resolution: int) -> Grid:
    """A grid over the centres and their 3-sigma reach (capped as the splatting caps it)."""
    centres = xyz.double().numpy()
    extent = float(np.max(centres.max(0) - centres.min(0)))
    if not extent > 0:
        raise ValueError("the Gaussians' centres span no volume: cannot build a grid over them")
    reach = sigma3.double().clamp_max(MAX_RADIUS_VOXELS * extent / (resolution - 1)).numpy()[:, None]
    lo, hi = (centres - reach).min(0), (centres + reach).max(0)
    voxel = float(np.max(hi - lo)) / (resolution - 1)
    origin = lo - MARGIN_VOXELS * voxel
    shape = tuple(int(n) for n in np.ceil((hi - lo) / voxel).astype(int) + 1 + 2 * MARGIN_VOXELS)
    return Grid(origin, voxel, shape)


def opacity_field(gaussians: torch.Tensor, resolution: int = 128) -> tuple[np.ndarray, Grid]:
    """``F`` (module docstring, step 1) on a grid over ``gaussians`` [N, 14] (activated).

    Returns:
        (field [X, Y, Z] float32, its grid).
    """
    check_gaussians(gaussians)
    g = gaussians.detach().float().cpu()
    g = g[g[:, OPACITY][:, 0] > MIN_OPACITY]
    if g.shape[0] == 0:
        raise ValueError(f"no Gaussian has opacity above {MIN_OPACITY}: nothing to mesh")
    xyz, opacity, scale = g[:, XYZ], g[:, OPACITY][:, 0], g[:, SCALE]
    grid = _grid_for(xyz, 3.0 * scale.max(-1).values, resolution)
    scale = torch.sqrt(scale**2 + (MIN_SCALE_VOXELS * grid.voxel) ** 2)  # Sigma + (s_min)^2 I
    rot = quaternion_to_matrix(g[:, ROTATION])
    inv_cov = (rot / scale[:, None, :] ** 2) @ rot.transpose(1, 2)  # R S^-2 R^T
    sigma3 = 3.0 * scale.max(-1).values
    origin = torch.from_numpy(grid.origin).float()
    shape = torch.tensor(grid.shape)
    field = torch.zeros(int(np.prod(grid.shape)), dtype=torch.float32)
    centre = torch.round((xyz - origin) / grid.voxel).long()
    radius = torch.ceil(sigma3 / grid.voxel).long().clamp(1, MAX_RADIUS_VOXELS)
    for r in radius.unique().tolist():
        ids = torch.nonzero(radius == r)[:, 0]
        axis = torch.arange(-r, r + 1)
        offsets = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
        step = max(1, SPLAT_CHUNK // offsets.shape[0])
        for chunk in ids.split(step):
            idx = centre[chunk, None, :] + offsets[None]  # [n, K, 3]
            inside = ((idx >= 0) & (idx < shape)).all(-1)
            d = origin + idx.float() * grid.voxel - xyz[chunk, None, :]
            m = torch.einsum("nki,nij,nkj->nk", d, inv_cov[chunk], d)
            value = opacity[chunk, None] * torch.exp(-0.5 * m)
            keep = inside & (m < 9.0)
            flat = (idx[..., 0] * shape[1] + idx[..., 1]) * shape[2] + idx[..., 2]
            field.index_add_(0, flat[keep], value[keep])
    return field.reshape(grid.shape).numpy(), grid


def _surface(field: np.ndarray, grid: Grid, level: float):
    from scipy import ndimage
    from skimage import measure

    if not field.max() > level:
        raise ValueError(f"the opacity field never exceeds level {level} (max {field.max():.3g}): "
                         "lower the level or check the Gaussians")  # fmt: skip
    occupied = field > level
    closed = ndimage.binary_closing(occupied, iterations=CLOSING_VOXELS)  # bridges sampling gaps
    inside = ndimage.binary_fill_holes(closed) & ~occupied
    field = np.where(inside, np.float32(2 * level + 1), field)
    verts, faces, _, _ = measure.marching_cubes(field, level, spacing=(grid.voxel,) * 3)
    return verts + grid.origin, faces[:, ::-1]  # skimage winds them inwards for 'descent'


def _clean(mesh, settings: MeshSettings):
    import trimesh

    parts = mesh.split(only_watertight=False)
    if len(parts) > 1:
        largest = max(len(p.faces) for p in parts)
        mesh = trimesh.util.concatenate([p for p in parts if len(p.faces) >= settings.min_component * largest])
    if settings.smooth_iterations:
        trimesh.smoothing.filter_taubin(mesh, iterations=settings.smooth_iterations)
    if settings.target_faces and len(mesh.faces) > settings.target_faces:
        mesh = mesh.simplify_quadric_decimation(face_count=settings.target_faces)
    return mesh


def vertex_colours(vertices: np.ndarray, gaussians: torch.Tensor, k: int = 8) -> np.ndarray:
    """Colour [V, 3] in [0, 1] of each vertex from its ``k`` nearest Gaussians (step 4)."""
    from scipy.spatial import cKDTree

    g = gaussians.detach().double().cpu()
    g = g[g[:, OPACITY][:, 0] > MIN_OPACITY]
    k = min(k, g.shape[0])
    _, nearest = cKDTree(g[:, XYZ].numpy()).query(vertices, k=k)
    nearest = torch.from_numpy(nearest.reshape(len(vertices), k))
    rot = quaternion_to_matrix(g[:, ROTATION])
    inv_cov = (rot / g[:, SCALE].clamp_min(1e-8)[:, None, :] ** 2) @ rot.transpose(1, 2)
    d = torch.from_numpy(vertices)[:, None, :] - g[nearest][..., XYZ]
    m = torch.einsum("vki,vkij,vkj->vk", d, inv_cov[nearest], d)
    w = g[nearest][..., OPACITY][..., 0] * torch.exp(-0.5 * m)
    w = torch.where(w.sum(-1, keepdim=True) > 1e-12, w, torch.nn.functional.one_hot(torch.zeros(
        len(vertices), dtype=torch.long), k).double())  # fmt: skip
    rgb = (w[..., None] * g[nearest][..., RGB]).sum(1) / w.sum(-1, keepdim=True)
    return rgb.clamp(0, 1).numpy()


def mesh_from_gaussians(gaussians: torch.Tensor, settings: MeshSettings = MeshSettings()):
    """A ``trimesh.Trimesh`` with vertex colours, in the Gaussians' frame (see module docstring).

    Args:
        gaussians: [N, 14] activated (``model.gaussians`` layout).
    """
    import trimesh

    field, grid = opacity_field(gaussians, settings.resolution)
    verts, faces = _surface(field, grid, settings.level)
    mesh = _clean(trimesh.Trimesh(verts, faces, process=True), settings)
    rgb = vertex_colours(np.asarray(mesh.vertices, dtype=np.float64), gaussians)
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=np.round(rgb * 255).astype(np.uint8))
    return mesh
