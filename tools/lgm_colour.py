"""Does a checkpoint's LGM take its colours from its input views? A diagnostic of the 3D stage.

For each orbit group of the shards, LGM reconstructs the Gaussians from the clean views (at
``c_noise(sigma_min)``, as in its own training) twice: from the views as they are, and from the
same views with their colour channels rotated (R, G, B) -> (B, R, G) inside the object (the
background stays as trained). Its renders at the 8 views are compared with the views:

* ``psnr``: renders of the original views against them (LGM's reconstruction quality);
* ``follow``: how much of the input's change of colour the renders make, inside the object
  mask: ``|mean(render') - mean(render)| / |mean(view') - mean(view)|`` over the object's
  pixels (``colour_follow``). 1: the 3D takes its colours from the views; 0: it paints every
  object the same whatever its colour.
* ``offset_px``: the median distance, in pixels of the views, between each opaque Gaussian's
  centre projected into the input view it comes from and the centre of its own pixel there
  (``pixel_offsets``): near 0 when the Gaussians sit on their pixels' rays (then they can
  take their pixels' colours), a sizeable part of the image when they do not.

    python tools/lgm_colour.py --checkpoint tiny --data 'shards/shard-*.tar' [--limit 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from common.image_metrics import psnr_from_mse

ROTATION = [2, 0, 1]  # (R, G, B) -> (B, R, G)


def rotate_object_colours(images: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """The views with their colour channels rotated where the object is (alpha-weighted), the
    background unchanged. images [..., 3, H, W], alphas [..., 1, H, W] -> [..., 3, H, W]."""
    return alphas * images[..., ROTATION, :, :] + (1 - alphas) * images


def colour_follow(render: torch.Tensor, render_rotated: torch.Tensor, views: torch.Tensor,
                  views_rotated: torch.Tensor, mask: torch.Tensor) -> float:
    """How much of the input's colour change the renders make, inside ``mask``.

    Args:
        render, render_rotated, views, views_rotated: [V, 3, H, W]; mask: [V, 1, H, W] in {0, 1}.
    Returns:
        ``|Δ mean colour of the renders| / |Δ mean colour of the views|`` (L2 over RGB), nan when
        the rotation does not change the views' colour (a grey object).
    """
    def mean_colour(x: torch.Tensor) -> torch.Tensor:
        return (x * mask).sum((0, 2, 3)) / mask.sum().clamp_min(1)

    change_in = (mean_colour(views_rotated) - mean_colour(views)).norm()
    change_out = (mean_colour(render_rotated) - mean_colour(render)).norm()
    return float(change_out / change_in) if change_in > 1e-3 else float("nan")


def pixel_offsets(gaussians: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor, resolution: int,
                  min_opacity: float = 0.3) -> torch.Tensor:
    """Distances (pixels) between opaque Gaussians projected into their own input view and the
    centres of the pixels they come from.

    Args:
        gaussians: [V * s * s, 14] in the model frame, view-major then row-major over the s x s
            splat image of each view (LGM's output order, ``model/lgm/model.py``).
        c2w: [V, 4, 4] OpenCV camera-to-world of those views.  K: [V, 3, 3] in pixels of
            ``resolution``.
    Returns:
        [M] distances of the Gaussians with opacity >= ``min_opacity``.
    """
    V = c2w.shape[0]
    s = int(round((gaussians.shape[0] / V) ** 0.5))
    if V * s * s != gaussians.shape[0]:
        raise ValueError(f"{gaussians.shape[0]} Gaussians are not {V} square splat images")
    g = gaussians.reshape(V, s * s, -1)
    w2c = torch.linalg.inv(c2w)
    cam = g[..., 0:3] @ w2c[:, :3, :3].transpose(1, 2) + w2c[:, None, :3, 3]  # [V, s*s, 3]
    uv = cam @ K.transpose(1, 2)
    uv = uv[..., :2] / uv[..., 2:3].clamp_min(1e-6)
    ii, jj = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    centres = (torch.stack([jj, ii], -1).reshape(-1, 2).to(uv) + 0.5) * resolution / s  # (x, y)
    return (uv - centres).norm(dim=-1)[g[..., 3] >= min_opacity]


@torch.no_grad()
def score(model, pattern: str, limit: int | None = None) -> list[dict]:
    """Per orbit group: {key, psnr, follow, offset_px} (module docstring)."""
    from model import edm
    from training.loader import orbit_views

    cfg, rows = model.config, []
    c_noise = edm.c_noise(torch.full((1,), cfg.edm.sigma_min))
    for key, views in orbit_views(pattern, cfg.resolution, cfg.background):
        if limit is not None and len(rows) >= limit:
            break
        images, alphas, c2w, K = views["images"][None], views["alphas"][None], views["c2w"][None], views["K"][None]
        rotated = rotate_object_colours(images, alphas)
        gaussians = [model.reconstruct(inputs, c2w, K, c_noise) for inputs in (images, rotated)]
        renders = [model.render(g, c2w, K)["rgb"].clamp(0, 1)[0] for g in gaussians]
        idx = list(cfg.lgm_input_views)
        offsets = pixel_offsets(gaussians[0][0], c2w[0, idx], K[0, idx], cfg.resolution)
        rows.append(dict(key=key, psnr=float(psnr_from_mse(float((renders[0] - images[0]).square().mean()))),
                         follow=colour_follow(renders[0], renders[1], images[0], rotated[0], (alphas[0] > 0.5).float()),
                         offset_px=float(offsets.median()) if offsets.numel() else float("nan")))  # fmt: skip
    if not rows:
        raise SystemExit(f"{pattern}: no orbits")
    return rows


def main(argv=None) -> None:
    from model.ouroboros import Ouroboros3D

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="tiny", help="an Ouroboros3D export (default: the shipped stages)")
    p.add_argument("--data", required=True, help="shards (paths, globs, s3://)")
    p.add_argument("--limit", type=int, default=None, help="at most this many orbit groups")
    args = p.parse_args(argv)
    model = Ouroboros3D.from_pretrained(args.checkpoint).eval()
    rows = score(model, args.data, args.limit)
    print("| orbit group | LGM PSNR (dB) | colour follow | offset from own pixel (px) |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['key']} | {row['psnr']:.2f} | {row['follow']:.3f} | {row['offset_px']:.1f} |")

    def median(name: str) -> float:
        values = [r[name] for r in rows if r[name] == r[name]]
        return statistics.median(values) if values else float("nan")

    print(f"| **median of {len(rows)}** | {median('psnr'):.2f} | {median('follow'):.3f} | {median('offset_px'):.1f} |")


if __name__ == "__main__":
    main()
