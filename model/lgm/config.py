"""LGM option sets: the official ``lrm`` and ``big`` (3DTopia/LGM ``core/options.py``) and a
``tiny`` one for CPU tests. Only the fields that shape the network live here; LGM's renderer
options (fovy, znear, zfar) are not used: our rasterizer takes the real cameras.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class LGMConfig:
    """Architecture of LGM's asymmetric multi-view U-Net (plus our time embedding).

    ``splat_size`` (Gaussians per side per view) = ``input_size / 2^(len(down)-1) *
    2^(len(up)-1)``; the U-Net itself accepts any input size divisible by ``2^(len(down)-1)``.
    """

    input_size: int = 256
    down_channels: tuple = (64, 128, 256, 512, 1024, 1024)
    down_attention: tuple = (False, False, False, True, True, True)
    mid_attention: bool = True
    up_channels: tuple = (1024, 1024, 512, 256)
    up_attention: tuple = (True, True, True, False)
    layers_per_block: int = 2
    attention_heads: int = 16
    norm_groups: int = 32
    num_input_views: int = 4
    # New (Ouroboros3D Sec. 3.2): time embedding of c_noise, sinusoidal -> MLP -> per block.
    time_embed_channels: int = 256
    time_embed_dim: int = 512

    def __post_init__(self):
        for name in ("down_channels", "down_attention", "up_channels", "up_attention"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.down_attention) != len(self.down_channels):
            raise ValueError("down_attention must have one entry per down block")
        if len(self.up_attention) != len(self.up_channels):
            raise ValueError("up_attention must have one entry per up block")
        if len(self.up_channels) >= len(self.down_channels):
            raise ValueError("LGM's U-Net has fewer up blocks than down blocks")
        channels = self.down_channels + self.up_channels
        if any(c % self.norm_groups for c in channels):
            raise ValueError(f"every channel count must be divisible by norm_groups={self.norm_groups}")
        if self.input_size % 2 ** (len(self.down_channels) - 1):
            raise ValueError(f"input_size {self.input_size} not divisible by the down-sampling")

    @property
    def splat_size(self) -> int:
        return self.input_size // 2 ** (len(self.down_channels) - 1) * 2 ** (len(self.up_channels) - 1)

    @classmethod
    def preset(cls, name: str) -> "LGMConfig":
        """``lrm`` (official default, 64^2 Gaussians per view), ``big`` (official, 128^2),
        ``tiny`` (CPU tests: 32 px input, 16^2 Gaussians per view)."""
        if name not in PRESETS:
            raise ValueError(f"unknown LGM preset {name!r}; choose from {sorted(PRESETS)}")
        return PRESETS[name]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "LGMConfig":
        data = json.loads(text)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown LGM config fields {sorted(unknown)}")
        return cls(**data)


PRESETS = {
    "lrm": LGMConfig(),
    "big": LGMConfig(up_channels=(1024, 1024, 512, 256, 128), up_attention=(True, True, True, False, False)),
    "tiny": LGMConfig(
        input_size=32,
        down_channels=(16, 32, 64),
        down_attention=(False, False, True),
        up_channels=(64, 32),
        up_attention=(True, False),
        layers_per_block=1,
        attention_heads=4,
        norm_groups=8,
        time_embed_channels=32,
        time_embed_dim=64,
    ),
}
