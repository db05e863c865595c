"""Per-pixel camera embedding: Plucker rays of every latent pixel through a 2-layer MLP (Sec. 3.1).

The rays ``(o x d, d)`` (model frame, OpenCV cameras, pixel centres at +0.5) are computed at
the latent resolution with the intrinsics rescaled to it, then mapped by two 1x1 convolutions
(a per-pixel MLP) to the channels of the UNet's ``conv_in`` output and added there (see
:class:`model.multiview_unet.MultiViewUNet`). The last layer is zero-initialised, so a
pretrained SVD UNet computes exactly what it did before fine-tuning starts.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from model.cameras import plucker_rays, scale_intrinsics

PLUCKER_CHANNELS = 6


def latent_plucker_rays(c2w: torch.Tensor, K: torch.Tensor, image_size: int, latent_size: int) -> torch.Tensor:
    """Plucker rays of the latent pixels.

    Args:
        c2w: [B, F, 4, 4] model-frame OpenCV camera-to-world.
        K: [B, F, 3, 3] in pixels of the ``image_size`` images.
    Returns:
        [B, F, 6, latent_size, latent_size]
    """
    K_latent = scale_intrinsics(K, image_size, latent_size)
    return plucker_rays(c2w, K_latent, latent_size, latent_size)


class CameraEmbedding(ModelMixin, ConfigMixin):
    """Two-layer per-pixel MLP (1x1 convs) from Plucker rays to UNet features (Sec. 3.1).

    Args:
        out_channels: channels of the UNet's ``conv_in`` output (320 for SVD).
        hidden_channels: width of the hidden layer.
    """

    @register_to_config
    def __init__(self, out_channels: int = 320, hidden_channels: int = 320):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Conv2d(PLUCKER_CHANNELS, hidden_channels, kernel_size=1),
            nn.SiLU(),
            nn.Conv2d(hidden_channels, out_channels, kernel_size=1),
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, plucker: torch.Tensor) -> torch.Tensor:
        """[N, 6, h, w] rays -> [N, out_channels, h, w] features."""
        return self.mlp(plucker)
