"""Does a recipe pass colour through the latent at all? Minutes on one orbit, re-coloured each step.

    python experiments/autoencoder_one_orbit.py --frames frames.pt --steps 400 --latent-channels 16 \
        --augment view --init linear-path --chroma-weight 10 [any flag of autoencoder_recipes.py]

Trains a recipe of ``experiments/autoencoder_recipes.py`` (same flags, same ``build``) on the first
8-frame group of one training orbit of a frame cache (``--orbit``), with colour augmentation
(``--augment``; ``none`` lets it memorise the colours instead), constant lr. Every ``--every``
steps it prints one JSON line: round-trip PSNR with its luma and chroma parts on that group as
rendered and on one fixed re-colouring of it (``recoloured_*``: colours it has never been asked
to memorise), beside the chroma dB of that re-colouring's own greyscale (no colour kept). An
autoencoder that passes colour through its latent lifts ``recoloured_chroma_db`` above it; one that
paints remembered or average colours does not.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's packages, however the script is started

import torch  # noqa: E402

from common.conventions import training_frame_indices  # noqa: E402
from experiments.autoencoder_recipes import add_recipe_arguments, build, grey_chroma_reference, roundtrip_db  # noqa: E402
from training.autoencoder_recipe import augment, augment_views  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=Path, required=True, help="frame cache of experiments/autoencoder_recipes.py")
    p.add_argument("--orbit", type=int, default=0, help="which training orbit of the cache")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    add_recipe_arguments(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cache = torch.load(args.frames, weights_only=True)
    if not isinstance(cache, dict) or "train" not in cache:
        raise SystemExit(f"{args.frames}: not a frame cache written by experiments/autoencoder_recipes.py")
    x = cache["train"][args.orbit : args.orbit + 1, training_frame_indices(0)].float() / 127.5 - 1
    recoloured = augment(x, torch.Generator().manual_seed(123))
    torch.manual_seed(0)
    model, loss_fn, trip = build(args)
    print(json.dumps(dict(orbit=cache["names"][args.orbit], params=sum(q.numel() for q in model.parameters()),
                          recoloured_grey_chroma_db=round(grey_chroma_reference([recoloured[0]]), 2))), flush=True)  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    start = time.time()
    for step in range(1, args.steps + 1):
        xa = augment_views(x, g, args.augment)
        loss = loss_fn(xa, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % args.every == 0 or step == args.steps:
            record = dict(step=step, s_per_step=round((time.time() - start) / step, 3))
            record.update(roundtrip_db(model, trip, [x[0]]))
            record.update({f"recoloured_{k}": v for k, v in roundtrip_db(model, trip, [recoloured[0]]).items()})
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
