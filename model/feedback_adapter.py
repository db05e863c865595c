"""3D-aware feedback adapters (Sec. 3.3, appendix A.3, Table 3, Eqs. 12-14).

One adapter per feedback map (F^0 for the CCM P, F^1 for the RGB render T). Each is
diffusers' T2I-Adapter "full adapter" [49] built to Table 3: PixelUnshuffle(8) of the
3 x 512 x 512 render (192 x 64 x 64), a 3x3 conv to 320 channels, then four scales of three
residual blocks (3x3 conv, ReLU, 1x1 conv, skip: Fig. 10) at 320 x 64, 640 x 32, 1280 x 16 and
1280 x 8, with 2x average-pool downsampling (and a 1x1 conv where channels change) between
scales. At full size the two adapters hold about 0.23 B parameters.

Initialisation: a fresh adapter outputs exactly zero for any input (its input convolution, the
last convolution of every residual block and the channel-changing convolutions' biases start at
zero; ``conv_in`` and those last convolutions get a gradient at the first step, the rest from
the second). Adding it to a pretrained
UNet therefore leaves that UNet's function unchanged at the start of fine-tuning, as the
zero-initialised camera MLP and LGM time embedding do (docs/model.md, "Initialisation").
"""

from __future__ import annotations

import torch
from diffusers import T2IAdapter

from model.config import OuroborosConfig

PIXEL_UNSHUFFLE = 8  # 512 px render -> 64 x 64, the latent resolution


def build_adapter(cfg: OuroborosConfig) -> T2IAdapter:
    """One feedback injection network of Table 3 (channels = the UNet's down-block channels),
    zero at initialisation (:func:`zero_output_init`)."""
    adapter = T2IAdapter(
        in_channels=3,
        channels=list(cfg.adapter_channels),
        num_res_blocks=cfg.adapter_res_blocks,
        downscale_factor=PIXEL_UNSHUFFLE,
        adapter_type="full_adapter",
    )
    return zero_output_init(adapter)


@torch.no_grad()
def zero_output_init(adapter: T2IAdapter) -> T2IAdapter:
    """Make a full adapter output exactly zero: ``conv_in`` = 0 makes the first block's input 0;
    each residual block ``x + block2(relu(block1(x)))`` with ``block2`` = 0 keeps it 0; the
    channel-changing 1x1 ``in_conv`` maps 0 to its bias, set to 0. ``block1``'s weights and
    biases stay random, so ``block2`` gets a gradient at once, and ``conv_in`` gets one through
    the residual identities; the others follow once ``conv_in`` is non-zero (ControlNet's zero
    convolutions, inside T2I-Adapter's own layers, so T2I-Adapter checkpoints still load)."""
    full = adapter.adapter
    for conv in (full.conv_in, *(r.block2 for block in full.body for r in block.resnets)):
        conv.weight.zero_()
        conv.bias.zero_()
    for block in full.body:
        if getattr(block, "in_conv", None) is not None:
            block.in_conv.bias.zero_()
    return adapter


def feedback_features(
    ccm_adapter: T2IAdapter, rgb_adapter: T2IAdapter | None, ccm: torch.Tensor, rgb: torch.Tensor | None
) -> list[torch.Tensor]:
    """Sum of the adapters' multi-scale features, ``F_p^i + F_t^i`` (Eqs. 12-14).

    Args:
        ccm: [N, 3, H, W] rendered canonical coordinates map P in [0, 1] (0 = nothing rendered).
        rgb: [N, 3, H, W] rendered colour T in [0, 1], or None for CCM-only feedback.
    Returns:
        four tensors [N, C_i, H / 8 / 2^i, W / 8 / 2^i], to be added to the UNet encoder scales.
    """
    features = ccm_adapter(ccm)  # Eq. 12
    if rgb_adapter is not None:
        features = [f_p + f_t for f_p, f_t in zip(features, rgb_adapter(rgb))]  # Eq. 13, 14
    return features
