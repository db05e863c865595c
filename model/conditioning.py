"""SVD's image conditioning and classifier-free guidance (Sec. 3.1; StableVideoDiffusionPipeline).

The condition image enters the UNet in three ways, exactly as in SVD:
1. its CLIP image embedding is the cross-attention context (``[B, 1, D]``);
2. the VAE latent of the noise-augmented image (latent-distribution mode, *not* multiplied by
   the VAE scaling factor) is concatenated on channels to every frame's noisy latent;
3. the added time ids ``(fps, motion bucket, noise augmentation strength)``.

Training drops the conditions for classifier-free guidance; sampling combines conditional and
unconditional predictions with a guidance scale that grows linearly over the frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from diffusers import AutoencoderKLTemporalDecoder
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from model.config import ConditioningConfig
from model.svd import to_vae_pixels, vae_encoding


def clip_image_embedding(
    image_encoder: CLIPVisionModelWithProjection, feature_extractor: CLIPImageProcessor, image: torch.Tensor
) -> torch.Tensor:
    """CLIP embedding of the condition image as SVD computes it.

    The image is resized with antialiasing to the encoder's input size (SVD: 224), clamped to
    [0, 1] and normalised with the feature extractor's mean and std, in float32 whatever the
    encoder's dtype (antialiased resizes have no half-precision kernels on the CPU); only the
    normalised pixels are cast to the encoder's dtype.

    Args:
        image: [B, 3, H, W] in [0, 1].
    Returns:
        [B, 1, projection_dim]
    """
    crop = feature_extractor.crop_size
    size = (crop["height"], crop["width"])
    x = nnf.interpolate(image.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    x = x.clamp(0.0, 1.0)
    mean = torch.tensor(feature_extractor.image_mean, dtype=x.dtype, device=x.device)[:, None, None]
    std = torch.tensor(feature_extractor.image_std, dtype=x.dtype, device=x.device)[:, None, None]
    pixel_values = ((x - mean) / std).to(image_encoder.dtype)
    return image_encoder(pixel_values=pixel_values).image_embeds.unsqueeze(1)


def condition_latent(
    vae: AutoencoderKLTemporalDecoder,
    image: torch.Tensor,
    noise_aug_strength: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """VAE latent of the noise-augmented condition image (SVD: ``image + strength * n`` in the
    VAE's [-1, 1] pixels, mode).

    The augmentation is computed in float32; the VAE encodes in float32 when its config asks
    for it (:func:`model.svd.vae_encoding`).

    Args:
        image: [B, 3, H, W] in [0, 1].
    Returns:
        [B, 4, H/8, W/8] (unscaled, as SVD's pipeline concatenates it), in the encoding dtype.
    """
    image = to_vae_pixels(image.float())
    noise = randn_tensor(image.shape, generator=generator, device=image.device, dtype=image.dtype)
    with vae_encoding(vae):
        return vae.encode((image + noise_aug_strength * noise).to(vae.dtype)).latent_dist.mode()


def added_time_ids(cfg: ConditioningConfig, batch_size: int, device, dtype=torch.float32) -> torch.Tensor:
    """SVD's micro-conditioning ``[fps, motion_bucket_id, noise_aug_strength]`` per sample. Returns [B, 3]."""
    ids = torch.tensor([cfg.fps, cfg.motion_bucket_id, cfg.noise_aug_strength], dtype=dtype, device=device)
    return ids.expand(batch_size, 3)


def conditioning_dropout(
    batch_size: int, prob: float, generator: torch.Generator | None = None, device="cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which samples lose which condition, InstructPix2Pix-style (Brooks et al. 2023, Sec. 3.3).

    With ``r ~ U(0, 1)``: the CLIP embedding is dropped for ``r < 2p``, the image latent for
    ``p <= r < 3p``; so each alone with probability p and both (the unconditional model that
    sampling uses) with probability p.

    Returns:
        (drop_embedding [B] bool, drop_latent [B] bool)
    """
    r = torch.rand(batch_size, generator=generator, device=generator.device if generator else device).to(device)
    return r < 2 * prob, (r >= prob) & (r < 3 * prob)


def frame_guidance_scales(min_guidance: float, max_guidance: float, num_frames: int) -> torch.Tensor:
    """SVD's per-frame guidance: ``linspace(min, max, F)``, the condition frame gets ``min``. Returns [F]."""
    return torch.linspace(min_guidance, max_guidance, num_frames)


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``uncond + w_f (cond - uncond)`` with one scale per frame (Ho & Salimans 2022; SVD).

    Args:
        uncond, cond: [B, F, ...].  scales: [F].
    """
    w = scales.to(cond).reshape(1, -1, *([1] * (cond.dim() - 2)))
    return uncond + w * (cond - uncond)
