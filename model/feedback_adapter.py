"""3D-aware feedback adapters (Sec. 3.3, appendix A.3, Table 3, Eqs. 12-14).

One adapter per feedback map (F^0 for the CCM P, F^1 for the RGB render T). Each is
diffusers' T2I-Adapter "full adapter" [49] built to Table 3: PixelUnshuffle(8) of the
3 x 512 x 512 render (192 x 64 x 64), a 3x3 conv to 320 channels, then four scales of three
residual blocks (3x3 conv, ReLU, 1x1 conv, skip: Fig. 10) at 320 x 64, 640 x 32, 1280 x 16 and
1280 x 8, with 2x average-pool downsampling (and a 1x1 conv where channels change) between
scales. At full size the two adapters hold about 0.23 B parameters.
"""

from __future__ import annotations

import torch
from diffusers import T2IAdapter

from model.config import OuroborosConfig

PIXEL_UNSHUFFLE = 8  # 512 px render -> 64 x 64, the latent resolution


def build_adapter(cfg: OuroborosConfig) -> T2IAdapter:
    """One feedback injection network of Table 3 (channels = the UNet's down-block channels)."""
    return T2IAdapter(
        in_channels=3,
        channels=list(cfg.adapter_channels),
        num_res_blocks=cfg.adapter_res_blocks,
        downscale_factor=PIXEL_UNSHUFFLE,
        adapter_type="full_adapter",
    )


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
