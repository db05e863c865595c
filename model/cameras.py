"""Camera maths for the model: Plücker ray maps, intrinsics scaling, and the similarity between
the model frame and LGM's frame.

Conventions (``common/conventions.py``): ``c2w`` is camera-to-world with OpenCV axes,
``K`` in pixels, pixel ``(row v, column u)`` has its centre at ``(u + 0.5, v + 0.5)``, x is the
column. The MODEL frame is the normalised world rotated about +Z so that the condition camera
sits on +X (radius 2.0, +Z up).

LGM's frame (3DTopia/LGM, ``core/provider_objaverse.py``): LGM's data pipeline scales the scene
so that the cameras are at radius 1.5, then moves it so that its first input camera is exactly
at ``[I | (0, 0, 1.5)]`` in OpenGL camera axes (x right, y up, looking along -z), whatever
that camera's elevation: ``T = [I | (0, 0, 1.5)] inv(c2w_0)``. The same here, per sample, with
the first LGM input view as the reference camera ``(R_0, t_0)`` (OpenCV axes, so
``c2w_0^GL = c2w_0 diag(1, -1, -1, 1)``):

    x_lgm = s F R_0^T (x - t_0) + (0, 0, 1.5),   s = 1.5 / |t_0|,   F = diag(1, -1, -1)

``|t_0|`` is the reference camera's orbit radius (it looks at the origin): 2.0 by default, so
``s = 0.75``, as LGM scales its own renders' radius to ``cam_radius`` (1.5).

Plücker rays do not depend on a camera's own axes (OpenCV or OpenGL), only on world rays, so
the moved cameras keep their OpenCV axes (LGM's frame, OpenCV cameras).
"""

from __future__ import annotations

import torch

from model.gaussians import OPACITY, RGB, ROTATION, SCALE, XYZ, matrix_to_quaternion, quaternion_multiply

LGM_CAMERA_RADIUS = 1.5
OPENCV_TO_OPENGL = (1.0, -1.0, -1.0)  # camera axes: y and z flipped


def model_to_lgm_rotation(reference: torch.Tensor) -> torch.Tensor:
    """``F R_0^T``: the rotation of the model -> LGM similarity for a reference camera.

    Args:
        reference: [..., 4, 4] model-frame OpenCV camera-to-world of the first LGM input view.
    Returns:
        [..., 3, 3]
    """
    flip = torch.tensor(OPENCV_TO_OPENGL, dtype=reference.dtype, device=reference.device)
    return flip[:, None] * reference[..., :3, :3].transpose(-1, -2)


def model_to_lgm_scale(reference: torch.Tensor) -> torch.Tensor:
    """``s = 1.5 / |t_0|``: the reference camera moved to LGM's radius. [..., 4, 4] -> [...]."""
    return LGM_CAMERA_RADIUS / reference[..., :3, 3].norm(dim=-1)


def _lgm_offset(like: torch.Tensor) -> torch.Tensor:
    """(0, 0, 1.5): where LGM's frame puts the reference camera."""
    return torch.tensor((0.0, 0.0, LGM_CAMERA_RADIUS), dtype=like.dtype, device=like.device)


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
    """Per-pixel Plücker coordinates ``(o x d, d)`` of the world rays (docs/design.md section 4).

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


def model_to_lgm_c2w(c2w: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Camera poses moved from the model frame into LGM's frame of ``reference`` (module doc).

    The camera's own axes stay OpenCV: its rotation becomes ``F R_0^T R`` and its centre
    ``s F R_0^T (t - t_0) + (0, 0, 1.5)``, so world rays map to world rays. The reference camera
    itself becomes ``[F | (0, 0, 1.5)]``, i.e. ``[I | (0, 0, 1.5)]`` in OpenGL axes.

    Args:
        c2w: [B, V, 4, 4] model-frame OpenCV camera-to-world.
        reference: [B, 4, 4] the camera that defines the frame (LGM's first input view).
    Returns:
        [B, V, 4, 4] LGM-frame (OpenCV-axes) camera-to-world.
    """
    R = model_to_lgm_rotation(reference)[..., None, :, :]  # [B, 1, 3, 3]
    t0 = reference[..., None, :3, 3]  # [B, 1, 3]
    s = model_to_lgm_scale(reference)[..., None, None]  # [B, 1, 1]
    out = c2w.clone()
    out[..., :3, :3] = R @ c2w[..., :3, :3]
    out[..., :3, 3] = s * (R @ (c2w[..., :3, 3] - t0)[..., None])[..., 0] + _lgm_offset(c2w)
    return out


def lgm_to_model_gaussians(g: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Gaussians predicted in LGM's frame of ``reference`` moved to the model frame:
    ``x = R_0 F (x_lgm - (0, 0, 1.5)) / s + t_0``.

    Positions as above; scales ``/ s``; rotations ``q(R_0 F) q`` (the covariance
    ``M Sigma M^T / s^2`` with ``M = R_0 F``); opacity and colour unchanged. Layout
    ``gaussians.py``.

    Args:
        g: [B, N, 14] activated Gaussians in LGM's frame.
        reference: [B, 4, 4] the model-frame camera the LGM frame was built from.
    Returns:
        [B, N, 14] in the model frame.
    """
    reference = reference.to(g.dtype)
    M = model_to_lgm_rotation(reference).transpose(-1, -2)  # [B, 3, 3]: LGM -> model rotation
    s = model_to_lgm_scale(reference)[..., None, None]  # [B, 1, 1]
    xyz = (g[..., XYZ] - _lgm_offset(g)) @ M.transpose(-1, -2) / s + reference[..., None, :3, 3]
    scale = g[..., SCALE] / s
    q = matrix_to_quaternion(M)[..., None, :].expand_as(g[..., ROTATION])
    rot = quaternion_multiply(q, g[..., ROTATION])
    return torch.cat([xyz, g[..., OPACITY], scale, rot, g[..., RGB]], -1)
