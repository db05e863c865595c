"""LGM (Tang et al. 2024; 3DTopia/LGM ``core/models.py``) with Ouroboros3D's time embedding:
4 views x (RGB + Plücker) -> one 14-channel Gaussian per output pixel per view.

Loading: ``from_pretrained`` reads the official safetensors checkpoints
(``model_fp16_fixrot.safetensors``, any float dtype, cast to the model's) and requires every
official key with its exact shape; only the new time-embedding keys may be missing (they keep
their zero initialisation). ``save_pretrained`` writes ``model.safetensors`` + ``config.json``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from common.atomic import atomic_dir
from model.gaussians import NUM_CHANNELS
from model.lgm.config import LGMConfig
from model.lgm.time_embedding import is_time_embedding_key
from model.lgm.unet import MultiViewUNet

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
IGNORED_PREFIXES = ("lpips_loss.",)  # LGM's training-time loss network, never ours


def activate_gaussians(x: torch.Tensor) -> torch.Tensor:
    """LGM's activations of the raw 14 channels (``core/models.py``): position clamped to
    [-1, 1], opacity sigmoid, scale ``0.1 softplus``, rotation normalised along its own 4
    components (the fixed version), colour ``0.5 tanh + 0.5``.

    Args:
        x: [..., 14] raw.
    Returns:
        [..., 14] activated, layout ``model/gaussians.py``.
    """
    return torch.cat(
        [
            x[..., 0:3].clamp(-1, 1),
            torch.sigmoid(x[..., 3:4]),
            0.1 * F.softplus(x[..., 4:7]),
            F.normalize(x[..., 7:11], dim=-1),
            0.5 * torch.tanh(x[..., 11:14]) + 0.5,
        ],
        -1,
    )


class LGM(nn.Module):
    def __init__(self, config: LGMConfig):
        super().__init__()
        self.config = config
        self.unet = MultiViewUNet(config, 9, NUM_CHANNELS)
        self.conv = nn.Conv2d(NUM_CHANNELS, NUM_CHANNELS, 1)

    def forward(self, images: torch.Tensor, c_noise: torch.Tensor | None = None) -> torch.Tensor:
        """Gaussians from 4 posed views, in LGM's frame.

        Args:
            images: [B, 4, 9, h, w] ImageNet-normalised RGB + Plücker rays (``inputs.py``).
            c_noise: [B] EDM noise level ``0.25 ln sigma`` of the views, or None (plain LGM).
        Returns:
            [B, 4 * s * s, 14] activated Gaussians, s = splat size for this input size.
        """
        B, V, C, H, W = images.shape
        if V != self.config.num_input_views or C != 9:
            raise ValueError(f"LGM expects [B, {self.config.num_input_views}, 9, h, w], got {tuple(images.shape)}")
        if c_noise is not None and c_noise.numel() != B:
            raise ValueError(f"c_noise: expected {B} values, got shape {tuple(c_noise.shape)}")
        x = self.conv(self.unet(images.reshape(B * V, C, H, W), c_noise))  # [B*V, 14, s, s]
        x = x.reshape(B, V, NUM_CHANNELS, *x.shape[-2:]).permute(0, 1, 3, 4, 2)
        return activate_gaussians(x.reshape(B, -1, NUM_CHANNELS))

    def enable_gradient_checkpointing(self) -> None:
        self.unet.gradient_checkpointing = True

    # ------------------------------------------------------------------ weights
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, config: LGMConfig | None = None) -> "LGM":
        """Load an official LGM safetensors file, or a folder written by :meth:`save_pretrained`.

        Args:
            path: ``*.safetensors`` file, or a folder holding ``model.safetensors`` (and
                ``config.json``, used when ``config`` is None).
            config: the architecture; required for a bare file.
        Raises:
            FileNotFoundError, ValueError naming the file and the offending keys.
        """
        path = Path(path)
        if path.is_dir():
            weights = path / WEIGHTS_NAME
            if config is None:
                if not (path / CONFIG_NAME).is_file():
                    raise FileNotFoundError(f"{path}: no {CONFIG_NAME} and no config given")
                config = LGMConfig.from_json((path / CONFIG_NAME).read_text())
        else:
            weights = path
        if config is None:
            raise ValueError(f"{path}: a bare weights file needs an LGMConfig")
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: LGM weights not found")
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{weights}: not a readable safetensors file ({e})") from e
        model = cls(config)
        model.load_official_state_dict(state, source=str(weights))
        return model

    def load_official_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Strict on every official key and shape; tolerant only of missing time-embedding keys.

        Tensors are cast to the model's dtype (the official files are fp16).
        """
        state = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
        own = self.state_dict()
        missing = [k for k in own if k not in state and not is_time_embedding_key(k)]
        unexpected = [k for k in state if k not in own]
        wrong = [f"{k}: {tuple(state[k].shape)} != {tuple(own[k].shape)}"
                 for k in state if k in own and state[k].shape != own[k].shape]  # fmt: skip
        if missing or unexpected or wrong:
            raise ValueError(
                f"{source}: does not match LGM config {self.config}:\n"
                f"  missing keys ({len(missing)}): {missing[:10]}\n"
                f"  unexpected keys ({len(unexpected)}): {unexpected[:10]}\n"
                f"  wrong shapes ({len(wrong)}): {wrong[:10]}"
            )
        absent = [k for k in own if k not in state]
        if absent:
            warnings.warn(f"{source}: {len(absent)} time-embedding tensors not in the file; "
                          "they keep their zero initialisation", stacklevel=3)  # fmt: skip
        dtype = next(self.parameters()).dtype
        self.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``model.safetensors`` and ``config.json`` into ``directory``, atomically
        (built in a temporary folder beside it, then moved in)."""
        with atomic_dir(directory) as tmp:
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            (tmp / CONFIG_NAME).write_text(self.config.to_json())
