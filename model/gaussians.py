"""3D Gaussians: the tensor layout shared by LGM, the rasterizer and the feedback loop, the
rotation maths, and the standard 3D Gaussian Splatting ``.ply`` file.

Layout ``[..., N, 14]`` of ACTIVATED values (as LGM's ``forward_gaussians`` returns them):

    0:3 xyz | 3 opacity in (0, 1) | 4:7 scale (> 0) | 7:11 rotation quaternion (w, x, y, z), unit |
    11:14 rgb in [0, 1]

The ``.ply`` stores the PRE-activation values 3DGS viewers expect: ``opacity`` as a logit,
``scale_i`` as logs, colour as the degree-0 spherical-harmonic coefficient
``f_dc = (rgb - 0.5) / C0`` with ``C0 = 0.28209479177387814``, plus unused normals.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from data_pipeline.atomic import atomic_write_bytes

SH_C0 = 0.28209479177387814
NUM_CHANNELS = 14
XYZ, OPACITY, SCALE, ROTATION, RGB = slice(0, 3), slice(3, 4), slice(4, 7), slice(7, 11), slice(11, 14)

# The property order of 3DGS's ``save_ply`` with SH degree 0 (graphdeco-inria/gaussian-splatting).
PLY_PROPERTIES = (
    "x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
    "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3",
)  # fmt: skip
_EPS = 1e-7


def quaternion_multiply(q1: torch.Tensor, q2: torch.Tensor) -> torch.Tensor:
    """Hamilton product ``q1 q2`` of quaternions (w, x, y, z): the rotation q2, then q1.

    Args:
        q1, q2: [..., 4] broadcastable.
    Returns:
        [..., 4]
    """
    w1, x1, y1, z1 = q1.unbind(-1)
    w2, x2, y2, z2 = q2.unbind(-1)
    return torch.stack(
        [
            w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
            w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
            w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
            w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2,
        ],
        -1,
    )


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrix of a quaternion (w, x, y, z), normalised here along its last dimension.

    Args:
        q: [..., 4]
    Returns:
        [..., 3, 3]
    """
    w, x, y, z = torch.nn.functional.normalize(q, dim=-1).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        -1,
    ).reshape(*q.shape[:-1], 3, 3)  # fmt: skip


def matrix_to_quaternion(R: torch.Tensor) -> torch.Tensor:
    """Unit quaternion (w, x, y, z) of a proper rotation matrix, the inverse of
    :func:`quaternion_to_matrix` up to sign (Shepperd's method: the largest of ``|w|, |x|,
    |y|, |z|`` is taken from the diagonal, the others from the off-diagonal terms).

    Args:
        R: [..., 3, 3] rotation (det +1).
    Returns:
        [..., 4]
    """
    m = R.reshape(*R.shape[:-2], 9).unbind(-1)
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m
    candidates = torch.stack(
        [
            torch.stack([1 + m00 + m11 + m22, m21 - m12, m02 - m20, m10 - m01], -1),  # from w
            torch.stack([m21 - m12, 1 + m00 - m11 - m22, m01 + m10, m02 + m20], -1),  # from x
            torch.stack([m02 - m20, m01 + m10, 1 - m00 + m11 - m22, m12 + m21], -1),  # from y
            torch.stack([m10 - m01, m02 + m20, m12 + m21, 1 - m00 - m11 + m22], -1),  # from z
        ],
        -2,
    )  # [..., 4, 4]: row k = 4 q_k q, largest and best conditioned where |q_k| is largest
    diagonal = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
    best = diagonal.argmax(-1)[..., None, None].expand(*R.shape[:-2], 1, 4)
    return torch.nn.functional.normalize(candidates.gather(-2, best).squeeze(-2), dim=-1)


def covariance_3d(scale: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """World covariance of a Gaussian: ``Sigma = R S S^T R^T`` (3DGS, Kerbl et al. 2023, Eq. 6).

    Args:
        scale: [..., 3] standard deviations along the local axes.  rotation: [..., 4] (w, x, y, z).
    Returns:
        [..., 3, 3]
    """
    M = quaternion_to_matrix(rotation) * scale[..., None, :]
    return M @ M.transpose(-1, -2)


def check_gaussians(g: torch.Tensor, what: str = "gaussians") -> None:
    """Raise ValueError unless ``g`` has the ``[..., N, 14]`` layout."""
    if g.ndim < 2 or g.shape[-1] != NUM_CHANNELS:
        raise ValueError(f"{what}: expected [..., N, {NUM_CHANNELS}], got {tuple(g.shape)}")


def save_ply(g: torch.Tensor, path: str | os.PathLike) -> None:
    """Write Gaussians ``[N, 14]`` (activated) as a binary little-endian 3DGS ``.ply``, atomically.

    Properties in :data:`PLY_PROPERTIES` order, all float32; normals are 0.
    """
    check_gaussians(g)
    if g.ndim != 2:
        raise ValueError(f"save_ply writes one set of Gaussians [N, 14], got {tuple(g.shape)}")
    g = g.detach().to("cpu", torch.float64)
    n = g.shape[0]
    opacity = g[:, OPACITY].clamp(_EPS, 1 - _EPS)
    columns = torch.cat(
        [
            g[:, XYZ],
            torch.zeros(n, 3, dtype=g.dtype),
            (g[:, RGB] - 0.5) / SH_C0,
            torch.log(opacity / (1 - opacity)),
            torch.log(g[:, SCALE].clamp_min(1e-12)),
            torch.nn.functional.normalize(g[:, ROTATION], dim=-1),
        ],
        1,
    ).numpy()
    records = np.empty(n, dtype=[(name, "<f4") for name in PLY_PROPERTIES])
    for i, name in enumerate(PLY_PROPERTIES):
        records[name] = columns[:, i]
    header = "ply\nformat binary_little_endian 1.0\n"
    header += f"element vertex {n}\n"
    header += "".join(f"property float {name}\n" for name in PLY_PROPERTIES)
    header += "end_header\n"
    atomic_write_bytes(path, header.encode("ascii") + records.tobytes())


def _read_ply_header(f, path) -> tuple[int, list[str]]:
    if f.readline().strip() != b"ply":
        raise ValueError(f"{path}: not a .ply file (missing 'ply' magic)")
    count, names, fmt = None, [], None
    for raw in iter(f.readline, b""):
        line = raw.decode("ascii", errors="replace").split()
        if not line:
            continue
        if line[0] == "format":
            fmt = line[1]
        elif line[0] == "element":
            if line[1] != "vertex" or count is not None:
                raise ValueError(f"{path}: expected one 'vertex' element, got {line[1]!r}")
            count = int(line[2])
        elif line[0] == "property":
            if line[1] != "float":
                raise ValueError(f"{path}: property {line[-1]!r} is {line[1]}, expected float")
            names.append(line[2])
        elif line[0] == "end_header":
            break
    else:
        raise ValueError(f"{path}: header has no end_header")
    if fmt != "binary_little_endian":
        raise ValueError(f"{path}: format {fmt!r} unsupported (binary_little_endian only)")
    if count is None:
        raise ValueError(f"{path}: no vertex element")
    return count, names


def load_ply(path: str | os.PathLike) -> torch.Tensor:
    """Read a 3DGS ``.ply`` (SH degree 0 used; higher-order ``f_rest_*`` ignored).

    Returns:
        [N, 14] float32 activated Gaussians (sigmoid opacity, exp scale, unit quaternion,
        ``rgb = C0 f_dc + 0.5``).
    """
    with open(path, "rb") as f:
        count, names = _read_ply_header(f, path)
        missing = [n for n in PLY_PROPERTIES if n not in names and not n.startswith("n")]
        if missing:
            raise ValueError(f"{path}: missing properties {missing}")
        data = f.read()
    dtype = np.dtype([(name, "<f4") for name in names])
    if len(data) < count * dtype.itemsize:
        raise ValueError(f"{path}: truncated ({len(data)} bytes for {count} vertices)")
    rec = np.frombuffer(data, dtype=dtype, count=count)

    def cols(*keys):
        return torch.from_numpy(np.stack([rec[k].astype(np.float32) for k in keys], -1))

    rot = torch.nn.functional.normalize(cols("rot_0", "rot_1", "rot_2", "rot_3"), dim=-1)
    return torch.cat(
        [
            cols("x", "y", "z"),
            torch.sigmoid(cols("opacity")),
            torch.exp(cols("scale_0", "scale_1", "scale_2")),
            rot,
            SH_C0 * cols("f_dc_0", "f_dc_1", "f_dc_2") + 0.5,
        ],
        -1,
    )
