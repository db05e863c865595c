"""The time embedding Ouroboros3D adds to LGM (Sec. 3.2): "a zero-initialized time embedding
layer within the original U-Net structure of the LGM".

``c_noise = 0.25 ln sigma`` (EDM, appendix A.1) -> sinusoidal features (diffusers
``Timesteps``, as SVD's UNet embeds the same ``c_noise``) -> 2-layer MLP (diffusers
``TimestepEmbedding``) -> in every ResnetBlock a ``time_emb_proj`` Linear, ZERO-initialised,
whose output is added to the features after ``conv1`` (as in DDPM / diffusers' ResnetBlock2D).
The projections are the last layer of the embedding path: at initialisation the U-Net is
exactly the pretrained LGM, whatever ``c_noise`` is.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

TIME_EMBEDDING_KEYS = ("time_embedding.", "time_emb_proj.")


def is_time_embedding_key(key: str) -> bool:
    """True for the parameters Ouroboros3D adds to LGM (absent from official checkpoints)."""
    return any(part in key for part in TIME_EMBEDDING_KEYS)


class NoiseLevelEmbedding(nn.Module):
    """``c_noise [B] -> [B, time_embed_dim]``: sinusoidal features then an MLP."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.sinusoidal = Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.mlp = TimestepEmbedding(channels, dim)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoidal(c_noise.flatten()).to(self.mlp.linear_1.weight.dtype))


def zero_linear(in_features: int, out_features: int) -> nn.Linear:
    """A Linear layer with zero weight and bias (its output is 0 until it is trained)."""
    layer = nn.Linear(in_features, out_features)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer
