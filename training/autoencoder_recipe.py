"""The two parts of the autoencoder recipe besides its loss that make a deep code carry colour
(BENCHMARKS.md, "Colour"): colour augmentation drawn per view, and a linear-path start.

Without them, ``AutoencoderKLTemporalDecoder`` at the tiny width learns to pass brightness
through its latent and paints colour from memory: held-out objects come back grey. With colour
drawn once a step the decoder chases the last steps' colours; with PyTorch's default init the
signal shrinks a third at every layer of the path from pixels to latent and back.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

AUGMENT_MODES = ("step", "orbit", "view", "none")
AUTOENCODER_INITS = ("default", "linear-path")  # PyTorch's, or init_linear_path


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mirror, channel permutation and hue rotation about the grey axis, one draw for all of
    ``x`` [B, V, 3, H, W] in [-1, 1] (greys, the white background among them, stay as they are)."""
    if torch.rand((), generator=g) < 0.5:
        x = x.flip(-1)
    x = x[:, :, torch.randperm(3, generator=g)]
    theta = float(torch.rand((), generator=g)) * 2 * math.pi
    k = torch.ones(3) / math.sqrt(3)
    K = torch.tensor([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    R = torch.eye(3) + math.sin(theta) * K + (1 - math.cos(theta)) * K @ K  # Rodrigues
    return torch.einsum("ij,bvjhw->bvihw", R.to(x), (x + 1) / 2).clamp(0, 1) * 2 - 1


def augment_views(x: torch.Tensor, g: torch.Generator, per: str) -> torch.Tensor:
    """``augment`` of [B, V, 3, H, W] drawn once per step (``per="step"``: every orbit of the batch
    the same colours), once per orbit, or once per view; ``"none"`` returns ``x``."""
    if per not in AUGMENT_MODES:
        raise ValueError(f"augmentation per {per!r}: choose one of {AUGMENT_MODES}")
    if per == "none":
        return x
    if per == "step":
        return augment(x, g)
    if per == "orbit":
        return torch.cat([augment(orbit[None], g) for orbit in x])
    return torch.cat([augment(view[None, None], g) for view in x.flatten(0, 1)]).view_as(x)


def init_linear_path(model: nn.Module) -> None:
    """Re-initialise ``AutoencoderKLTemporalDecoder`` so that it starts as a short linear chain:
    the last convolution of every residual branch (``conv2``) and every attention output
    projection zero (each block the identity), every other convolution and projection
    variance-preserving (``kaiming_normal_``, linear gain; biases zero), the decoder's
    ``time_conv_out`` the identity over time. PyTorch's default (variance ``1 / (3 fan_in)``)
    shrinks the signal a third at every layer of the path from pixels to latent and back."""
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Conv3d, nn.Linear)):
            if name.endswith("conv2") or name.endswith("to_out.0"):
                nn.init.zeros_(mod.weight)
            else:
                nn.init.kaiming_normal_(mod.weight, nonlinearity="linear")
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
    w = model.decoder.time_conv_out.weight
    with torch.no_grad():
        w.zero_()
        w[:, :, w.shape[2] // 2, 0, 0] = torch.eye(w.shape[0])
