"""Which autoencoder recipe gets nearer the round-trip goal: short in-memory training runs.

    python experiments/autoencoder_recipes.py --train '<dir>/shard-*.tar' --heldout '<dir>/shard-*.tar' \
        --name base --steps 600 --evals 200,400,600 [--latent-channels 16] [--blocks 3] \
        [--channels 64,64,64,64] [--norm-groups 8] [--arch plain|linear] [--posterior mode] \
        [--augment step|orbit|view|none] [--init linear-path] [--lr 2e-3]
    python experiments/autoencoder_recipes.py --frames frames.pt --device cuda --name base --steps 20000 ...

``--frames`` caches both frame sets (uint8, 27 MB for 64 objects; written on the first run,
read instead of the shards when it exists), so that a machine without the shards or Blender,
a lent GPU, runs the same recipes on the same frames (``--device cuda``).

Every orbit of the training shards is held in memory at 64 px (composited and resized as the
loader does); a step takes one orbit (``--batch``), a random start frame and its 8 training
views (``training_frame_indices``), with colour augmentation (mirror, channel permutation, hue
rotation about the grey axis; ``--augment``: drawn once a step, an orbit or a view, or none), and
applies the objective of
``python -m training.autoencoder`` (``autoencoder_loss``: L1 + squared error + KL 1e-6 in SD's
units, AdamW, cosine lr, gradient norm clipped to 1). At each ``--evals`` step it prints one
JSON line: round-trip PSNR (posterior mode, all frames, both 8-frame groups of each orbit) on
held-out shards and on the first four training objects (by name), with its luma and chroma
parts (``luma_chroma_psnr``: where the colour goes), and writes
``<out>/<name>_<step>.png`` (a held-out orbit over its round trip). The first line also gives,
for scale, the chroma dB of the held-out frames' own greyscale (``grey_chroma_reference``: no
colour kept), their PSNR against
8, 16 and 32 px thumbnails of themselves upsampled bicubically (``resize_references``), and the
best linear code of each latent geometry tried here (``linear_references``: PCA of the non-
overlapping patches a latent cell covers, fitted on the training frames): a learned autoencoder
of that latent size that scores below it is not yet using its latent as well as a linear map.

Variants: ``--latent-channels``, ``--blocks`` (3 = 4x downsampling instead of 8x) and
``--channels`` are `AutoencoderKLTemporalDecoder` config; two are diagnostics outside it:
``--norm-groups`` swaps every GroupNorm for one with that many groups (the class fixes 32, one
channel a group at the tiny width), ``--arch plain`` a plain convolutional autoencoder without
normalisation or a temporal decoder (same 8x8 latent) as a reference for how hard the task is,
``--arch linear`` a linear code of 8x8 patches (``--latent-channels`` numbers each) trained by the
same loop: how fast this data and loop teach a code of that size, against PCA's optimum;
``--posterior mode`` decodes the posterior mean and drops the KL: what the sampling noise costs;
``--init linear-path`` starts the class as a short variance-preserving linear chain
(``init_linear_path``) instead of PyTorch's default initialisation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's packages, however the script is started

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import AutoencoderKLTemporalDecoder  # noqa: E402

from common.atomic import atomic_path  # noqa: E402
from common.conventions import NUM_FRAMES, training_frame_indices  # noqa: E402
from common.image_metrics import chroma, luma, luma_chroma_psnr, psnr  # noqa: E402
from common.training_views import to_training_views  # noqa: E402
from data_pipeline.shards import iter_shard  # noqa: E402
from model.config import preset  # noqa: E402
from model.svd import to_vae_pixels  # noqa: E402
from training.autoencoder import autoencoder_loss, roundtrip, save_roundtrip_picture  # noqa: E402
from training.autoencoder_recipe import AUGMENT_MODES, augment_views, init_linear_path  # noqa: E402
from training.engine import lr_factor  # noqa: E402
from training.loader import decode_views, expand_shards  # noqa: E402

RESOLUTION = 64


def load_orbits(pattern: str, background: float = 1.0) -> tuple[torch.Tensor, list[str]]:
    """All orbits of the shards, all frames: ([N, 16, 3, 64, 64] in [-1, 1], object names)."""
    orbits, names = [], []
    for url in expand_shards(pattern):
        for sample in iter_shard(url):
            views = decode_views(sample, np.arange(NUM_FRAMES))
            orbits.append(to_vae_pixels(to_training_views(views, RESOLUTION, [background] * 3)["images"]))
            names.append(sample["__key__"].rsplit("_o", 1)[0])
    if not orbits:
        raise SystemExit(f"no orbits in {pattern}")
    return torch.stack(orbits), names


def load_frames(args) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """(training orbits, their object names, held-out orbits), each [N, 16, 3, 64, 64] in [-1, 1]:
    from ``args.frames`` if that file exists, else from the shards (then cached there as uint8,
    27 MB for 64 objects, so that a machine without the shards can run the same recipes)."""
    if args.frames and args.frames.exists():
        cache = torch.load(args.frames, weights_only=True)
        if not isinstance(cache, dict) or {"train", "names", "heldout"} - set(cache):
            raise SystemExit(f"{args.frames}: not a frame cache written by this script")
        return (cache["train"].float() / 127.5 - 1, cache["names"], cache["heldout"].float() / 127.5 - 1)
    if not (args.train and args.heldout):
        raise SystemExit("--train and --heldout are needed unless --frames names an existing cache")
    train, names = load_orbits(args.train)
    heldout = load_orbits(args.heldout)[0]
    if args.frames:
        to_u8 = lambda x: ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)  # noqa: E731
        with atomic_path(args.frames, suffix=".pt") as tmp:
            torch.save(dict(train=to_u8(train), names=names, heldout=to_u8(heldout)), tmp)
    return train, names, heldout


def eval_groups(orbits: torch.Tensor) -> list[torch.Tensor]:
    """Both 8-frame training groups of every orbit: a list of [8, 3, H, W]."""
    return [o[training_frame_indices(s)] for o in orbits for s in (0, 1)]


def swap_group_norms(module: nn.Module, groups: int) -> None:
    """Replace every GroupNorm under ``module`` by one with ``groups`` groups (diagnostic)."""
    for name, child in module.named_children():
        if isinstance(child, nn.GroupNorm):
            setattr(module, name, nn.GroupNorm(groups, child.num_channels, eps=child.eps, affine=child.affine))
        else:
            swap_group_norms(child, groups)


class PlainAutoencoder(nn.Module):
    """Reference: convolutions and SiLU only, 3 stride-2 downsamplings to an 8x8 latent."""

    def __init__(self, width: int = 32, latent: int = 4):
        super().__init__()

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.SiLU(), nn.Conv2d(o, o, 3, padding=1), nn.SiLU())

        down = [block(3, width)]
        up = [nn.Conv2d(latent, width, 3, padding=1), block(width, width)]
        for _ in range(3):
            down += [nn.Conv2d(width, width, 3, 2, 1), block(width, width)]
            up += [nn.Upsample(scale_factor=2), block(width, width)]
        self.encoder = nn.Sequential(*down, nn.Conv2d(width, latent, 1))
        self.decoder = nn.Sequential(*up, nn.Conv2d(width, 3, 3, padding=1))

    def forward(self, x):
        """[N, 3, H, W] -> [N, 3, H, W]"""
        return self.decoder(self.encoder(x))


class LinearAutoencoder(nn.Module):
    """Reference: a linear code of each 8x8 patch (stride-8 convolution, its transpose back),
    the geometry of ``linear_references``'s PCA, trained by the same loop as the others."""

    def __init__(self, latent: int = 4, patch: int = 8):
        super().__init__()
        self.encoder = nn.Conv2d(3, latent, patch, patch)
        self.decoder = nn.ConvTranspose2d(latent, 3, patch, patch)

    def forward(self, x):
        """[N, 3, H, W] -> [N, 3, H, W]"""
        return self.decoder(self.encoder(x))


def build(args) -> tuple[nn.Module, callable, callable]:
    """(model, loss(images [B, V, 3, H, W], step) -> tensor, round trip(images) -> images)."""
    if args.arch in ("plain", "linear"):
        latent = args.latent_channels or 4
        model = PlainAutoencoder(latent=latent) if args.arch == "plain" else LinearAutoencoder(latent=latent)

        def loss(x, step):
            x = x.flatten(0, 1)
            r = model(x)
            return (r - x).abs().mean() + F.mse_loss(r, x)

        return model, loss, lambda x: model(x.flatten(0, 1)).unflatten(0, x.shape[:2])
    cfg = dict(preset("tiny").vae)
    if args.latent_channels:
        cfg["latent_channels"] = args.latent_channels
    if args.channels:
        cfg["block_out_channels"] = tuple(int(c) for c in args.channels.split(","))
    if args.blocks:
        cfg["block_out_channels"] = tuple(cfg["block_out_channels"][: args.blocks])
        cfg["down_block_types"] = tuple(cfg["down_block_types"][: args.blocks])
    model = AutoencoderKLTemporalDecoder(**cfg)
    if args.norm_groups:
        swap_group_norms(model, args.norm_groups)
    if args.init == "linear-path":
        init_linear_path(model)

    def loss(x, step):
        if args.posterior == "mode":
            z = model.encode(x.flatten(0, 1)).latent_dist.mode()
            err = model.decode(z, num_frames=x.shape[1]).sample - x.flatten(0, 1)
            return err.abs().mean() + err.square().mean() + args.chroma_weight * chroma(err).square().mean()
        generator = torch.Generator().manual_seed(step)
        return autoencoder_loss(model, x, generator, 1e-6, 0.0, 1.0, args.chroma_weight)["loss"]

    return model, loss, lambda x: roundtrip(model, x)


@torch.no_grad()
def resize_references(groups: list[torch.Tensor], sizes=(8, 16, 32)) -> dict[int, float]:
    """PSNR (dB) of the frames against themselves area-downsampled to ``size`` px and bicubic-
    upsampled back: what a thumbnail of that size keeps, for scale."""
    x = torch.cat(groups)
    thumbnail = lambda size: F.interpolate(F.interpolate(x, size=size, mode="area"), size=x.shape[-1], mode="bicubic")  # noqa: E731
    return {size: round(signed_db(thumbnail(size), x), 2) for size in sizes}


@torch.no_grad()
def linear_references(train: torch.Tensor, groups: list[torch.Tensor],
                      geometries=((8, 4), (8, 16), (4, 4))) -> dict[str, float]:
    """PSNR (dB) of the frames of ``groups`` through the best linear code of each latent geometry.

    A geometry ``(p, k)`` is a latent of ``H/p x W/p`` cells with ``k`` channels, each cell coding
    the ``p x p`` patch under it: the code is the top ``k`` principal components of all patches of
    the training frames (``train`` [N, 3, H, W]), decoded by projecting back (``unfold``/``fold``).
    Keys are latent shapes at 64 px, e.g. ``"8x8x4"``.
    """
    x = torch.cat(groups)
    out = {}
    for p, k in geometries:
        patches = lambda im: F.unfold(im, p, stride=p).transpose(1, 2).reshape(-1, 3 * p * p)  # noqa: E731
        fit = patches(train)
        mean = fit.mean(0)
        basis = torch.pca_lowrank(fit - mean, q=k + 8, center=False, niter=6)[2][:, :k]
        coded = (patches(x) - mean) @ basis @ basis.T + mean
        recon = F.fold(coded.reshape(len(x), -1, 3 * p * p).transpose(1, 2), x.shape[-2:], p, stride=p)
        out[f"{x.shape[-1] // p}x{x.shape[-1] // p}x{k}"] = round(signed_db(recon, x), 2)
    return out


def grey_chroma_reference(groups: list[torch.Tensor]) -> float:
    """Chroma dB (``luma_chroma_psnr``) of the frames against their own greyscale: what a round
    trip that keeps no colour at all scores there."""
    x = torch.cat(groups)
    return float(luma_chroma_psnr(luma((x + 1) / 2).expand_as(x) * 2 - 1, x, signed=True, pooled=True)[1])


def signed_db(pred: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR (dB) over all of the frames [..., 3, H, W] in [-1, 1], measured on [0, 1] (peak 1)."""
    return float(psnr(pred, target, signed=True, pooled=True))


@torch.no_grad()
def roundtrip_db(model, trip, groups) -> dict[str, float]:
    """PSNR (dB) of the round trip over all frames of the groups (``signed_db``), and its luma
    and chroma parts (``common.image_metrics.luma_chroma_psnr``)."""
    model.eval()
    recon, target = torch.cat([trip(g[None])[0] for g in groups]), torch.cat(groups)
    model.train()
    luma_db, chroma_db = (float(db) for db in luma_chroma_psnr(recon, target, signed=True, pooled=True))
    return dict(db=round(signed_db(recon, target), 2), luma_db=round(luma_db, 2), chroma_db=round(chroma_db, 2))


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """The recipe's flags (model variant, objective, augmentation, lr), shared with
    ``experiments/autoencoder_one_orbit.py``."""
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--augment", choices=AUGMENT_MODES, default="step",
                   help="colour augmentation drawn once a step (every orbit alike), an orbit, or a view")
    p.add_argument("--latent-channels", type=int)
    p.add_argument("--blocks", type=int)
    p.add_argument("--channels")
    p.add_argument("--norm-groups", type=int)
    p.add_argument("--chroma-weight", type=float, default=0.0, help="autoencoder_loss's extra colour term")
    p.add_argument("--init", choices=("default", "linear-path"), default="default")
    p.add_argument("--arch", choices=("svd", "plain", "linear"), default="svd")
    p.add_argument("--posterior", choices=("sample", "mode"), default="sample",
                   help="mode: decode the posterior mean, no KL (diagnostic: the posterior noise's cost)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", help="training shards (not read when --frames exists)")
    p.add_argument("--heldout", help="held-out shards (likewise)")
    p.add_argument("--frames", type=Path, help="cache of both frame sets: read if it exists, else written")
    p.add_argument("--device", default="cpu", help="cpu, or cuda where there is a GPU")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--name", required=True)
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--evals", default="200,400,600")
    p.add_argument("--batch", type=int, default=1, help="orbits a step (x 8 views)")
    add_recipe_arguments(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    train, names, heldout_orbits = load_frames(args)
    seen_objects = sorted(set(names))[:4]
    seen = eval_groups(train[[i for i, n in enumerate(names) if n in seen_objects]].to(device))
    heldout = eval_groups(heldout_orbits.to(device))
    torch.manual_seed(0)
    model, loss_fn, trip = build(args)
    model.to(device)
    print(json.dumps(dict(name=args.name, orbits=len(train), objects=len(set(names)), seen=seen_objects,
                          params=sum(q.numel() for q in model.parameters()),
                          heldout_thumbnail_db=resize_references(heldout),
                          heldout_grey_chroma_db=round(grey_chroma_reference(heldout), 2),
                          heldout_linear_code_db=linear_references(train.flatten(0, 1), [h.cpu() for h in heldout]))), flush=True)  # fmt: skip
    train = train.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    evals = {int(s) for s in args.evals.split(",")}
    start = time.time()
    for step in range(1, args.steps + 1):
        x = train[torch.randint(len(train), (args.batch,), generator=g).to(device)]
        x = x[:, training_frame_indices(int(torch.randint(NUM_FRAMES, (), generator=g)))]
        x = augment_views(x, g, args.augment)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * lr_factor(step - 1, args.steps, schedule="cosine", min_lr_ratio=0.05)
        loss = loss_fn(x, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step in evals:
            record = dict(name=args.name, step=step, s_per_step=round((time.time() - start) / step, 3))
            for split, groups in (("seen", seen), ("heldout", heldout)):
                record.update({f"{split}_{k}": v for k, v in roundtrip_db(model, trip, groups).items()})
            print(json.dumps(record), flush=True)
            with torch.no_grad():
                model.eval()
                save_roundtrip_picture(args.out / f"{args.name}_{step}.png", heldout[0][None].cpu(), trip(heldout[0][None]).cpu())
                model.train()


if __name__ == "__main__":
    main()
