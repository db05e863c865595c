"""Round-trip quality of a trained autoencoder on the frames of (held-out) shards.

    python bench/bench_autoencoder.py --svd <ae>/export --data '<heldout>/shard-*.tar' [--resolution 64]

Every orbit of every shard, all 16 frames in two groups of 8 (frames s, s+2, ..., as the model
sees them: ``training_frame_indices(0)`` and ``(1)``), composited over the model background and
resized exactly as the training loader does, encoded (posterior mode), decoded by the temporal
decoder over the 8 frames, and scored: PSNR (dB, [0, 1] images) per object and over all frames,
with its luma and chroma parts (BT.601 ``Y``, and the channels minus ``Y``: where the colour
goes). The trainer rewrites ``<ae>/export`` at every checkpoint, so a long run can be scored
while it trains. With ``--random`` the same VAE config with random weights is
scored beside it. ``--picture <png>`` draws the first 8-frame group of every object: its frames
over their round trip, two rows an object, 1 px gaps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's packages, however the script is started

import torch  # noqa: E402
from diffusers import AutoencoderKLTemporalDecoder  # noqa: E402

from common.image_metrics import chroma, luma, psnr_from_mse  # noqa: E402
from model.svd import to_vae_pixels  # noqa: E402
from training.autoencoder import roundtrip, save_roundtrip_picture  # noqa: E402
from training.loader import orbit_views  # noqa: E402


def score(vae, pattern: str, resolution: int, background: float) -> dict:
    """Per-object PSNR and luma / chroma dB, the same over all frames (from pooled MSEs), and
    ``examples``: the first group of every object, (frames, round trip) [8, 3, R, R] in [-1, 1]
    (the round trip not clamped)."""
    per_object: dict[str, list[tuple[float, float, float]]] = {}
    examples: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, views in orbit_views(pattern, resolution, background):
        images = to_vae_pixels(views["images"])
        recon = roundtrip(vae, images[None])[0]
        err = ((recon + 1) / 2).clamp(0, 1) - (images + 1) / 2
        mses = (float(err.square().mean()), float(luma(err).square().mean()), float(chroma(err).square().mean()))
        obj = key.rsplit("_o", 1)[0]
        per_object.setdefault(obj, []).append(mses)
        examples.setdefault(obj, (images, recon))
    pooled = lambda rows: tuple(float(psnr_from_mse(statistics.mean(col))) for col in zip(*rows))  # noqa: E731
    groups = [row for rows in per_object.values() for row in rows]
    return dict(objects={k: pooled(v) for k, v in per_object.items()}, all=pooled(groups), groups=len(groups),
                examples=examples)


def load_vae(folder: Path) -> AutoencoderKLTemporalDecoder:
    """The autoencoder of an SVD-layout folder (``vae/``), refused with the folder named."""
    try:
        return AutoencoderKLTemporalDecoder.from_pretrained(folder, subfolder="vae")
    except (OSError, ValueError, EnvironmentError) as err:
        raise SystemExit(f"{folder}: not an SVD-layout folder with an autoencoder in vae/ ({err})") from err


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--svd", type=Path, required=True,
                   help="SVD-layout folder (the export/ of a run of the trainer's autoencoder objective)")
    p.add_argument("--data", required=True, help="shards to score (held-out objects)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--background", type=float, default=1.0)
    p.add_argument("--random", action="store_true", help="also score a randomly initialised VAE")
    p.add_argument("--picture", type=Path, help="PNG: each object's first 8 frames over their round trip")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    vaes = {"trained": load_vae(args.svd).eval()}
    if args.random:
        torch.manual_seed(0)
        vaes["random"] = AutoencoderKLTemporalDecoder.from_config(vaes["trained"].config).eval()
    print(f"| VAE | object | round-trip PSNR dB ({args.resolution} px) | luma dB | chroma dB |\n|---|---|---|---|---|")
    for name, vae in vaes.items():
        result = score(vae, args.data, args.resolution, args.background)
        rows = sorted(result["objects"].items()) + [(f"all ({result['groups']} groups of 8 frames)", result["all"])]
        for obj, (db, luma_db, chroma_db) in rows:
            print(f"| {name} | {obj} | {db:.2f} | {luma_db:.2f} | {chroma_db:.2f} |")
        if args.picture and name == "trained":
            frames, trips = zip(*(result["examples"][obj] for obj in sorted(result["examples"])))
            save_roundtrip_picture(args.picture, torch.stack(frames), torch.stack(trips))


if __name__ == "__main__":
    main()
