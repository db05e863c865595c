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


@torch.no_grad()
def score(model, pattern: str, limit: int | None = None) -> list[dict]:
    """Per orbit group: {key, psnr, follow} (module docstring)."""
    from model import edm
    from training.loader import orbit_views

    cfg, rows = model.config, []
    c_noise = edm.c_noise(torch.full((1,), cfg.edm.sigma_min))
    for key, views in orbit_views(pattern, cfg.resolution, cfg.background):
        if limit is not None and len(rows) >= limit:
            break
        images, alphas, c2w, K = views["images"][None], views["alphas"][None], views["c2w"][None], views["K"][None]
        renders = []
        for inputs in (images, rotate_object_colours(images, alphas)):
            gaussians = model.reconstruct(inputs, c2w, K, c_noise)
            renders.append(model.render(gaussians, c2w, K)["rgb"].clamp(0, 1)[0])
        mask = (alphas[0] > 0.5).float()
        rows.append(dict(key=key, psnr=float(psnr_from_mse(float((renders[0] - images[0]).square().mean()))),
                         follow=colour_follow(renders[0], renders[1], images[0],
                                              rotate_object_colours(images, alphas)[0], mask)))  # fmt: skip
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
    print("| orbit group | LGM PSNR (dB) | colour follow |\n|---|---|---|")
    for row in rows:
        print(f"| {row['key']} | {row['psnr']:.2f} | {row['follow']:.3f} |")
    follows = [r["follow"] for r in rows if r["follow"] == r["follow"]]
    print(f"| **median of {len(rows)}** | {statistics.median(r['psnr'] for r in rows):.2f} | "
          f"{statistics.median(follows) if follows else float('nan'):.3f} |")


if __name__ == "__main__":
    main()
