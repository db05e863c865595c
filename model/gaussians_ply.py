"""The standard 3D Gaussian Splatting ``.ply`` file, read and written with ``plyfile`` (the
library the 3DGS codebases use).

Written: one ``vertex`` element, binary little-endian float32 properties in the order of
INRIA's ``save_ply`` (graphdeco-inria/gaussian-splatting) at SH degree 3:
``x y z nx ny nz f_dc_0..2 f_rest_0..44 opacity scale_0..2 rot_0..3``. Values are the
PRE-activation ones viewers expect: ``opacity`` a logit, ``scale_i`` logs, colour the degree-0
SH coefficient ``f_dc = (rgb - 0.5) / C0``; normals and the higher SH bands (``f_rest_*``) are
0, so INRIA's loader (``max_sh_degree = 3``), LGM's reader (reads by name) and web viewers
all open it. Positions are in the project's world frame: +Z up (docs/evaluation.md says how
to view it upright).

Read: our layout, INRIA's (any SH degree: the DC term is kept, higher bands are dropped with
a warning when they are not all zero) and LGM's (no normals, no ``f_rest``). Anything else
(a second element, list or non-float32 properties, a missing property) is a ``ValueError``
naming the file.
"""

from __future__ import annotations

import io
import os
import re
import warnings

import numpy as np
import torch

from common.atomic import atomic_write_bytes
from model.gaussians import OPACITY, RGB, ROTATION, SCALE, SH_C0, XYZ, check_gaussians

SH_REST = 45  # 3 x 15 coefficients of SH bands 1..3 (INRIA's default degree 3)
PLY_PROPERTIES = (
    "x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2",
    *(f"f_rest_{i}" for i in range(SH_REST)),
    "opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3",
)  # fmt: skip
REQUIRED = ("x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
            "rot_0", "rot_1", "rot_2", "rot_3")  # fmt: skip
_OPTIONAL = re.compile(r"^(nx|ny|nz|f_rest_\d+)$")
_EPS = 1e-7


def save_ply(g: torch.Tensor, path: str | os.PathLike) -> None:
    """Write Gaussians ``[N, 14]`` (activated) as a binary little-endian 3DGS ``.ply``, atomically."""
    from plyfile import PlyData, PlyElement

    check_gaussians(g)
    if g.ndim != 2:
        raise ValueError(f"save_ply writes one set of Gaussians [N, 14], got {tuple(g.shape)}")
    g = g.detach().to("cpu", torch.float64)
    opacity = g[:, OPACITY].clamp(_EPS, 1 - _EPS)
    values = {
        **dict(zip("xyz", g[:, XYZ].T)),
        **{f"f_dc_{i}": (g[:, RGB][:, i] - 0.5) / SH_C0 for i in range(3)},
        "opacity": torch.log(opacity / (1 - opacity))[:, 0],
        **{f"scale_{i}": torch.log(g[:, SCALE][:, i].clamp_min(1e-12)) for i in range(3)},
        **{f"rot_{i}": q for i, q in enumerate(torch.nn.functional.normalize(g[:, ROTATION], dim=-1).T)},
    }  # fmt: skip
    records = np.zeros(g.shape[0], dtype=[(name, "<f4") for name in PLY_PROPERTIES])
    for name, column in values.items():
        records[name] = column.numpy()
    buf = io.BytesIO()
    PlyData([PlyElement.describe(records, "vertex")], byte_order="<").write(buf)
    atomic_write_bytes(path, buf.getvalue())


def _vertex_records(path) -> np.ndarray:
    from plyfile import PlyData, PlyParseError

    try:
        ply = PlyData.read(str(path))
    except (PlyParseError, ValueError, UnicodeDecodeError, EOFError) as err:
        raise ValueError(f"{path}: not a readable .ply file ({err})") from err
    names = [e.name for e in ply.elements]
    if names != ["vertex"]:
        raise ValueError(f"{path}: expected exactly one 'vertex' element (3DGS layout), got {names}")
    vertex = ply["vertex"]
    for prop in vertex.properties:
        if not hasattr(prop, "val_dtype") or hasattr(prop, "len_dtype"):
            raise ValueError(f"{path}: property {prop.name!r} is a list; 3DGS files have float scalars")
        if np.dtype(prop.val_dtype).kind != "f" or np.dtype(prop.val_dtype).itemsize != 4:
            raise ValueError(f"{path}: property {prop.name!r} is {prop.val_dtype}, expected float (float32)")
    present = [p.name for p in vertex.properties]
    missing = [n for n in REQUIRED if n not in present]
    if missing:
        raise ValueError(f"{path}: missing properties {missing}")
    unknown = [n for n in present if n not in REQUIRED and not _OPTIONAL.match(n)]
    if unknown:
        raise ValueError(f"{path}: unknown properties {unknown} (3DGS layouts only)")
    return vertex.data


def load_ply(path: str | os.PathLike) -> torch.Tensor:
    """Read a 3DGS ``.ply`` (ours, INRIA's or LGM's layout).

    Returns:
        [N, 14] float32 activated Gaussians (sigmoid opacity, exp scale, unit quaternion,
        ``rgb = C0 f_dc + 0.5``).
    """
    rec = _vertex_records(path)
    rest = [n for n in rec.dtype.names if n.startswith("f_rest_")]
    if rest:
        if len(rest) % 3 or len(rest) // 3 + 1 not in (4, 9, 16):
            raise ValueError(f"{path}: {len(rest)} f_rest_* properties is no SH degree 1-3 layout")
        if any(np.any(rec[n] != 0) for n in rest):
            degree = int(np.sqrt(len(rest) // 3 + 1)) - 1
            warnings.warn(f"{path}: SH bands 1..{degree} (f_rest_*) dropped: only the DC colour is used",
                          stacklevel=2)  # fmt: skip

    def cols(*keys):
        return torch.from_numpy(np.stack([np.asarray(rec[k], dtype=np.float32) for k in keys], -1))

    return torch.cat(
        [
            cols("x", "y", "z"),
            torch.sigmoid(cols("opacity")),
            torch.exp(cols("scale_0", "scale_1", "scale_2")),
            torch.nn.functional.normalize(cols("rot_0", "rot_1", "rot_2", "rot_3"), dim=-1),
            SH_C0 * cols("f_dc_0", "f_dc_1", "f_dc_2") + 0.5,
        ],
        -1,
    )
