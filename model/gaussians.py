"""3D Gaussians: the tensor layout shared by LGM, the rasterizer and the feedback loop, and the
rotation maths (the ``.ply`` file: :mod:`model.gaussians_ply`).

Layout ``[..., N, 14]`` of ACTIVATED values (as LGM's ``forward_gaussians`` returns them):

    0:3 xyz | 3 opacity in (0, 1) | 4:7 scale (> 0) | 7:11 rotation quaternion (w, x, y, z), unit |
    11:14 rgb in [0, 1]

``C0 = 0.28209479177387814`` is the degree-0 spherical-harmonic constant (``rgb = C0 f_dc + 0.5``).
"""

from __future__ import annotations

import torch

SH_C0 = 0.28209479177387814
NUM_CHANNELS = 14
XYZ, OPACITY, SCALE, ROTATION, RGB = slice(0, 3), slice(3, 4), slice(4, 7), slice(7, 11), slice(11, 14)


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
