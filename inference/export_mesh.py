"""Export a triangle mesh with vertex colours from a 3DGS ``.ply``.

    python -m inference.export_mesh --gaussians out/chair/gaussians.ply --output out/chair/mesh.glb \\
        [--resolution 128] [--level 1.0] [--target-faces 100000] [--smooth 5] [--min-component 0.1]

Reads any layout :func:`model.gaussians_ply.load_ply` reads (ours, INRIA's, LGM's); the method
is :mod:`inference.mesh_from_gaussians`. The output format follows the suffix, each in its
customary frame (the Gaussians are in the project's world frame, +Z up):

* ``.glb``: +Y up, as glTF 2.0 specifies (world ``(x, y, z)`` -> glTF ``(x, z, -y)``);
  vertex colours as ``COLOR_0``.
* ``.obj``: +Y up too (the convention of OBJ importers: Blender's default "Up: Y", MeshLab);
  vertex colours as the ``v x y z r g b`` extension.
* ``.ply``: +Z up, the world frame itself (as ``gaussians.ply``); vertex colours as
  ``red green blue alpha`` uchar.

Written atomically. Exit 2 with a message for a bad input file or an unknown suffix.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from common.atomic import atomic_write_bytes
from inference.mesh_from_gaussians import MeshSettings, mesh_from_gaussians

# world (+Z up) -> glTF/OBJ (+Y up): a -90 degree turn about +X
Z_UP_TO_Y_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
FORMATS = {".glb": ("glb", Z_UP_TO_Y_UP), ".obj": ("obj", Z_UP_TO_Y_UP), ".ply": ("ply", np.eye(3))}


def write_mesh(mesh, path: str | Path) -> None:
    """Write ``mesh`` (world frame, +Z up) to ``path`` in its format's frame, atomically."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"{path}: unknown mesh format {path.suffix!r}; use one of {sorted(FORMATS)}")
    file_type, axes = FORMATS[path.suffix.lower()]
    out = mesh.copy()
    out.vertices = np.asarray(mesh.vertices) @ axes.T
    data = out.export(file_type=file_type)
    atomic_write_bytes(path, data.encode("utf-8") if isinstance(data, str) else data)


def export_mesh(gaussians_path: str | Path, output: str | Path, settings: MeshSettings = MeshSettings()):
    """Read the Gaussians, build the mesh, write it. Returns the mesh (world frame)."""
    from model.gaussians_ply import load_ply

    if Path(output).suffix.lower() not in FORMATS:
        raise ValueError(f"{output}: unknown mesh format {Path(output).suffix!r}; use one of {sorted(FORMATS)}")
    mesh = mesh_from_gaussians(load_ply(gaussians_path), settings)
    write_mesh(mesh, output)
    return mesh


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = MeshSettings()
    p.add_argument("--gaussians", required=True, type=Path, help="3DGS .ply")
    p.add_argument("--output", required=True, type=Path, help="mesh file: .glb, .obj or .ply")
    p.add_argument("--resolution", type=int, default=d.resolution, help="voxels along the longest side")
    p.add_argument("--level", type=float, default=d.level, help="iso-level of the opacity field")
    p.add_argument("--target-faces", type=int, default=d.target_faces, help="decimate above this (0: never)")
    p.add_argument("--smooth", type=int, default=d.smooth_iterations, help="Taubin smoothing iterations")
    p.add_argument("--min-component", type=float, default=d.min_component,
                   help="drop parts with fewer faces than this fraction of the largest")  # fmt: skip
    args = p.parse_args(argv)
    settings = MeshSettings(args.resolution, args.level, args.min_component, args.smooth, args.target_faces)
    start = time.perf_counter()
    try:
        mesh = export_mesh(args.gaussians, args.output, settings)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.output}: {len(mesh.vertices)} vertices, {len(mesh.faces)} faces "
          f"({time.perf_counter() - start:.1f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
