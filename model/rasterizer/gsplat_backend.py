"""CUDA backend: gsplat's fused rasterizer, same maths and outputs as ``torch_reference``.

``gsplat.rasterization`` takes OpenCV world-to-camera matrices (``viewmats = inverse(c2w)``)
and pixel intrinsics, i.e. the project's camera model unchanged. The CCM is rendered as three
extra colour channels (the centres + 0.5) next to RGB, with ``render_mode="RGB+ED"`` adding the
expected depth; the background is composited here so that it applies to RGB only.
"""

from __future__ import annotations

import torch

from model.gaussians import OPACITY, RGB, ROTATION, SCALE, XYZ
from model.rasterizer.torch_reference import LOW_PASS, NEAR_PLANE


def render(
    g: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor, height: int, width: int,
    background: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Render ``[B, N, 14]`` Gaussians from ``[B, V]`` cameras with gsplat (CUDA only).

    Returns:
        dict(rgb [B, V, 3, H, W], alpha [B, V, 1, H, W], depth [B, V, 1, H, W],
        ccm [B, V, 3, H, W]), as ``render_gaussians`` documents.
    """
    from gsplat import rasterization  # imported lazily: it JIT-builds its CUDA extension

    dtype = g.dtype  # gsplat's kernels are float32; results are cast back
    g, c2w, K, background = g.float(), c2w.float(), K.float(), background.float()
    colors = torch.cat([g[..., RGB], g[..., XYZ] + 0.5], -1)  # [B, N, 6]
    out, alpha, _ = rasterization(
        means=g[..., XYZ].contiguous(),
        quats=g[..., ROTATION].contiguous(),
        scales=g[..., SCALE].contiguous(),
        opacities=g[..., OPACITY].squeeze(-1).contiguous(),
        colors=colors.contiguous(),
        viewmats=torch.linalg.inv(c2w).contiguous(),
        Ks=K.contiguous(),
        width=width,
        height=height,
        near_plane=NEAR_PLANE,
        eps2d=LOW_PASS,
        render_mode="RGB+ED",
        rasterize_mode="classic",
    )  # out [B, V, H, W, 7], alpha [B, V, H, W, 1]
    out = out.permute(0, 1, 4, 2, 3)
    alpha = alpha.permute(0, 1, 4, 2, 3)
    rgb = out[:, :, 0:3] + (1.0 - alpha) * background.to(out.dtype).view(1, 1, 3, 1, 1)
    out = dict(rgb=rgb, alpha=alpha, depth=out[:, :, 6:7], ccm=out[:, :, 3:6])
    return {key: value.to(dtype) for key, value in out.items()}
