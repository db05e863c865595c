"""The latent autoencoder's objective (``objective: autoencoder`` of ``training/main.py``), for
presets where no pretrained autoencoder can be had (the ``tiny`` preset).

SVD's ``AutoencoderKLTemporalDecoder`` (the class the ``full`` preset loads from SVD) at a
preset's ``vae`` config, trained on the frames of a set of shards as Stable Diffusion's and
SVD's autoencoders are trained: a reconstruction loss (L1, plus LPIPS with ``lpips_weight``)
and a small KL term (SD's ``kl_weight`` 1e-6, in SD's units: against the reconstruction summed
over an image's values, ``kl_term``). The decoder's temporal layers see the 8 views of
one orbit together, as ``Ouroboros3D.decode_latents`` uses them. The export sets the latent
``scaling_factor`` to ``1 / std`` of the latents of training frames, as Stable Diffusion
chose its 0.18215.

    python training/main.py --config tiny_autoencoder --data '<dir>/shard-*.tar' --output <ae>

The run's ``export/`` is a folder in SVD's layout (``model_index.json``, ``vae/`` with the
trained weights, and the preset's randomly initialised ``unet/``, ``image_encoder/``,
``feature_extractor/``, ``scheduler/``), which a preset loads through the real loader: set the
model config's ``svd_path`` to it (``--set model.overrides.svd_path=<ae>/export``). Beside it:
``roundtrip.png`` (top row: input views, bottom row: their round trip) and
``autoencoder.json`` (scaling factor, latent statistics, round-trip PSNR on training frames).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKLTemporalDecoder
from PIL import Image

from common.atomic import atomic_dir, atomic_path, atomic_write_text
from common.image_metrics import chroma, psnr
from model.svd import from_vae_pixels, to_vae_pixels
from training.autoencoder_recipe import augment_views, init_linear_path

log = logging.getLogger("training.autoencoder")

KL_WEIGHT = 1e-6  # Stable Diffusion's autoencoder (kl-f8) setting


# ----------------------------------------------------------------------------- the maths
def autoencoder_loss(vae, images: torch.Tensor, generator: torch.Generator | None, kl_weight: float,
                     lpips_weight: float = 0.0, mse_weight: float = 0.0, chroma_weight: float = 0.0) -> dict:
    """SD/SVD autoencoder objective on the views of a batch of orbits.

    ``L = mean_values(|x - D(z)| + mse_weight (x - D(z))^2 + chroma_weight chroma(x - D(z))^2)
    + lpips_weight LPIPS(x, D(z)) + kl_weight KL(q(z|x) || N(0, I)) / (3 H W)``
    with ``z ~ q(z|x)``, the decoder's temporal layers run over the V views of each orbit,
    KL summed over latent elements and averaged over images: SD's ``LPIPSWithDiscriminator``
    without its adversarial term, divided through by the values of an image. SD sums the
    reconstruction over an image's values and adds ``kl_weight x KL`` per image; here the
    reconstruction is a per-value mean, so the KL is divided by ``3 H W`` (``kl_term``) and
    ``kl_weight`` means what it means in SD's config (1e-6). ``chroma_weight`` (not SD's; 0 by
    default) weighs the colour part of the error (``chroma``) again: a deep autoencoder learns
    to pass brightness through its latent long before colour (BENCHMARKS.md, "Colour").

    Args:
        images: [B, V, 3, H, W] in [-1, 1].
    Returns:
        dict(loss, l1, mse, kl, lpips, recon [B, V, 3, H, W])
    """
    B, V = images.shape[:2]
    x = images.flatten(0, 1)
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator=generator)
    recon = vae.decode(z, num_frames=V).sample
    l1 = (recon - x).abs().mean()
    mse = F.mse_loss(recon, x)
    chroma_mse = chroma(recon - x).square().mean()
    kl = posterior.kl().mean()
    lp = x.new_zeros(())
    if lpips_weight > 0:
        from model.lgm.loss import lpips_distance

        lp = lpips_distance(((recon + 1) / 2).clamp(0, 1), (x + 1) / 2)
    loss = (l1 + mse_weight * mse + chroma_weight * chroma_mse + lpips_weight * lp
            + kl_term(kl, x[0].numel(), kl_weight))
    return dict(loss=loss, l1=l1.detach(), mse=mse.detach(), chroma_mse=chroma_mse.detach(), kl=kl.detach(),
                lpips=lp.detach(), recon=recon.detach().unflatten(0, (B, V)))  # fmt: skip


def kl_term(kl_per_image: torch.Tensor, values_per_image: int, kl_weight: float) -> torch.Tensor:
    """The KL term of ``autoencoder_loss``, whose reconstruction loss is a per-value mean.

    SD's objective is ``sum_values(rec) + kl_weight KL`` per image; divided through by the
    values of an image (``3 H W``) it becomes ``mean_values(rec) + kl_weight KL / (3 H W)``.
    """
    return kl_weight * kl_per_image / values_per_image


@torch.no_grad()
def roundtrip(vae, images: torch.Tensor) -> torch.Tensor:
    """Encode (posterior mode) and decode the views of each orbit together.

    images [B, V, 3, H, W] in [-1, 1] -> [B, V, 3, H, W] (not clamped)
    """
    z = vae.encode(images.flatten(0, 1).to(vae.dtype)).latent_dist.mode()
    return vae.decode(z, num_frames=images.shape[1]).sample.float().unflatten(0, images.shape[:2])


@torch.no_grad()
def latent_std(vae, batches) -> tuple[float, float]:
    """(mean, std) of sampled latents over the given batches of images [B, V, 3, H, W]."""
    values = []
    for images in batches:
        values.append(vae.encode(images.flatten(0, 1)).latent_dist.sample().flatten())
    z = torch.cat(values)
    return float(z.mean()), float(z.std())


# ----------------------------------------------------------------------------- outputs
def save_roundtrip_picture(path: Path, images: torch.Tensor, recon: torch.Tensor) -> None:
    """PNG of every orbit's views (one row) over their round trip (the next row), 1 px gaps.

    Args:
        images, recon: [B, V, 3, H, W] in [-1, 1].
    """
    from torchvision.utils import make_grid

    rows = torch.stack([images, recon], 1).flatten(0, 2)  # orbit 0 views, its round trip, orbit 1 ...
    pic = make_grid(((rows + 1) / 2).clamp(0, 1), nrow=images.shape[1], padding=1, pad_value=1.0)
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray((pic.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(tmp)


def save_svd_folder(vae: AutoencoderKLTemporalDecoder, cfg, out: Path, seed: int) -> None:
    """The SVD-layout folder: the trained VAE plus the other parts of model config ``cfg``,
    freshly initialised (seeded), written beside ``out`` and swapped in."""
    from model.svd import build_svd_components, save_svd_components

    with torch.random.fork_rng():  # the training run's own random stream stays as it was
        torch.manual_seed(seed)
        components = build_svd_components(cfg)
    components.vae = vae
    with atomic_dir(out) as tmp:
        save_svd_components(components, tmp)


# ----------------------------------------------------------------------------- the trainer's parts
class AutoencoderObjective(nn.Module):
    """``forward(batch, generator)``: ``autoencoder_loss`` of the loader's views (``images`` in
    [0, 1], taken to the VAE's [-1, 1] by ``model.svd.to_vae_pixels``) after the colour
    augmentation of ``recipe.augment`` (``training.autoencoder_recipe``), as the trainer's engine
    calls any objective. ``recipe`` is the config's ``autoencoder`` section.

    Returns dict(loss, loss_l1, loss_mse, loss_chroma, loss_kl, loss_lpips, psnr,
    visuals=dict(roundtrip [1, 2V, 3, H, W] in [0, 1]: the first orbit's views, then their round trip)).
    """

    def __init__(self, vae: AutoencoderKLTemporalDecoder, recipe):
        super().__init__()
        self.vae = vae
        self.recipe = recipe
        if recipe.init == "linear-path":
            init_linear_path(vae)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"autoencoder": list(self.vae.parameters())}

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        r = self.recipe
        images = augment_views(to_vae_pixels(batch["images"]), generator, r.augment)
        terms = autoencoder_loss(self.vae, images, generator, **dataclasses.asdict(r.loss))
        return dict(loss=terms["loss"], loss_l1=terms["l1"], loss_mse=terms["mse"], loss_chroma=terms["chroma_mse"],
                    loss_kl=terms["kl"], loss_lpips=terms["lpips"],
                    psnr=psnr(terms["recon"], images, signed=True, pooled=True),
                    visuals={"roundtrip": from_vae_pixels(torch.cat([images[:1], terms["recon"][:1]], 1))})  # fmt: skip


def export_autoencoder(vae: AutoencoderKLTemporalDecoder, cfg, out: Path, scale_batches: list[torch.Tensor],
                       seed: int, step: int) -> dict:
    """The run's inference weights: ``scaling_factor = 1 / std`` of the latents of
    ``scale_batches`` (the loader's images [B, V, 3, H, W] in [0, 1]) written into the VAE's config, the SVD
    folder at ``out`` (``save_svd_folder``), and beside it ``roundtrip.png`` and
    ``autoencoder.json`` (``step``: the training steps behind the weights). Returns the summary
    written to ``autoencoder.json``."""
    was_training = vae.training
    vae.eval()
    scale_batches = [to_vae_pixels(images) for images in scale_batches]
    mean, std = latent_std(vae, scale_batches)
    vae.register_to_config(scaling_factor=1.0 / std)
    images = scale_batches[0]
    recon = roundtrip(vae, images)
    train_psnr = float(psnr(recon, images, signed=True, pooled=True))
    save_roundtrip_picture(out.parent / "roundtrip.png", images[:1], recon[:1])
    save_svd_folder(vae, cfg, out, seed)
    vae.train(was_training)
    summary = dict(steps=step, scaling_factor=1.0 / std, latent_mean=mean, latent_std=std, train_roundtrip_psnr=train_psnr,
                   latent_channels=cfg.vae["latent_channels"], svd_path=out.name)  # fmt: skip
    atomic_write_text(out.parent / "autoencoder.json", json.dumps(summary, indent=2))
    log.info("scaling_factor %.4f (latent std %.4f); round trip on training frames %.2f dB; wrote %s",
             1.0 / std, std, train_psnr, out)
    return summary
