"""Train the latent autoencoder where no pretrained one can be had (the ``tiny`` preset).

SVD's ``AutoencoderKLTemporalDecoder`` (the class the ``full`` preset loads from SVD) at a
preset's ``vae`` config, trained on the frames of a set of shards as Stable Diffusion's and
SVD's autoencoders are trained: a reconstruction loss (L1, plus LPIPS with ``--lpips-weight``)
and a small KL term (SD's ``kl_weight`` 1e-6, in SD's units: against the reconstruction summed
over an image's values, ``kl_term``). The decoder's temporal layers see the 8 views of
one orbit together, as ``Ouroboros3D.decode_latents`` uses them. At the end the latent
``scaling_factor`` is set to ``1 / std`` of the latents of training frames, as Stable Diffusion
chose its 0.18215.

    python -m training.autoencoder --data '<dir>/shard-*.tar' --output <dir> [--steps 3000]

Writes, under ``--output``:

- ``svd/``: a folder in SVD's layout (``model_index.json``, ``vae/`` with the trained weights,
  and the preset's randomly initialised ``unet/``, ``image_encoder/``, ``feature_extractor/``,
  ``scheduler/``), which the preset loads through the real loader: set the model config's
  ``svd_path`` to it (``--set model.overrides.svd_path=<dir>/svd`` on ``training/main.py``).
- ``checkpoint.pt`` (model, optimizer, loader position, step; written atomically every
  ``--checkpoint-every`` steps; ``--resume auto`` continues from it), ``losses.jsonl``,
  ``tb/`` (TensorBoard scalars and round-trip images), ``roundtrip.png`` (top row: input
  views, bottom row: their round trip), ``autoencoder.json`` (scaling factor, latent
  statistics, round-trip PSNR on training frames).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python training/autoencoder.py`: repo on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import AutoencoderKLTemporalDecoder  # noqa: E402
from PIL import Image  # noqa: E402

from common.atomic import atomic_dir, atomic_path, atomic_write_text  # noqa: E402
from common.image_metrics import chroma, psnr  # noqa: E402
from training.autoencoder_recipe import AUGMENT_MODES, augment_views, init_linear_path  # noqa: E402
from training.loader import LoaderConfig, StreamingLoader  # noqa: E402
from training.logging_utils import TrainLogger  # noqa: E402

log = logging.getLogger("training.autoencoder")

CHECKPOINT_NAME = "checkpoint.pt"
SVD_DIR = "svd"
KL_WEIGHT = 1e-6  # Stable Diffusion's autoencoder (kl-f8) setting


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.autoencoder", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="shard pattern (as training/main.py)")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--preset", default="tiny", help="model preset whose vae config is trained")
    p.add_argument("--latent-channels", type=int,
                   help="latent channels instead of the preset's (the SVD folder's UNet follows)")
    p.add_argument("--augment", choices=AUGMENT_MODES, default="none",
                   help="colour augmentation (mirror, channel permutation, hue rotation) drawn per step, orbit or view")
    p.add_argument("--init", choices=("default", "linear-path"), default="default",
                   help="PyTorch's initialisation, or init_linear_path")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=2, help="orbits per step (x 8 views)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.05, help="cosine decay down to lr x this")
    p.add_argument("--kl-weight", type=float, default=KL_WEIGHT)
    p.add_argument("--mse-weight", type=float, default=1.0, help="squared-error term beside L1")
    p.add_argument("--chroma-weight", type=float, default=0.0, help="extra squared error of the colour part")
    p.add_argument("--lpips-weight", type=float, default=0.0, help="LPIPS term (needs the real VGG trunk)")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--scale-batches", type=int, default=16, help="batches measuring the latent std")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", default="auto", choices=("auto", "none"))
    return p.parse_args(argv)


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


def cosine_lr(step: int, total: int, lr: float, min_ratio: float) -> float:
    """Cosine decay from ``lr`` to ``lr * min_ratio`` over ``total`` steps."""
    t = min(step / max(total, 1), 1.0)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


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


def model_config(preset: str, latent_channels: int | None):
    """The preset's model config, with ``latent_channels`` (when given) through the autoencoder
    and the UNet (``with_latent_channels``)."""
    from model.config import preset as model_preset
    from model.config import with_latent_channels

    cfg = model_preset(preset)
    return cfg if latent_channels is None else with_latent_channels(cfg, latent_channels)


def save_svd_folder(vae: AutoencoderKLTemporalDecoder, cfg, out: Path, seed: int) -> None:
    """The SVD-layout folder: the trained VAE plus the other parts of model config ``cfg``,
    freshly initialised (seeded), written beside ``out`` and swapped in."""
    from model.svd import build_svd_components, save_svd_components

    torch.manual_seed(seed)
    components = build_svd_components(cfg)
    components.vae = vae
    with atomic_dir(out) as tmp:
        save_svd_components(components, tmp)


# ----------------------------------------------------------------------------- training
def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = model_config(args.preset, args.latent_channels)
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    vae = AutoencoderKLTemporalDecoder(**cfg.vae)
    if args.init == "linear-path":
        init_linear_path(vae)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    loader = StreamingLoader(args.data, LoaderConfig(
        resolution=cfg.resolution, batch_size=args.batch, num_views=cfg.num_views,
        background=(float(cfg.background),) * 3, shuffle_buffer=16, shuffle_initial=4,
        num_workers=args.num_workers, seed=args.seed))  # fmt: skip
    step = 0
    ckpt = out / CHECKPOINT_NAME
    if args.resume == "auto" and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["torch_rng"])
        step = int(state["step"])
        log.info("resumed from %s at step %d", ckpt, step)
    if step >= args.steps and (out / "autoencoder.json").is_file() and (out / SVD_DIR / "vae").is_dir():
        log.info("%s: already trained for %d steps; nothing to do", out, step)
        return 0
    logger = TrainLogger(out, rank=0, start_step=step, max_steps=args.steps)  # jsonl, tb, bar
    vae.train()
    batches = iter(loader)
    while step < args.steps:
        images = next(batches)["images"]
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr, args.min_lr_ratio)
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        images = augment_views(images, generator, args.augment)
        terms = autoencoder_loss(vae, images, generator, args.kl_weight, args.lpips_weight, args.mse_weight,
                                 args.chroma_weight)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        step += 1
        record = {k: v.item() for k, v in terms.items() if k != "recon"}
        record.update(psnr=float(psnr(terms["recon"], images, signed=True, pooled=True)), lr=optimizer.param_groups[0]["lr"])
        logger.step(step, record)
        if step % args.log_every == 0 or step == args.steps:
            logger.scalars(step, {f"autoencoder/{k}": v for k, v in record.items()})
            logger.images(step, {"roundtrip": torch.cat([images[:1], terms["recon"][:1]], 1)})
        if step % args.checkpoint_every == 0 or step == args.steps:
            with atomic_path(ckpt) as tmp:
                torch.save(dict(vae=vae.state_dict(), optimizer=optimizer.state_dict(),
                                loader=loader.state_dict(), torch_rng=torch.get_rng_state(),
                                step=step, args=vars(args) | {"output": str(out)}), tmp)  # fmt: skip
    logger.close()

    vae.eval()
    scale_batches = [next(batches)["images"] for _ in range(args.scale_batches)]
    mean, std = latent_std(vae, scale_batches)
    vae.register_to_config(scaling_factor=1.0 / std)
    images = scale_batches[0]
    recon = roundtrip(vae, images)
    train_psnr = float(psnr(recon, images, signed=True, pooled=True))
    save_roundtrip_picture(out / "roundtrip.png", images[:1], recon[:1])
    save_svd_folder(vae, cfg, out / SVD_DIR, args.seed)
    summary = dict(steps=step, scaling_factor=1.0 / std, latent_mean=mean, latent_std=std,
                   train_roundtrip_psnr=train_psnr, preset=args.preset,
                   latent_channels=cfg.vae["latent_channels"], svd_path=str(out / SVD_DIR))  # fmt: skip
    atomic_write_text(out / "autoencoder.json", json.dumps(summary, indent=2))
    log.info("scaling_factor %.4f (latent std %.4f); round trip on training frames %.2f dB; wrote %s",
             1.0 / std, std, train_psnr, out / SVD_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
