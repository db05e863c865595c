"""Training views: the decoded frames of one orbit -> the model's views (docs/design.md section 4).

Which frames are the views is the conventions' (``conventions.training_frame_indices``: the
condition frame ``s``, then ``s+2, ..., s+14 (mod 16)``); this module turns them into what the
model sees: RGBA composited over the background, resized to the model resolution, cameras and
CCM in the model frame of the condition view (``conventions.to_condition_frame``). The training
loader and the GSO benchmark both use it, so that evaluation and training see views alike.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from common.conventions import to_condition_frame
from common.orbit import OrbitRender


def composite_over(rgba: torch.Tensor, background) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight-alpha compositing ``rgb * a + bg * (1 - a)``.

    Args:
        rgba: [V, 4, H, W] in [0, 1].  background: [3] in [0, 1].
    Returns:
        rgb [V, 3, H, W], alpha [V, 1, H, W]
    """
    alpha = rgba[:, 3:]
    bg = torch.as_tensor(background, dtype=rgba.dtype).view(1, 3, 1, 1)
    return rgba[:, :3] * alpha + bg * (1.0 - alpha), alpha


def ccm_to_model_frame(ccm: torch.Tensor, mask: torch.Tensor, T: np.ndarray) -> torch.Tensor:
    """Rotate a CCM into the model frame: ``R (c - 0.5) + 0.5`` on foreground, 0 elsewhere.

    The rotation about +Z can move x, y outside [0, 1] (up to 0.5 +- 0.707): values are not
    clipped, they are the exact model-frame points (conventions.condition_frame_transform).

    Args:
        ccm: [V, 3, H, W].  mask: [V, 1, H, W] bool.  T: [4, 4] world -> model frame.
    """
    R = torch.as_tensor(T[:3, :3], dtype=ccm.dtype)
    rotated = torch.einsum("ij,vjhw->vihw", R, ccm - 0.5) + 0.5
    return torch.where(mask, rotated, torch.zeros_like(rotated))


def resize_ccm(ccm: np.ndarray, resolution: int) -> torch.Tensor:
    """CCM frames [V, H, W, 3] -> [V, 3, R, R], nearest-exact (pixel-centre) sampling, so every
    value is a real surface point and no value is blended across a depth edge."""
    ccm = torch.from_numpy(ccm).permute(0, 3, 1, 2)
    if ccm.shape[-1] != resolution:
        ccm = F.interpolate(ccm, size=resolution, mode="nearest-exact")
    return ccm


def to_training_views(orbit: OrbitRender, resolution: int, background) -> dict:
    """Decoded views -> one training sample in the model frame at the model resolution.

    RGB and alpha are resized with antialiasing (compositing first is exact: both are linear);
    the CCM, when the orbit holds one, with :func:`resize_ccm`.

    Args:
        orbit: the views (``training.loader.decode_views``, or a render of the training frames), view 0 =
            condition.
    Returns:
        dict(images [V,3,R,R] in [0,1], alphas [V,1,R,R], c2w [V,4,4] model frame, K [V,3,3]
        pixels at R, and ccm [V,3,R,R] model frame when ``orbit.ccm`` is not None), all float32
        tensors.
    """
    rgba = torch.from_numpy(orbit.rgba).permute(0, 3, 1, 2).float() / 255.0
    rgb, alpha = composite_over(rgba, background)
    size = rgba.shape[-1]
    if size != resolution:
        rgb = F.interpolate(rgb, size=resolution, mode="bilinear", antialias=True, align_corners=False)
        alpha = F.interpolate(alpha, size=resolution, mode="bilinear", antialias=True, align_corners=False)
    c2w, T = to_condition_frame(orbit.c2w)
    K = orbit.K.copy()
    K[:, :2] *= resolution / size
    views = dict(
        images=rgb.clamp(0, 1).contiguous(),
        alphas=alpha.clamp(0, 1).contiguous(),
        c2w=torch.from_numpy(c2w).float(),
        K=torch.from_numpy(K),
    )
    if orbit.ccm is not None:
        ccm = resize_ccm(orbit.ccm, resolution)
        views["ccm"] = ccm_to_model_frame(ccm, (ccm > 0).any(1, keepdim=True), T).contiguous()
    return views
