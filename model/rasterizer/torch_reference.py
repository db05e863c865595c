"""Pure-PyTorch 3D Gaussian rasterizer: the maths of 3DGS / gsplat ("classic" mode), on any
device, differentiable, memory-bounded by tiles.

Steps (Kerbl et al. 2023, "3D Gaussian Splatting", Sec. 4 and 6; Zwicker et al. 2001 EWA):
1. world -> camera (OpenCV axes), skip centres with ``z < near``;
2. project the centre with ``K``, the covariance with the Jacobian of the perspective map
   (:func:`projected_covariance`), plus a 0.3 px^2 low-pass on the diagonal;
3. per pixel, ``alpha_i = min(0.999, o_i exp(-0.5 d^T Sigma'^-1 d))``, terms below 1/255 dropped;
4. front-to-back compositing in depth order: ``C = sum_i c_i alpha_i T_i``,
   ``T_i = prod_{j<i} (1 - alpha_j)``, stopping before the Gaussian that would take ``T`` to
   1e-4 or below (:func:`composite`).

The clamp (0.999) and the stop (1e-4, exclusive) are gsplat 1.5's
(``cuda/csrc/RasterizeToPixels3DGSFwd.cu``), so that the CPU and the CUDA backend render the same
images; the original 3DGS clamps at 0.99.

Pixels are processed tile by tile; a tile sees only the Gaussians whose footprint reaches it,
so memory is O(tile pixels x Gaussians per tile), never O(H W N); with gradients, each tile is
checkpointed (recomputed in backward), so autograd holds O(tiles x Gaussians per tile) inputs.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from model.gaussians import OPACITY, RGB, ROTATION, SCALE, XYZ, covariance_3d

NEAR_PLANE = 0.01
LOW_PASS = 0.3  # px^2 added to the 2D covariance (3DGS / gsplat eps2d)
ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.999
TRANSMITTANCE_MIN = 1e-4  # a pixel is done before its transmittance would fall to this
POWER_MIN = -math.log(255.0) - 1.0  # o exp(POWER_MIN) < 1/255 for every opacity o <= 1


def world_to_camera(points: torch.Tensor, c2w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Points in the OpenCV camera frame and the world-to-camera rotation.

    Args:
        points: [N, 3] world.  c2w: [4, 4].
    Returns:
        (points_cam [N, 3], R_w2c [3, 3])
    """
    R = c2w[:3, :3].transpose(0, 1)
    return (points - c2w[:3, 3]) @ R.transpose(0, 1), R


def projected_covariance(
    mean_cam: torch.Tensor, cov_world: torch.Tensor, R_w2c: torch.Tensor, K: torch.Tensor,
    width: int, height: int,
) -> torch.Tensor:
    """EWA splatting: ``Sigma' = J W Sigma W^T J^T + 0.3 I`` (3DGS Eq. 5; Zwicker et al. 2001).

    ``J`` is the Jacobian of ``(x, y, z) -> (fx x / z + cx, fy y / z + cy)`` at the centre, with
    ``x/z`` and ``y/z`` clamped to 1.3 x the half field of view, as 3DGS and gsplat do (keeps
    off-screen Gaussians from exploding).

    Args:
        mean_cam: [N, 3] centres in the camera frame.  cov_world: [N, 3, 3].
        R_w2c: [3, 3].  K: [3, 3] pixels.
    Returns:
        [N, 2, 2] pixel-space covariance.
    """
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    x, y, z = mean_cam.unbind(-1)
    lim_x_pos = (width - cx) / fx + 0.3 * width / (2 * fx)
    lim_x_neg = cx / fx + 0.3 * width / (2 * fx)
    lim_y_pos = (height - cy) / fy + 0.3 * height / (2 * fy)
    lim_y_neg = cy / fy + 0.3 * height / (2 * fy)
    tx = z * torch.minimum(lim_x_pos, torch.maximum(-lim_x_neg, x / z))
    ty = z * torch.minimum(lim_y_pos, torch.maximum(-lim_y_neg, y / z))
    zero = torch.zeros_like(z)
    J = torch.stack(
        [fx / z, zero, -fx * tx / (z * z), zero, fy / z, -fy * ty / (z * z)], -1
    ).reshape(-1, 2, 3)
    cov_cam = R_w2c @ cov_world @ R_w2c.transpose(0, 1)
    cov2d = J @ cov_cam @ J.transpose(-1, -2)
    return cov2d + LOW_PASS * torch.eye(2, dtype=cov2d.dtype, device=cov2d.device)


def footprint_radius(cov2d: torch.Tensor, opacity: torch.Tensor) -> torch.Tensor:
    """Pixel radius beyond which a Gaussian's alpha is below 1/255 (so culling loses nothing).

    ``alpha >= 1/255  <=>  d^T Sigma'^-1 d <= 2 ln(255 o)``, and ``d^T Sigma'^-1 d >=
    |d|^2 / lambda_max``, so ``|d| <= sqrt(2 ln(255 o) lambda_max)``.

    Args:
        cov2d: [N, 2, 2].  opacity: [N].
    Returns:
        [N] radius in pixels (0 where the Gaussian can never reach 1/255).
    """
    a, b, c = cov2d[:, 0, 0], cov2d[:, 0, 1], cov2d[:, 1, 1]
    mid = 0.5 * (a + c)
    lam_max = mid + torch.sqrt(torch.clamp(mid * mid - (a * c - b * b), min=0.0))
    level = 2.0 * torch.log(torch.clamp(opacity / ALPHA_MIN, min=1.0))
    return torch.sqrt(level * lam_max)


def _transmittance(alpha: torch.Tensor) -> torch.Tensor:
    """``T_i = prod_{j<i} (1 - alpha_j)`` for i = 0..n. alpha [P, n] -> [P, n + 1]."""
    return torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha], 1), 1)


def composite(alpha: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Front-to-back alpha compositing: ``sum_i v_i alpha_i T_i``, ``T_i = prod_{j<i}(1-alpha_j)``
    (3DGS Eq. 3), over the Gaussians before the first one whose ``T_i (1 - alpha_i)`` would be
    <= 1e-4 (that one and all behind it are dropped, as gsplat and 3DGS do).

    Args:
        alpha: [P, n] per pixel, Gaussians sorted front to back.  values: [n, C].
    Returns:
        (accumulated [P, C], final transmittance [P])
    """
    with torch.no_grad():  # T only falls along a pixel's list, so this keeps a prefix
        alive = _transmittance(alpha)[:, 1:] > TRANSMITTANCE_MIN
    alpha = alpha * alive
    transmittance = _transmittance(alpha)  # [P, n + 1]
    weights = alpha * transmittance[:, :-1]
    return weights @ values, transmittance[:, -1]


def gaussian_alpha(
    pixels: torch.Tensor, means2d: torch.Tensor, conics: torch.Tensor, opacity: torch.Tensor
) -> torch.Tensor:
    """Per-pixel opacity ``min(0.99, o exp(-0.5 d^T Sigma'^-1 d))``, zero below 1/255 (3DGS Sec. 6).

    Args:
        pixels: [P, 2] pixel centres.  means2d: [n, 2].  conics: [n, 2, 2] inverse covariances.
        opacity: [n].
    Returns:
        [P, n]
    """
    d = pixels[:, None, :] - means2d[None]  # [P, n, 2]
    power = -0.5 * (
        conics[:, 0, 0] * d[..., 0] ** 2
        + 2 * conics[:, 0, 1] * d[..., 0] * d[..., 1]
        + conics[:, 1, 1] * d[..., 1] ** 2
    )
    # Below -ln(255) every alpha is under 1/255 and dropped; clamping there first keeps exp off
    # its slow underflow path (tens of times slower on CPU) without changing any result.
    power = torch.clamp(power, min=POWER_MIN)
    alpha = torch.clamp(opacity * torch.exp(power), max=ALPHA_MAX)
    return torch.where(alpha >= ALPHA_MIN, alpha, torch.zeros_like(alpha))


def render_tile(pixels, means2d, conics, opacity, values) -> torch.Tensor:
    """One tile: per-pixel alphas of its Gaussians (depth-sorted) composited front to back.

    Args:
        pixels: [P, 2].  means2d: [n, 2].  conics: [n, 2, 2].  opacity: [n].  values: [n, C].
    Returns:
        [P, C + 1]: accumulated values, then the final transmittance.
    """
    acc, trans = composite(gaussian_alpha(pixels, means2d, conics, opacity), values)
    return torch.cat([acc, trans[:, None]], 1)


def render_view(
    g: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor, height: int, width: int,
    background: torch.Tensor, tile_size: int = 8,
) -> dict[str, torch.Tensor]:
    """Render one set of Gaussians from one camera.

    Args:
        g: [N, 14] activated Gaussians (``model/gaussians.py``).  c2w: [4, 4] OpenCV.
        K: [3, 3] pixels of (height, width).  background: [3].
    Returns:
        dict(rgb [3, H, W] over ``background``, alpha [1, H, W], depth [1, H, W] expected z-depth
        (sum w z / alpha, 0 where empty), ccm [3, H, W] = centres + 0.5 composited over 0)
    """
    dtype, device = g.dtype, g.device
    mean_cam, R = world_to_camera(g[:, XYZ], c2w)
    visible = mean_cam[:, 2] > NEAR_PLANE
    g, mean_cam = g[visible], mean_cam[visible]

    order = torch.argsort(mean_cam[:, 2])  # front to back
    g, mean_cam = g[order], mean_cam[order]
    z = mean_cam[:, 2]
    cov2d = projected_covariance(mean_cam, covariance_3d(g[:, SCALE], g[:, ROTATION]), R, K, width, height)
    means2d = torch.stack(
        [K[0, 0] * mean_cam[:, 0] / z + K[0, 2], K[1, 1] * mean_cam[:, 1] / z + K[1, 2]], -1
    )
    conics = torch.linalg.inv(cov2d)
    opacity = g[:, OPACITY].squeeze(-1)
    values = torch.cat([g[:, RGB], z[:, None], g[:, XYZ] + 0.5], 1)  # [n, 7]: rgb, z, ccm

    # Tile ranges each Gaussian touches (no gradient needed for the culling).
    with torch.no_grad():
        radius = footprint_radius(cov2d, opacity)
        tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
        lo = torch.floor((means2d - radius[:, None]) / tile_size)
        hi = torch.floor((means2d + radius[:, None]) / tile_size)
        x0, x1 = lo[:, 0].clamp(0, tiles_x - 1), hi[:, 0].clamp(0, tiles_x - 1)
        y0, y1 = lo[:, 1].clamp(0, tiles_y - 1), hi[:, 1].clamp(0, tiles_y - 1)
        on_screen = (
            (radius > 0)
            & (hi[:, 0] >= 0) & (lo[:, 0] <= tiles_x - 1)
            & (hi[:, 1] >= 0) & (lo[:, 1] <= tiles_y - 1)
        )  # fmt: skip
        tile_of, gauss_of = _tile_pairs(
            x0.long(), x1.long(), y0.long(), y1.long(), on_screen, tiles_x
        )
        counts = torch.bincount(tile_of, minlength=tiles_x * tiles_y).tolist()

    pixel_ids, results = [], []
    start = 0
    for tile, count in enumerate(counts):
        if count == 0:
            continue
        idx = gauss_of[start : start + count]
        start += count
        ty, tx = divmod(tile, tiles_x)
        rows = torch.arange(ty * tile_size, min((ty + 1) * tile_size, height), device=device)
        cols = torch.arange(tx * tile_size, min((tx + 1) * tile_size, width), device=device)
        ids = (rows[:, None] * width + cols[None, :]).reshape(-1)
        pixels = torch.stack([ids % width, ids // width], -1).to(dtype) + 0.5
        args = (pixels, means2d[idx], conics[idx], opacity[idx], values[idx])
        if torch.is_grad_enabled() and g.requires_grad:
            # Keep only the tile's inputs for backward and recompute its [P, n] terms there:
            # autograd memory stays O(tile x Gaussians in the tile), not O(all overlaps).
            results.append(checkpoint(render_tile, *args, use_reentrant=False))
        else:
            results.append(render_tile(*args))
        pixel_ids.append(ids)

    # 7 values + transmittance per pixel; pixels no Gaussian reaches keep (0, ..., 0, 1).
    out = torch.zeros(height * width, 8, dtype=dtype, device=device)
    out[:, 7] = 1.0
    if results:
        out = out.index_copy(0, torch.cat(pixel_ids), torch.cat(results))
    else:
        # Nothing on screen: still an output of ``g`` (zero gradient, no backward error).
        out = out + values[:0].sum()
    out = out.reshape(height, width, 8).permute(2, 0, 1)
    alpha = 1.0 - out[7:8]
    rgb = out[0:3] + out[7:8] * background.to(dtype)[:, None, None]
    depth = out[3:4] / alpha.clamp(min=1e-10)
    return dict(rgb=rgb, alpha=alpha, depth=depth, ccm=out[4:7])


def _tile_pairs(x0, x1, y0, y1, keep, tiles_x) -> tuple[torch.Tensor, torch.Tensor]:
    """(tile id, Gaussian index) for every tile each kept Gaussian's box covers, grouped by tile
    and, within a tile, in the Gaussians' (depth) order.

    Args:
        x0, x1, y0, y1: [n] inclusive tile ranges.  keep: [n] bool.
    Returns:
        (tile ids [M], Gaussian indices [M]) sorted by tile id, stable.
    """
    index = torch.nonzero(keep).squeeze(1)
    x0, x1, y0, y1 = x0[index], x1[index], y0[index], y1[index]
    w, h = x1 - x0 + 1, y1 - y0 + 1
    n_pairs = w * h
    gauss = torch.repeat_interleave(index, n_pairs)
    first = torch.cumsum(n_pairs, 0) - n_pairs
    local = torch.arange(int(n_pairs.sum()), device=index.device) - torch.repeat_interleave(
        first, n_pairs
    )
    w_rep = torch.repeat_interleave(w, n_pairs)
    tx = torch.repeat_interleave(x0, n_pairs) + local % w_rep
    ty = torch.repeat_interleave(y0, n_pairs) + local // w_rep
    tile = ty * tiles_x + tx
    tile, perm = torch.sort(tile, stable=True)
    return tile, gauss[perm]
