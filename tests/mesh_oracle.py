"""Independent reference for rendered masks and CCMs: ray casting into the source mesh.

The mesh is read by trimesh (not Blender), moved into the normalised world with the
recorded scale and offset and the importer's axis convention, and intersected with the rays
of :func:`common.conventions.camera_rays` (Moller-Trumbore). trimesh's own ray module
needs rtree or embree, absent here, so triangles are culled by their projected bounding
box and the exact ray-triangle test runs on the remaining (pixel, triangle) pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh
from scipy import ndimage

from common import conventions as C

# Importers' axis conventions (file coordinates -> +Z-up world): glTF is +Y up by its
# specification, OBJ +Y up unless the render was asked to keep +Z, PLY is taken as is.
Y_UP_TO_Z_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])


def expected_axes(mesh_path, obj_up_axis: str = "y") -> np.ndarray:
    """The 3x3 rotation from file coordinates to the +Z-up world for this file type."""
    suffix = Path(mesh_path).suffix.lower()
    if suffix in (".glb", ".gltf") or (suffix == ".obj" and obj_up_axis == "y"):
        return Y_UP_TO_Z_UP
    return np.eye(3)


def load_world_mesh(mesh_path, scale: float, offset, obj_up_axis: str = "y") -> trimesh.Trimesh:
    """The source mesh in the normalised world: ``p' = scale * A p + offset``, A from the format."""
    mesh = trimesh.load(str(mesh_path), force="mesh", process=False)
    axes = expected_axes(mesh_path, obj_up_axis)
    vertices = scale * np.asarray(mesh.vertices, dtype=np.float64) @ axes.T + np.asarray(offset)
    return trimesh.Trimesh(vertices=vertices, faces=mesh.faces, visual=mesh.visual, process=False)


def cast_rays(mesh: trimesh.Trimesh, c2w, K, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """First hit of each pixel-centre ray.

    Returns:
        hit [H, W] bool, points [H, W, 3] world coordinates (NaN where no hit).
    """
    hit, points, _ = cast_rays_faces(mesh, c2w, K, height, width)
    return hit, points


def cast_rays_faces(mesh: trimesh.Trimesh, c2w, K, height: int, width: int):
    """:func:`cast_rays` plus the index of the triangle each ray hits first (-1: none).

    Returns:
        hit [H, W] bool, points [H, W, 3], faces [H, W] int.
    """
    origins, dirs = C.camera_rays(c2w, K, height, width)
    origin = origins[0, 0]
    tri = np.asarray(mesh.triangles, dtype=np.float64)  # [T, 3, 3]
    # Project the vertices to find, per triangle, the pixel centres its bounding box covers.
    w2c = np.linalg.inv(np.asarray(c2w, dtype=np.float64))
    cam = tri @ w2c[:3, :3].T + w2c[:3, 3]
    if (cam[..., 2] <= 0).any():
        raise ValueError("oracle assumes the whole mesh lies in front of the camera")
    pix = cam @ np.asarray(K, dtype=np.float64).T
    pix = pix[..., :2] / pix[..., 2:]
    lo = np.clip(np.floor(pix.min(1) - 0.5).astype(int) - 1, 0, [width - 1, height - 1])
    hi = np.clip(np.ceil(pix.max(1) - 0.5).astype(int) + 1, 0, [width - 1, height - 1])
    nu, nv = hi[:, 0] - lo[:, 0] + 1, hi[:, 1] - lo[:, 1] + 1
    counts = nu * nv
    tri_id = np.repeat(np.arange(len(tri)), counts)
    local = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    u = lo[tri_id, 0] + local % nu[tri_id]
    v = lo[tri_id, 1] + local // nu[tri_id]
    t = moller_trumbore(origin, dirs[v, u], tri[tri_id])
    meets = np.isfinite(t)
    pixel, t, tri_id = (v * width + u)[meets], t[meets], tri_id[meets]
    order = np.lexsort((t, pixel))  # per pixel, nearest first
    first = order[np.r_[True, pixel[order][1:] != pixel[order][:-1]]] if len(order) else order
    best = np.full(height * width, np.inf)
    faces = np.full(height * width, -1)
    best[pixel[first]], faces[pixel[first]] = t[first], tri_id[first]
    best, faces = best.reshape(height, width), faces.reshape(height, width)
    hit = np.isfinite(best)
    points = np.full((height, width, 3), np.nan)
    points[hit] = origin + best[hit, None] * dirs[hit]
    return hit, points, faces


def moller_trumbore(origin, dirs, tri, eps: float = 1e-12) -> np.ndarray:
    """Ray parameter t of each (ray, triangle) pair, ``inf`` where they do not meet.

    Args:
        origin: [3].  dirs: [P, 3] unit.  tri: [P, 3, 3].
    Returns:
        t [P]
    """
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    p = np.cross(dirs, e2)
    det = np.einsum("ij,ij->i", e1, p)
    ok = np.abs(det) > eps
    inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
    s = origin - tri[:, 0]
    b1 = np.einsum("ij,ij->i", s, p) * inv
    q = np.cross(s, e1)
    b2 = np.einsum("ij,ij->i", dirs, q) * inv
    t = np.einsum("ij,ij->i", e2, q) * inv
    ok &= (b1 >= 0) & (b2 >= 0) & (b1 + b2 <= 1) & (t > 0)
    return np.where(ok, t, np.inf)


def texture_colours(mesh: trimesh.Trimesh, faces: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Base-colour texel (sRGB in [0, 1], nearest) at surface points, from the mesh's UVs.

    Args:
        faces: [P] triangle indices.  points: [P, 3] points on those triangles.
    Returns:
        [P, 3]
    """
    material = mesh.visual.material
    image = (getattr(material, "baseColorTexture", None) or material.image).convert("RGB")
    texels = np.asarray(image, dtype=np.float64) / 255
    bary = trimesh.triangles.points_to_barycentric(mesh.triangles[faces], points)
    uv = np.einsum("pk,pkj->pj", bary, np.asarray(mesh.visual.uv)[mesh.faces[faces]])
    h, w = texels.shape[:2]
    uv = np.mod(uv, 1.0)  # glTF/OBJ default wrap mode: repeat
    cols = np.clip((uv[:, 0] * w).astype(int), 0, w - 1)
    rows = np.clip(((1.0 - uv[:, 1]) * h).astype(int), 0, h - 1)  # v = 0 is the image's bottom row
    return texels[rows, cols]


def interior_colours(rgba, c2w, K, mesh, erosion: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Rendered colours and the texels under them, on the opaque interior eroded by ``erosion``.

    Returns:
        rendered [P, 3], texels [P, 3], sRGB in [0, 1].
    """
    h, w = rgba.shape[:2]
    hit, points, faces = cast_rays_faces(mesh, c2w, K, h, w)
    interior = ndimage.binary_erosion((rgba[..., 3] == 255) & hit, iterations=erosion)
    return rgba[interior, :3] / 255, texture_colours(mesh, faces[interior], points[interior])


@dataclass
class FrameComparison:
    iou: float  # alpha >= threshold vs ray hits
    median_error: float  # of |ccm - (hit + 0.5)| over eroded interior pixels (object extent = 1)
    outlier_fraction: float  # interior pixels off by more than ``outlier``
    interior_pixels: int


def compare_frame(rgba, ccm, c2w, K, mesh, alpha_threshold: int = 128, erosion: int = 2,
                  outlier: float = 1.0 / 20.0) -> FrameComparison:
    """Compare one rendered frame (RGBA uint8 [H,W,4], CCM [H,W,3]) with the ray-cast mesh."""
    h, w = rgba.shape[:2]
    hit, points = cast_rays(mesh, c2w, K, h, w)
    mask = rgba[..., 3] >= alpha_threshold
    iou = float((mask & hit).sum() / max((mask | hit).sum(), 1))
    interior = ndimage.binary_erosion(mask & hit, iterations=erosion)
    err = np.linalg.norm(ccm[interior] - C.world_to_ccm(points[interior]), axis=-1)
    return FrameComparison(
        iou=iou,
        median_error=float(np.median(err)) if err.size else float("nan"),
        outlier_fraction=float((err > outlier).mean()) if err.size else float("nan"),
        interior_pixels=int(interior.sum()),
    )


def main() -> None:
    """Print the oracle comparison per mesh: ``python tests/mesh_oracle.py MESH... [--resolution 128]``."""
    import argparse

    from data_pipeline.render import RenderSettings, render_object

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("meshes", type=Path, nargs="+")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--frames", type=int, nargs="+", default=[0, 9])
    args = parser.parse_args()
    settings = RenderSettings(resolution=args.resolution, samples=args.samples,
                              frames=tuple(args.frames), denoise=False)
    print("| mesh | frames | IoU min / mean | median CCM error max | > 1/20 max | warnings |")
    print("|---|---|---|---|---|---|")
    for path in args.meshes:
        orbits = render_object(path, path.stem.replace(".", "_"), settings)
        norm = orbits[0].meta["normalization"]
        mesh = load_world_mesh(path, norm["scale"], norm["offset"])
        rows = [compare_frame(o.rgba[i], o.ccm[i], o.c2w[i], o.K[i], mesh)
                for o in orbits for i in range(len(o.rgba))]
        ious = [r.iou for r in rows]
        print(f"| {path.name} | {len(rows)} | {min(ious):.4f} / {np.mean(ious):.4f} "
              f"| {max(r.median_error for r in rows):.1e} | {max(r.outlier_fraction for r in rows):.4f} "
              f"| {'; '.join(orbits[0].meta['warnings']) or '-'} |", flush=True)


if __name__ == "__main__":
    main()
