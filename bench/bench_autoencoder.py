"""Round-trip quality of a trained autoencoder on the frames of (held-out) shards.

    python bench/bench_autoencoder.py --svd <dir>/svd --data '<heldout>/shard-*.tar' [--resolution 64]

Every orbit of every shard, all 16 frames in two groups of 8 (frames s, s+2, ..., as the model
sees them: ``training_frame_indices(0)`` and ``(1)``), composited over the model background and
resized exactly as the training loader does, encoded (posterior mode), decoded by the temporal
decoder over the 8 frames, and scored: PSNR (dB, [0, 1] images) per object and over all frames.
With ``--random`` the same VAE config with random weights is scored beside it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from diffusers import AutoencoderKLTemporalDecoder  # noqa: E402

from data_pipeline.conventions import training_frame_indices  # noqa: E402
from data_pipeline.shards import iter_shard  # noqa: E402
from training.autoencoder import roundtrip  # noqa: E402
from training.loader import decode_views, expand_shards, to_training_views  # noqa: E402


def orbit_views(pattern: str, resolution: int, background: float):
    """(key, images [8, 3, R, R] in [-1, 1]) for both frame groups of every orbit in the shards."""
    for url in expand_shards(pattern):
        for sample in iter_shard(url):
            for start in (0, 1):
                views = decode_views(sample, training_frame_indices(start))
                yield sample["__key__"], to_training_views(views, resolution, [background] * 3)["images"]


def score(vae, pattern: str, resolution: int, background: float) -> dict:
    """Per-object mean PSNR and the PSNR over all frames (from the pooled MSE)."""
    per_object: dict[str, list[float]] = {}
    mses = []
    for key, images in orbit_views(pattern, resolution, background):
        recon = roundtrip(vae, images[None])[0]
        mse = float((((recon + 1) / 2).clamp(0, 1) - (images + 1) / 2).pow(2).mean())
        mses.append(mse)
        per_object.setdefault(key.rsplit("_o", 1)[0], []).append(mse)
    psnr = lambda m: float(10 * torch.log10(torch.tensor(1.0 / m)))  # noqa: E731
    return dict(objects={k: psnr(statistics.mean(v)) for k, v in per_object.items()},
                all=psnr(statistics.mean(mses)), groups=len(mses))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--svd", required=True, type=Path, help="SVD-layout folder (training.autoencoder's svd/)")
    p.add_argument("--data", required=True, help="shards to score (held-out objects)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--background", type=float, default=1.0)
    p.add_argument("--random", action="store_true", help="also score a randomly initialised VAE")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    vaes = {"trained": AutoencoderKLTemporalDecoder.from_pretrained(args.svd, subfolder="vae").eval()}
    if args.random:
        torch.manual_seed(0)
        vaes["random"] = AutoencoderKLTemporalDecoder.from_config(vaes["trained"].config).eval()
    print(f"| VAE | object | round-trip PSNR dB ({args.resolution} px) |\n|---|---|---|")
    for name, vae in vaes.items():
        result = score(vae, args.data, args.resolution, args.background)
        for obj, value in sorted(result["objects"].items()):
            print(f"| {name} | {obj} | {value:.2f} |")
        print(f"| {name} | all ({result['groups']} groups of 8 frames) | {result['all']:.2f} |")


if __name__ == "__main__":
    main()
