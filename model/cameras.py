"""Camera maths for the model: Plücker ray maps, intrinsics scaling, and the fixed similarity
between the model frame and LGM's frame.

Conventions (``data_pipeline/conventions.py``): ``c2w`` is camera-to-world with OpenCV axes,
``K`` in pixels, pixel ``(row v, column u)`` has its centre at ``(u + 0.5, v + 0.5)``, x is the
column. The MODEL frame is the normalised world rotated about +Z so that the condition camera
sits on +X (radius 2.0, +Z up).

LGM's frame (3DTopia/LGM, ``core/provider_objaverse.py``): +Y up, the first (front) input camera
on +Z at radius 1.5 looking at the origin. The map model -> LGM is the similarity
``x_lgm = s R x_model`` with ``s = 1.5 / 2.0`` and ``R`` the proper rotation taking
+X -> +Z, +Y -> +X, +Z -> +Y. Plücker rays do not depend on the camera's own axes (OpenCV or
OpenGL), only on world rays, so the cameras need no axis flip: we move the pose, not its axes.
"""

from __future__ import annotations

import torch

from data_pipeline.conventions import DEFAULT_RADIUS
from model.gaussians import OPACITY, RGB, ROTATION, SCALE, XYZ, quaternion_multiply

LGM_CAMERA_RADIUS = 1.5
MODEL_TO_LGM_SCALE = LGM_CAMERA_RADIUS / DEFAULT_RADIUS
# Columns are the images of the model axes: R e_x = e_z, R e_y = e_x, R e_z = e_y (det = +1).
MODEL_TO_LGM_ROTATION = ((0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0))
# The same rotation as a unit quaternion (w, x, y, z): -120 degrees about (1, 1, 1)/sqrt(3).
MODEL_TO_LGM_QUATERNION = (0.5, -0.5, -0.5, -0.5)


def _rotation(like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(MODEL_TO_LGM_ROTATION, dtype=like.dtype, device=like.device)


def geometry_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype camera and Gaussian geometry is computed in: float32 for half-precision inputs
    (fp16 / bf16 networks), the input's own dtype when it is float32 or float64."""
    return torch.promote_types(dtype, torch.float32)


def pixel_rays(
    c2w: torch.Tensor, K: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """World rays through the pixel centres ``(u + 0.5, v + 0.5)``, x = column.

    Geometry is computed in at least float32 (float64 stays float64): ``K`` is inverted, which
    half precision cannot do, and pixel coordinates up to 512 are not exact in bfloat16.

    Args:
        c2w: [..., 4, 4] OpenCV camera-to-world.  K: [..., 3, 3] in pixels of (height, width).
    Returns:
        origins [..., height, width, 3], unit directions [..., height, width, 3], float32 or
        float64
    """
    dtype, device = geometry_dtype(c2w.dtype), c2w.device
    c2w = c2w.to(dtype)
    u = torch.arange(width, dtype=dtype, device=device) + 0.5
    v = torch.arange(height, dtype=dtype, device=device) + 0.5
    uu, vv = torch.meshgrid(u, v, indexing="xy")  # [H, W]: uu[v, u] = u + 0.5
    uv1 = torch.stack([uu, vv, torch.ones_like(uu)], -1)  # [H, W, 3]
    K_inv = torch.linalg.inv(K.to(dtype))
    batch = c2w.shape[:-2]
    d_cam = torch.einsum("...ij,hwj->...hwi", K_inv, uv1)
    d_world = torch.einsum("...ij,...hwj->...hwi", c2w[..., :3, :3], d_cam)
    d_world = d_world / d_world.norm(dim=-1, keepdim=True)
    origins = c2w[..., None, None, :3, 3].expand(*batch, height, width, 3)
    return origins, d_world


def plucker_rays(c2w: torch.Tensor, K: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Per-pixel Plücker coordinates ``(o x d, d)`` of the world rays (DESIGN section 4).

    ``d`` is the unit direction through the pixel centre, ``o`` the camera centre.

    Args:
        c2w: [..., 4, 4] OpenCV camera-to-world.  K: [..., 3, 3] in pixels of (height, width).
    Returns:
        [..., 6, height, width]: channels 0-2 the moment ``o x d``, 3-5 the direction ``d``.
    """
    o, d = pixel_rays(c2w, K, height, width)
    plucker = torch.cat([torch.linalg.cross(o, d, dim=-1), d], dim=-1)
    return plucker.movedim(-1, -3)


def plucker_to_rays(plucker: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A point on each ray and its direction from Plücker coordinates: ``p = d x m`` (for unit d),
    the point of the line closest to the origin.

    Args:
        plucker: [..., 6, H, W]
    Returns:
        points [..., H, W, 3], unit directions [..., H, W, 3]
    """
    p = plucker.movedim(-3, -1)
    m, d = p[..., :3], p[..., 3:]
    return torch.linalg.cross(d, m, dim=-1), d


def scale_intrinsics(K: torch.Tensor, from_size: int, to_size: int) -> torch.Tensor:
    """Intrinsics of the same camera for a square image resized from ``from_size`` to ``to_size``.

    With pixel centres at ``+0.5`` a resize scales the image plane exactly: ``f`` and ``c`` are
    multiplied by ``to_size / from_size``.

    Args:
        K: [..., 3, 3] in pixels of a ``from_size`` image.
    Returns:
        [..., 3, 3] in pixels of a ``to_size`` image.
    """
    if from_size <= 0 or to_size <= 0:
        raise ValueError(f"image sizes must be positive, got {from_size} -> {to_size}")
    scale = torch.ones(3, dtype=K.dtype, device=K.device)
    scale[:2] = to_size / from_size
    return K * scale[:, None]


def model_to_lgm_c2w(c2w: torch.Tensor) -> torch.Tensor:
    """Camera poses moved from the model frame into LGM's frame: ``x_lgm = s R x_model``.

    The camera's own axes stay OpenCV; its rotation is ``R @ c2w[:3, :3]`` and its centre
    ``s R t``, so world rays map to world rays (direction ``R d``, origin ``s R o``).

    Args:
        c2w: [..., 4, 4] model-frame OpenCV camera-to-world.
    Returns:
        [..., 4, 4] LGM-frame camera-to-world.
    """
    R = _rotation(c2w)
    out = c2w.clone()
    out[..., :3, :3] = R @ c2w[..., :3, :3]
    out[..., :3, 3] = MODEL_TO_LGM_SCALE * (c2w[..., :3, 3] @ R.T)
    return out


def lgm_to_model_gaussians(g: torch.Tensor) -> torch.Tensor:
    """Gaussians predicted in LGM's frame moved to the model frame: ``x = R^T x_lgm / s``.

    Positions: ``R^T p / s``; scales: ``/ s``; rotations: ``q(R^T) q`` (the covariance
    ``R^T Sigma R / s^2``); opacity and colour unchanged. Layout ``gaussians.py``.

    Args:
        g: [..., N, 14] activated Gaussians in LGM's frame.
    Returns:
        [..., N, 14] in the model frame.
    """
    R = _rotation(g)
    w, x, y, z = MODEL_TO_LGM_QUATERNION
    q_inv = torch.tensor((w, -x, -y, -z), dtype=g.dtype, device=g.device)
    xyz = (g[..., XYZ] @ R) / MODEL_TO_LGM_SCALE  # row vectors: p @ R = (R^T p)^T
    scale = g[..., SCALE] / MODEL_TO_LGM_SCALE
    rot = quaternion_multiply(q_inv.expand_as(g[..., ROTATION]), g[..., ROTATION])
    return torch.cat([xyz, g[..., OPACITY], scale, rot, g[..., RGB]], -1)
