"""LGM's reconstruction loss, Eq. 2 of Ouroboros3D (as LGM trains):
``L_rec = MSE(rgb) + MSE(alpha) + lambda * LPIPS(rgb)``, LPIPS with a VGG backbone on images
scaled to [-1, 1] and resized to at most 256 px.

The LPIPS network (``lpips`` package) is built once per device, frozen, in eval mode. Its
VGG16 backbone weights come from the torchvision hub cache (``TORCH_HOME``); where they are
not cached (no network here) the backbone is built with random weights (``pnet_rand=True``)
and a warning says, once, that LPIPS values are then NOT the real metric.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

LPIPS_MAX_SIZE = 256
VGG16_WEIGHTS = "vgg16-397923af.pth"  # torchvision's file name in <hub>/checkpoints


def vgg_weights_cached() -> bool:
    """True when torchvision's VGG16 ImageNet weights are in the torch hub cache."""
    return (Path(torch.hub.get_dir()) / "checkpoints" / VGG16_WEIGHTS).is_file()


@functools.lru_cache(maxsize=None)
def lpips_network(device: str = "cpu") -> torch.nn.Module:
    """The frozen LPIPS(VGG) module on ``device``, built once."""
    import lpips

    pretrained_backbone = vgg_weights_cached()
    if not pretrained_backbone:
        warnings.warn(
            "LPIPS: VGG16 ImageNet weights are not cached in "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'}; using a RANDOM backbone "
            "(pnet_rand=True). LPIPS losses/metrics are NOT meaningful until the weights are "
            "placed there.",
            stacklevel=2,
        )
    net = lpips.LPIPS(net="vgg", pnet_rand=not pretrained_backbone, verbose=False)
    net.requires_grad_(False)
    return net.eval().to(device)


def lpips_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean LPIPS(VGG) between images in [0, 1].

    Args:
        pred, target: [N, 3, H, W].
    Returns:
        scalar.
    """
    if pred.shape[-1] > LPIPS_MAX_SIZE:
        size = (LPIPS_MAX_SIZE, LPIPS_MAX_SIZE)
        pred = F.interpolate(pred, size, mode="bilinear", align_corners=False)
        target = F.interpolate(target, size, mode="bilinear", align_corners=False)
    net = lpips_network(str(pred.device))
    return net(pred * 2 - 1, target.to(pred.dtype) * 2 - 1).mean()


def reconstruction_loss(
    pred_rgb: torch.Tensor, pred_alpha: torch.Tensor, gt_rgb: torch.Tensor, gt_alpha: torch.Tensor,
    lpips_weight: float,
) -> dict[str, torch.Tensor]:
    """Eq. 2: ``MSE(rgb) + MSE(alpha) + lambda LPIPS``.

    Args:
        pred_rgb, gt_rgb: [B, V, 3, H, W] in [0, 1], over the same background.
        pred_alpha, gt_alpha: [B, V, 1, H, W] in [0, 1].
        lpips_weight: lambda (LGM: 1.0); 0 skips LPIPS.
    Returns:
        dict(loss, mse (rgb + alpha), lpips (unweighted; 0 when lambda = 0)).
    """
    if pred_rgb.shape != gt_rgb.shape or pred_alpha.shape != gt_alpha.shape:
        raise ValueError(f"prediction {tuple(pred_rgb.shape)}/{tuple(pred_alpha.shape)} and target "
                         f"{tuple(gt_rgb.shape)}/{tuple(gt_alpha.shape)} differ in shape")  # fmt: skip
    mse = F.mse_loss(pred_rgb, gt_rgb) + F.mse_loss(pred_alpha, gt_alpha)
    if lpips_weight > 0:
        lp = lpips_distance(pred_rgb.flatten(0, 1), gt_rgb.flatten(0, 1))
    else:
        lp = mse.new_zeros(())
    return dict(loss=mse + lpips_weight * lp, mse=mse, lpips=lp)
