"""Differentiable 3D Gaussian rasterization with one API and two backends.

``backend="auto"``: gsplat's CUDA kernels for CUDA tensors, the pure-PyTorch reference
(``torch_reference``) otherwise. ``"torch"`` forces the reference (any device), ``"gsplat"``
requires CUDA.
"""

from __future__ import annotations

import torch

from model.cameras import geometry_dtype
from model.gaussians import check_gaussians
from model.rasterizer import gsplat_backend, torch_reference

BACKENDS = ("auto", "torch", "gsplat")


def render_gaussians(
    gaussians: torch.Tensor,
    c2w: torch.Tensor,
    K: torch.Tensor,
    height: int,
    width: int,
    background: torch.Tensor | float = 1.0,
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """Render Gaussians into every camera of their batch element.

    Args:
        gaussians: [B, N, 14] activated Gaussians (``model/gaussians.py``), world = the cameras'.
            Half-precision Gaussians are rendered in float32 (the outputs are float32 then).
        c2w: [B, V, 4, 4] OpenCV camera-to-world.  K: [B, V, 3, 3] pixels of (height, width).
        background: colour [3] (or a scalar grey) behind the RGB image.
        backend: "auto" | "torch" | "gsplat".
    Returns:
        dict of [B, V, C, H, W] tensors: ``rgb`` (C=3, over the background), ``alpha`` (1),
        ``depth`` (1, expected z-depth of the centres, 0 where empty), ``ccm`` (3, centres
        mapped by p + 0.5 and composited over 0, like the data's CCM).
    """
    check_gaussians(gaussians)
    if gaussians.ndim != 3:
        raise ValueError(f"gaussians: expected [B, N, 14], got {tuple(gaussians.shape)}")
    B = gaussians.shape[0]
    if c2w.ndim != 4 or c2w.shape[0] != B or c2w.shape[-2:] != (4, 4):
        raise ValueError(f"c2w: expected [{B}, V, 4, 4], got {tuple(c2w.shape)}")
    if K.shape != c2w.shape[:2] + (3, 3):
        raise ValueError(f"K: expected {tuple(c2w.shape[:2]) + (3, 3)}, got {tuple(K.shape)}")
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} not in {BACKENDS}")
    if backend == "auto":
        backend = "gsplat" if gaussians.is_cuda else "torch"
    if backend == "gsplat" and not gaussians.is_cuda:
        raise ValueError("backend 'gsplat' needs CUDA tensors; use 'torch' on the CPU")
    gaussians = gaussians.to(geometry_dtype(gaussians.dtype))  # covariances, projection: >= fp32
    bg = torch.as_tensor(background, dtype=gaussians.dtype, device=gaussians.device)
    bg = bg.expand(3) if bg.ndim == 0 else bg
    c2w, K = c2w.to(gaussians), K.to(gaussians)  # dtype and device of the Gaussians

    if backend == "gsplat":
        return gsplat_backend.render(gaussians, c2w, K, height, width, bg)
    return torch_reference.render_views(gaussians, c2w, K, height, width, bg)
