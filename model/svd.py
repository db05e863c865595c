"""Stable Video Diffusion components: build from configs, load and save in SVD's folder layout.

The layout is the one of ``stabilityai/stable-video-diffusion-img2vid`` on the hub::

    model_index.json  unet/  vae/  image_encoder/  feature_extractor/  scheduler/

Each part is loaded with its library's own ``from_pretrained(path_or_hub_id, subfolder=...)``
(optionally ``variant="fp16"``), so a hub id, a hub snapshot and a local folder all work.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, UNetSpatioTemporalConditionModel
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from common.atomic import atomic_write_text
from model.config import OuroborosConfig

SUBFOLDERS = ("unet", "vae", "image_encoder", "feature_extractor")

# stabilityai/stable-video-diffusion-img2vid scheduler/scheduler_config.json (written for
# compatibility with StableVideoDiffusionPipeline; our sampler uses model/edm.py).
SVD_SCHEDULER_CONFIG = dict(
    beta_end=0.012,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    interpolation_type="linear",
    num_train_timesteps=1000,
    prediction_type="v_prediction",
    sigma_max=700.0,
    sigma_min=0.002,
    steps_offset=1,
    timestep_spacing="leading",
    timestep_type="continuous",
    use_karras_sigmas=True,
)


@dataclass
class SVDComponents:
    unet: UNetSpatioTemporalConditionModel
    vae: AutoencoderKLTemporalDecoder
    image_encoder: CLIPVisionModelWithProjection
    feature_extractor: CLIPImageProcessor


def to_vae_pixels(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (the project's convention, docs/interfaces.md) -> SVD's VAE pixel range
    [-1, 1]. Same shape."""
    return images * 2.0 - 1.0


def from_vae_pixels(images: torch.Tensor) -> torch.Tensor:
    """The VAE decoder's pixels (nominally [-1, 1]) -> images in [0, 1], clamped. Same shape."""
    return ((images + 1.0) / 2.0).clamp(0.0, 1.0)


@contextmanager
def vae_encoding(vae: AutoencoderKLTemporalDecoder):
    """Run the VAE in float32 inside the block when its config has ``force_upcast`` and its
    weights are half precision, then restore their dtype (StableVideoDiffusionPipeline upcasts
    a ``force_upcast`` VAE for encoding the same way; SVD's VAE overflows in fp16).

    Unlike the pipeline, which upcasts only fp16, bf16 weights are upcast too: bf16 keeps fp32's
    range but only 8 bits of mantissa, and the latents are the training targets.
    """
    dtype = vae.dtype
    upcast = bool(getattr(vae.config, "force_upcast", False)) and dtype in (torch.float16, torch.bfloat16)
    # nn.Module.to, not ModelMixin.to: diffusers 0.42's logs a warning on every dtype cast
    if upcast:
        torch.nn.Module.to(vae, torch.float32)
    try:
        yield
    finally:
        if upcast:
            torch.nn.Module.to(vae, dtype)


def build_svd_components(cfg: OuroborosConfig) -> SVDComponents:
    """Randomly initialised SVD parts from the config's component kwargs."""
    return SVDComponents(
        unet=UNetSpatioTemporalConditionModel(**cfg.unet),
        vae=AutoencoderKLTemporalDecoder(**cfg.vae),
        image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg.image_encoder)),
        feature_extractor=CLIPImageProcessor(**cfg.feature_extractor),
    )


# Keys of the parts' saved configs that are the libraries' bookkeeping, not constructor kwargs.
_CONFIG_BOOKKEEPING = {"architectures", "dtype", "image_processor_type", "model_type", "processor_class",
                       "torch_dtype", "transformers_version"}


def component_configs(components: SVDComponents) -> dict:
    """The parts' own configs as the kwargs of :func:`build_svd_components`: ``{"unet", "vae",
    "image_encoder", "feature_extractor"}`` -> dict. ``build_svd_components`` of a config holding
    them builds parts of the same architecture (what ``OuroborosConfig`` records of parts loaded
    from ``svd_path``, so that the config describes the parts it was saved with)."""
    def kwargs(config: dict) -> dict:
        return {k: v for k, v in config.items() if not k.startswith("_") and k not in _CONFIG_BOOKKEEPING}

    return dict(unet=kwargs(dict(components.unet.config)), vae=kwargs(dict(components.vae.config)),
                image_encoder=kwargs(components.image_encoder.config.to_diff_dict()),
                feature_extractor=kwargs(components.feature_extractor.to_dict()))


def load_svd_components(
    path: str | os.PathLike, variant: str | None = None, dtype: torch.dtype | None = None
) -> SVDComponents:
    """Load UNet, VAE, CLIP image encoder and feature extractor from an SVD-layout folder or hub id.

    Args:
        path: local folder or hub id (e.g. ``stabilityai/stable-video-diffusion-img2vid``).
        variant: weight variant such as ``"fp16"`` (files ``*.fp16.safetensors``).
        dtype: cast the weights to this dtype (default: as stored).
    Raises:
        FileNotFoundError: a local folder lacks one of the four subfolders.
        OSError: the libraries' own loading errors, prefixed with the part being loaded.
    """
    path_str = os.fspath(path)
    if Path(path_str).exists():
        missing = [s for s in SUBFOLDERS if not (Path(path_str) / s).is_dir()]
        if missing:
            raise FileNotFoundError(f"{path_str}: not an SVD folder, missing subfolders {missing}")
    parts = {}
    loaders = {
        "unet": lambda: UNetSpatioTemporalConditionModel.from_pretrained(
            path_str, subfolder="unet", variant=variant, torch_dtype=dtype
        ),
        "vae": lambda: AutoencoderKLTemporalDecoder.from_pretrained(
            path_str, subfolder="vae", variant=variant, torch_dtype=dtype
        ),
        "image_encoder": lambda: CLIPVisionModelWithProjection.from_pretrained(
            path_str, subfolder="image_encoder", variant=variant, dtype=dtype
        ),
        "feature_extractor": lambda: CLIPImageProcessor.from_pretrained(path_str, subfolder="feature_extractor"),
    }
    for name, load in loaders.items():
        try:
            parts[name] = load()
        except (OSError, ValueError, EnvironmentError) as err:
            raise OSError(f"{path_str}: cannot load SVD part '{name}' (variant={variant}): {err}") from err
    return SVDComponents(**parts)


def save_svd_components(components: SVDComponents, out_dir: str | os.PathLike, variant: str | None = None) -> None:
    """Write the parts in SVD's layout (plus scheduler/ and model_index.json)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    components.unet.save_pretrained(out / "unet", variant=variant)
    components.vae.save_pretrained(out / "vae", variant=variant)
    components.image_encoder.save_pretrained(out / "image_encoder", variant=variant)
    components.feature_extractor.save_pretrained(out / "feature_extractor")
    EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG).save_pretrained(out / "scheduler")
    index = {
        "_class_name": "StableVideoDiffusionPipeline",
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "unet": ["diffusers", "UNetSpatioTemporalConditionModel"],
        "vae": ["diffusers", "AutoencoderKLTemporalDecoder"],
    }
    atomic_write_text(out / "model_index.json", json.dumps(index, indent=2))
