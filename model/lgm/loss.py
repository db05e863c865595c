"""LGM's reconstruction loss, Eq. 2 of Ouroboros3D (as LGM trains):
``L_rec = MSE(rgb) + MSE(alpha) + lambda * LPIPS(rgb)``, LPIPS with a VGG backbone on images
scaled to [-1, 1] and resized to at most 256 px.

The LPIPS network comes from the project's one builder (:func:`common.perceptual.builder.build_lpips`,
ImageNet VGG16 trunk from the install step's cache), built once per device, frozen, in eval
mode. A random trunk is refused unless the model config allows it (``allow_random_lpips``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from common.perceptual.builder import build_lpips

LPIPS_MAX_SIZE = 256


@functools.lru_cache(maxsize=None)
def lpips_network(device: str = "cpu", allow_random: bool = False) -> torch.nn.Module:
    """The frozen LPIPS(VGG) module on ``device``, built once (``.trunk`` says which trunk)."""
    return build_lpips("vgg", allow_random=allow_random).to(device)


def lpips_distance(pred: torch.Tensor, target: torch.Tensor, allow_random: bool = False) -> torch.Tensor:
    """Mean LPIPS(VGG) between images in [0, 1].

    Args:
        pred, target: [N, 3, H, W].
        allow_random: use a random trunk when the ImageNet one is not cached.
    Returns:
        scalar.
    """
    if pred.shape[-1] > LPIPS_MAX_SIZE:
        size = (LPIPS_MAX_SIZE, LPIPS_MAX_SIZE)
        pred = F.interpolate(pred, size, mode="bilinear", align_corners=False)
        target = F.interpolate(target, size, mode="bilinear", align_corners=False)
    net = lpips_network(str(pred.device), allow_random)
    return net(pred * 2 - 1, target.to(pred.dtype) * 2 - 1).mean()


def reconstruction_loss(
    pred_rgb: torch.Tensor, pred_alpha: torch.Tensor, gt_rgb: torch.Tensor, gt_alpha: torch.Tensor,
    lpips_weight: float, allow_random_lpips: bool = False,
) -> dict[str, torch.Tensor]:
    """Eq. 2: ``MSE(rgb) + MSE(alpha) + lambda LPIPS``.

    Args:
        pred_rgb, gt_rgb: [B, V, 3, H, W] in [0, 1], over the same background.
        pred_alpha, gt_alpha: [B, V, 1, H, W] in [0, 1].
        lpips_weight: lambda (LGM: 1.0); 0 skips LPIPS.
        allow_random_lpips: accept a random VGG trunk when the ImageNet one is not cached.
    Returns:
        dict(loss, mse (rgb + alpha), lpips (unweighted; 0 when lambda = 0)).
    """
    if pred_rgb.shape != gt_rgb.shape or pred_alpha.shape != gt_alpha.shape:
        raise ValueError(f"prediction {tuple(pred_rgb.shape)}/{tuple(pred_alpha.shape)} and target "
                         f"{tuple(gt_rgb.shape)}/{tuple(gt_alpha.shape)} differ in shape")  # fmt: skip
    mse = F.mse_loss(pred_rgb, gt_rgb) + F.mse_loss(pred_alpha, gt_alpha)
    if lpips_weight > 0:
        lp = lpips_distance(pred_rgb.flatten(0, 1), gt_rgb.flatten(0, 1), allow_random_lpips)
    else:
        lp = mse.new_zeros(())
    return dict(loss=mse + lpips_weight * lp, mse=mse, lpips=lp)
