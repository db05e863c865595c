"""Pure-PyTorch 3D Gaussian rasterizer: the maths of 3DGS / gsplat ("classic" mode), on any
device, differentiable, memory-bounded by chunks of tiles.

Steps (Kerbl et al. 2023, "3D Gaussian Splatting", Sec. 4 and 6; Zwicker et al. 2001 EWA):
1. world -> camera (OpenCV axes), skip centres with ``z < near``;
2. project the centre with ``K``, the covariance with the Jacobian of the perspective map
   (:func:`projected_covariance`), plus a 0.3 px^2 low-pass on the diagonal;
3. per pixel, ``alpha_i = min(0.999, o_i exp(-0.5 d^T Sigma'^-1 d))``, terms below 1/255 dropped;
4. front-to-back compositing in depth order: ``C = sum_i c_i alpha_i T_i``,
   ``T_i = prod_{j<i} (1 - alpha_j)``, stopping before the Gaussian that would take ``T`` to
   1e-4 or below (:func:`blend_weights`).

The clamp (0.999) and the stop (1e-4, exclusive) are gsplat 1.5's
(``cuda/csrc/RasterizeToPixels3DGSFwd.cu``), so that the CPU and the CUDA backend render the same
images; the original 3DGS clamps at 0.99.

All cameras of a call are rendered together. The screen of every camera is cut into tiles; a
tile sees only the Gaussians whose footprint reaches it (:func:`footprint_radius`), in depth
order. Tiles are processed in chunks, with no loop per tile: a chunk is a ``[tiles, Gaussians,
pixels]`` tensor of alphas, each tile's Gaussian list padded with an empty Gaussian (alpha 0)
up to the chunk's longest, composited along its middle axis by a cumulative product. Tiles are
grouped by list length so that padding wastes at most about half of a chunk, and a chunk holds
at most ``budget`` (tile, Gaussian, pixel) entries, so memory is O(budget), never O(H W N).
The backward of a chunk is written out (:class:`RenderChunk`) and recomputes the chunk's
alphas, so autograd holds only the chunks' inputs, O(tile-Gaussian pairs).
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from model.gaussians import OPACITY, RGB, ROTATION, SCALE, XYZ, covariance_3d

NEAR_PLANE = 0.01
LOW_PASS = 0.3  # px^2 added to the 2D covariance (3DGS / gsplat eps2d)
ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.999
TRANSMITTANCE_MIN = 1e-4  # a pixel is done before its transmittance would fall to this
POWER_MIN = -math.log(255.0) - 1.0  # o exp(POWER_MIN) < 1/255 for every opacity o <= 1
CHUNK_BUDGET = 1 << 18  # (tile, Gaussian, pixel) entries per chunk, padding included
# Splat table columns: pixel centre, conic (inverse 2D covariance a, b, c), opacity, values.
MEAN2D, CONIC, ALPHA_O, VALUES = slice(0, 2), slice(2, 5), 5, slice(6, 13)


def world_to_camera(points: torch.Tensor, c2w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Points in the OpenCV camera frame and the world-to-camera rotation.

    Args:
        points: [..., N, 3] world.  c2w: [..., 4, 4] (leading dimensions broadcast).
    Returns:
        (points_cam [..., N, 3], R_w2c [..., 3, 3])
    """
    R = c2w[..., :3, :3].transpose(-1, -2)
    return (points - c2w[..., None, :3, 3]) @ R.transpose(-1, -2), R


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
        R_w2c: [N, 3, 3] or [3, 3].  K: [N, 3, 3] or [3, 3] pixels.
    Returns:
        [N, 2, 2] pixel-space covariance.
    """
    fx, fy, cx, cy = K[..., 0, 0], K[..., 1, 1], K[..., 0, 2], K[..., 1, 2]
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
    cov_cam = R_w2c @ cov_world @ R_w2c.transpose(-1, -2)
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


def gaussian_alpha(
    pixels: torch.Tensor, splats: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pixel opacity ``min(0.999, o exp(-0.5 d^T Sigma'^-1 d))``, zero below 1/255 (3DGS Sec. 6).

    Args:
        pixels: [T, P, 2] pixel centres of T tiles.  splats: [T, n, 13] each tile's Gaussians
            (columns ``MEAN2D``, ``CONIC``, ``ALPHA_O``, ``VALUES``).
    Returns:
        (alpha [T, n, P]; for the backward, the offsets dx, dy [T, n, P] of the pixel from the
        centre and the unclamped Gaussian falloff ``exp(-0.5 d^T Sigma'^-1 d)`` [T, n, P])
    """
    dx = pixels[:, None, :, 0] - splats[:, :, None, 0]  # [T, n, P]
    dy = pixels[:, None, :, 1] - splats[:, :, None, 1]
    a, b, c = (splats[:, :, k, None] for k in range(CONIC.start, CONIC.stop))
    power = -0.5 * (a * dx**2 + 2 * b * dx * dy + c * dy**2)
    # Below -ln(255) every alpha is under 1/255 and dropped; clamping there first keeps exp off
    # its slow underflow path (tens of times slower on CPU) without changing any result.
    falloff = torch.exp(torch.clamp(power, min=POWER_MIN))
    alpha = torch.clamp(splats[:, :, ALPHA_O, None] * falloff, max=ALPHA_MAX)
    return torch.where(alpha >= ALPHA_MIN, alpha, 0.0), dx, dy, falloff


def blend_weights(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Front-to-back compositing weights ``w_i = alpha_i T_i``, ``T_i = prod_{j<i}(1-alpha_j)``
    (3DGS Eq. 3), over the Gaussians before the first one whose ``T_i (1 - alpha_i)`` would be
    <= 1e-4 (that one and all behind it are dropped, as gsplat and 3DGS do).

    Args:
        alpha: [T, n, P] per tile, Gaussian (sorted front to back) and pixel.
    Returns:
        (weights [T, n, P], T_i [T, n, P], kept [T, n, P] bool, final transmittance [T, P])
    """
    transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha], 1), 1)
    kept = transmittance[:, 1:] > TRANSMITTANCE_MIN  # a prefix of each list: T only falls
    final = transmittance.gather(1, kept.sum(1, keepdim=True)).squeeze(1)
    before = transmittance[:, :-1]
    return torch.where(kept, alpha * before, 0.0), before, kept, final


class RenderChunk(torch.autograd.Function):
    """Some tiles: per-pixel alphas of their Gaussians (depth-sorted) composited front to back,
    ``[T, P, 2], [T, n, 13] -> [T, P, 8]`` (the 7 accumulated values rgb, z, ccm, then the final
    transmittance).

    The backward is 3DGS Eq. 3 differentiated by hand (as gsplat's backward kernel does), and
    recomputes the [T, n, P] terms: autograd keeps only the inputs, O(tile-Gaussian pairs).
    """

    @staticmethod
    def forward(ctx, pixels: torch.Tensor, splats: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(pixels, splats)
        weights, _, _, final = blend_weights(gaussian_alpha(pixels, splats)[0])
        acc = torch.bmm(weights.transpose(1, 2), splats[..., VALUES])  # [T, P, 7]
        return torch.cat([acc, final[..., None]], -1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        """``grad`` [T, P, 8] -> gradient of the splats [T, n, 13]. With ``s_i = dL/dacc . v_i``:
        ``dL/dalpha_i = T_i s_i - (sum_{j>i} w_j s_j + dL/dT_final T_final) / (1 - alpha_i)``
        for the kept Gaussians, then through the clamp, the threshold and the exponential."""
        pixels, splats = ctx.saved_tensors
        alpha, dx, dy, falloff = gaussian_alpha(pixels, splats)
        weights, before, kept, final = blend_weights(alpha)
        grad_acc, grad_final = grad[..., :7], grad[..., 7:8].transpose(1, 2)  # [T, P, 7], [T, 1, P]
        s = torch.bmm(splats[..., VALUES], grad_acc.transpose(1, 2))  # [T, n, P]
        ws = weights * s
        behind = ws.sum(1, keepdim=True) - torch.cumsum(ws, 1)  # sum_{j>i} w_j s_j
        grad_alpha = before * s - (behind + grad_final * final[:, None]) / (1.0 - alpha)
        # alpha passes the gradient where it is neither clamped at 0.999 nor dropped below 1/255
        # (where the power was clamped, alpha is below 1/255: dropped too, as opacity <= 1).
        opacity = splats[:, :, ALPHA_O, None]
        live = kept & (alpha > 0) & (opacity * falloff <= ALPHA_MAX)
        grad_raw = torch.where(live, grad_alpha * falloff, 0.0)  # d/d opacity
        grad_power = grad_raw * opacity
        u, v = grad_power * dx, grad_power * dy
        su, sv = u.sum(-1), v.sum(-1)  # [T, n]
        a, b, c = splats[..., CONIC].unbind(-1)
        grad_splats = torch.stack(
            [a * su + b * sv, b * su + c * sv,  # d power / d mean = Sigma'^-1 d
             -0.5 * (u * dx).sum(-1), -(u * dy).sum(-1), -0.5 * (v * dy).sum(-1),
             grad_raw.sum(-1)], -1,
        )  # fmt: skip
        grad_values = torch.bmm(weights, grad_acc)  # [T, n, 7]
        return None, torch.cat([grad_splats, grad_values], -1)


def render_view(
    g: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor, height: int, width: int,
    background: torch.Tensor, tile_size: int = 8,
) -> dict[str, torch.Tensor]:
    """Render one set of Gaussians from one camera (:func:`render_views` with B = V = 1).

    Args:
        g: [N, 14] activated Gaussians.  c2w: [4, 4] OpenCV.  K: [3, 3].  background: [3].
    Returns:
        dict(rgb [3, H, W], alpha [1, H, W], depth [1, H, W], ccm [3, H, W])
    """
    out = render_views(g[None], c2w[None, None], K[None, None], height, width, background, tile_size)
    return {key: value[0, 0] for key, value in out.items()}


def render_views(
    g: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor, height: int, width: int,
    background: torch.Tensor, tile_size: int = 8, budget: int = CHUNK_BUDGET,
) -> dict[str, torch.Tensor]:
    """Render each batch element's Gaussians from each of its cameras, all in one pass.

    Args:
        g: [B, N, 14] activated Gaussians (``model/gaussians.py``).  c2w: [B, V, 4, 4] OpenCV.
        K: [B, V, 3, 3] pixels of (height, width).  background: [3].
        tile_size: tile side in pixels.  budget: most (tile, Gaussian, pixel) entries per chunk
            (a tile with more Gaussians than ``budget / tile_size^2`` is a chunk of its own).
    Returns:
        dict of [B, V, C, H, W]: rgb (C=3) over ``background``, alpha (1), depth (1) expected
        z-depth (sum w z / alpha, 0 where empty), ccm (3) = centres + 0.5 composited over 0.
    """
    B, V = c2w.shape[:2]
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    table, radius, camera = _splats(g, c2w, K, height, width)
    with torch.no_grad():  # which tiles each Gaussian touches: no gradient needed
        tile_of, splat_of = _tile_pairs(table[:, MEAN2D], radius, camera, tile_size, tiles_x, tiles_y)
        chunks = _chunks(tile_of, splat_of, len(table), tile_size**2, budget)
    table = torch.cat([table, torch.zeros_like(table[:1])])  # the padding: opacity 0, alpha 0

    # 7 values + transmittance per pixel; pixels no Gaussian reaches keep (0, ..., 0, 1).
    canvas = torch.zeros(B * V * tiles_y * tiles_x, tile_size**2, 8, dtype=g.dtype, device=g.device)
    canvas[..., 7] = 1.0
    if chunks:
        tiles = torch.cat([tile for tile, _ in chunks])
        results = [
            RenderChunk.apply(_tile_pixels(tile, tile_size, tiles_x, tiles_y, g.dtype), table[index])
            for tile, index in chunks
        ]
        canvas = canvas.index_copy(0, tiles, torch.cat(results))
    else:
        # Nothing on screen: still an output of ``g`` (zero gradient, no backward error).
        canvas = canvas + table[:0].sum()
    out = (
        canvas.reshape(B, V, tiles_y, tiles_x, tile_size, tile_size, 8)
        .permute(0, 1, 6, 2, 4, 3, 5)
        .reshape(B, V, 8, tiles_y * tile_size, tiles_x * tile_size)[..., :height, :width]
    )
    alpha = 1.0 - out[:, :, 7:8]
    rgb = out[:, :, 0:3] + out[:, :, 7:8] * background.to(g.dtype)[:, None, None]
    depth = out[:, :, 3:4] / alpha.clamp(min=1e-10)
    return dict(rgb=rgb, alpha=alpha, depth=depth, ccm=out[:, :, 4:7])


def _splats(
    g: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (camera, Gaussian) with its centre in front of the near plane, projected, sorted by
    camera then depth (front to back).

    Args:
        g: [B, N, 14].  c2w: [B, V, 4, 4].  K: [B, V, 3, 3].
    Returns:
        (table [S, 13] with columns ``MEAN2D``, ``CONIC``, ``ALPHA_O``, ``VALUES`` (rgb, z,
        centre + 0.5), footprint radius [S] (no gradient), camera index b V + v [S])
    """
    V = c2w.shape[1]
    mean_cam, R = world_to_camera(g[:, None, :, XYZ], c2w)  # [B, V, N, 3], [B, V, 3, 3]
    mean_cam, R, K = mean_cam.flatten(0, 1), R.flatten(0, 1), K.flatten(0, 1)
    camera, index = torch.nonzero(mean_cam[..., 2] > NEAR_PLANE, as_tuple=True)
    order = torch.argsort(mean_cam[camera, index, 2], stable=True)
    order = order[torch.argsort(camera[order], stable=True)]  # by camera, then front to back
    camera, index = camera[order], index[order]
    gs, mean_cam = g[camera // V, index], mean_cam[camera, index]  # [S, 14], [S, 3]
    z = mean_cam[:, 2]
    cov_world = covariance_3d(g[..., SCALE], g[..., ROTATION])[camera // V, index]
    cov2d = projected_covariance(mean_cam, cov_world, R[camera], K[camera], width, height)
    Ks = K[camera]
    means2d = torch.stack(
        [Ks[:, 0, 0] * mean_cam[:, 0] / z + Ks[:, 0, 2], Ks[:, 1, 1] * mean_cam[:, 1] / z + Ks[:, 1, 2]], -1
    )
    conics = torch.linalg.inv(cov2d)
    opacity = gs[:, OPACITY]
    table = torch.cat(
        [means2d, conics[:, 0, 0:1], conics[:, 0, 1:2], conics[:, 1, 1:2], opacity,
         gs[:, RGB], z[:, None], gs[:, XYZ] + 0.5], 1,
    )  # fmt: skip
    with torch.no_grad():
        radius = footprint_radius(cov2d, opacity.squeeze(1))
    return table, radius, camera


def _tile_pairs(
    means2d: torch.Tensor, radius: torch.Tensor, camera: torch.Tensor, tile_size: int,
    tiles_x: int, tiles_y: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tile, splat) for every tile each splat's footprint box reaches, grouped by tile and,
    within a tile, in the splats' (camera, depth) order. Tile ids count over all cameras:
    ``(camera * tiles_y + ty) * tiles_x + tx``.

    Args:
        means2d: [S, 2].  radius: [S] pixels.  camera: [S].
    Returns:
        (tile ids [M], splat indices [M]) sorted by tile id, stable.
    """
    lo = torch.floor((means2d - radius[:, None]) / tile_size)
    hi = torch.floor((means2d + radius[:, None]) / tile_size)
    x0, x1 = lo[:, 0].clamp(0, tiles_x - 1).long(), hi[:, 0].clamp(0, tiles_x - 1).long()
    y0, y1 = lo[:, 1].clamp(0, tiles_y - 1).long(), hi[:, 1].clamp(0, tiles_y - 1).long()
    on_screen = (
        (radius > 0)
        & (hi[:, 0] >= 0) & (lo[:, 0] <= tiles_x - 1)
        & (hi[:, 1] >= 0) & (lo[:, 1] <= tiles_y - 1)
    )  # fmt: skip
    index = torch.nonzero(on_screen).squeeze(1)
    x0, x1, y0, y1 = x0[index], x1[index], y0[index], y1[index]
    w, h = x1 - x0 + 1, y1 - y0 + 1
    n_pairs = w * h
    splat = torch.repeat_interleave(index, n_pairs)
    first = torch.cumsum(n_pairs, 0) - n_pairs
    local = torch.arange(int(n_pairs.sum()), device=index.device) - torch.repeat_interleave(
        first, n_pairs
    )
    w_rep = torch.repeat_interleave(w, n_pairs)
    tx = torch.repeat_interleave(x0, n_pairs) + local % w_rep
    ty = torch.repeat_interleave(y0 + camera[index] * tiles_y, n_pairs) + local // w_rep
    tile, perm = torch.sort(ty * tiles_x + tx, stable=True)
    return tile, splat[perm]


def _chunks(
    tile_of: torch.Tensor, splat_of: torch.Tensor, padding: int, pixels: int, budget: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Group the non-empty tiles into chunks of padded Gaussian lists: tiles by decreasing list
    length, a chunk closed when one more tile would exceed ``budget`` (tiles x longest list x
    ``pixels``) or when a list is shorter than half the chunk's longest (so padding is at most
    about half of a chunk).

    Args:
        tile_of, splat_of: [M] pairs sorted by tile (:func:`_tile_pairs`).  padding: the splat
            index to pad with.  pixels: pixels per tile.
    Returns:
        [(tile ids [T], splat indices [T, n] front to back, padded with ``padding``)]
    """
    tiles, counts = torch.unique_consecutive(tile_of, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    counts, by_length = torch.sort(counts, descending=True, stable=True)
    tiles, starts = tiles[by_length], starts[by_length]
    chunks, first, lengths = [], 0, counts.tolist()
    while first < len(lengths):
        longest = lengths[first]
        last = first + 1
        while (
            last < len(lengths)
            and (last + 1 - first) * longest * pixels <= budget
            and 2 * lengths[last] >= longest
        ):
            last += 1
        slot = torch.arange(longest, device=tile_of.device)
        pair = starts[first:last, None] + slot
        real = slot < counts[first:last, None]
        index = torch.where(real, splat_of[pair.clamp(max=len(splat_of) - 1)], padding)
        chunks.append((tiles[first:last], index))
        first = last
    return chunks


def _tile_pixels(
    tile: torch.Tensor, tile_size: int, tiles_x: int, tiles_y: int, dtype: torch.dtype
) -> torch.Tensor:
    """Pixel centres of tiles, row-major in each tile (those past the image's right and bottom
    edges included; the caller crops them).

    Args:
        tile: [T] tile ids (:func:`_tile_pairs`).
    Returns:
        [T, tile_size^2, 2] (x, y)
    """
    local = tile % (tiles_x * tiles_y)
    offset = torch.arange(tile_size**2, device=tile.device)
    x = (local % tiles_x)[:, None] * tile_size + offset % tile_size
    y = (local // tiles_x)[:, None] * tile_size + offset // tile_size
    return torch.stack([x, y], -1).to(dtype) + 0.5
