"""bench/bench_autoencoder.py: the round-trip score of an autoencoder folder (a trainer run's
export) against PSNR computed independently (scikit-image); its picture holds the frames and
their round trip; a folder without an autoencoder is refused with its name."""

import re
import subprocess
import sys

import numpy as np
from diffusers import AutoencoderKLTemporalDecoder
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

from common.conventions import training_frame_indices
from common.training_views import to_training_views
from data_pipeline.shards import iter_shard
from model.svd import from_vae_pixels, to_vae_pixels
from training.autoencoder import roundtrip
from training.loader import decode_views, expand_shards
from data_paths import REPO

SCRIPT = REPO / "bench" / "bench_autoencoder.py"


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def all_row(stdout: str) -> tuple[float, float, float]:
    row = next(line for line in stdout.splitlines() if line.startswith("| trained | all"))
    return tuple(float(v) for v in re.findall(r"\| (-?[\d.]+|inf)", row)[-3:])


def test_folder_score_matches_an_independent_psnr(demo_shards, tmp_path):
    out = tmp_path / "ae"
    cmd = [sys.executable, "training/main.py", "--config", "tiny_autoencoder", "--data", str(demo_shards),
           "--output", str(out), "--max-steps", "2", "--set", "data.num_workers=0",
           "--set", "autoencoder.scale_batches=1", "--set", "model.latent_channels=8"]  # fmt: skip
    trained = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    shards = str(demo_shards / "shard-*.tar")
    picture = tmp_path / "heldout.png"
    folder = bench("--svd", str(out / "export"), "--data", shards, "--picture", str(picture))
    assert folder.returncode == 0, folder.stderr[-2000:]
    db, luma_db, chroma_db = all_row(folder.stdout)

    # PSNR over every frame of both 8-frame groups of every orbit, by scikit-image
    vae = AutoencoderKLTemporalDecoder.from_pretrained(out / "export", subfolder="vae").eval()
    targets, recons, objects = [], [], []
    for url in expand_shards(shards):
        for sample in iter_shard(url):
            for start in (0, 1):
                objects.append(sample["__key__"].rsplit("_o", 1)[0])
                images = to_training_views(decode_views(sample, training_frame_indices(start)), 64, [1.0] * 3)["images"]
                targets.append(images.numpy())
                recons.append(from_vae_pixels(roundtrip(vae, to_vae_pixels(images)[None])[0]).numpy())
    reference = peak_signal_noise_ratio(np.stack(targets), np.stack(recons), data_range=1.0)
    assert abs(db - reference) < 0.01, (db, reference)
    assert 0 < chroma_db < 100 and 0 < luma_db < 100

    # the picture: per object, its first group's 8 frames over their round trip (1 px gaps)
    pic = np.asarray(Image.open(picture).convert("RGB")).astype(np.float64) / 255
    rows = 2 * len(set(objects))
    assert pic.shape == (rows * 65 + 1, 8 * 65 + 1, 3)
    cell = lambda row, col: pic[1 + 65 * row:65 * (row + 1), 1 + 65 * col:65 * (col + 1)]  # noqa: E731
    last = max(objects)  # drawn last; its first group is the first one met
    group = objects.index(last)
    for col in (0, 5):
        assert np.abs(cell(rows - 2, col) - targets[group][col].transpose(1, 2, 0)).max() <= 0.5 / 255 + 1e-6
        assert np.abs(cell(rows - 1, col) - recons[group][col].transpose(1, 2, 0)).max() <= 0.5 / 255 + 1e-6

    bad = tmp_path / "not_an_export"
    bad.mkdir()
    refused = bench("--svd", str(bad), "--data", shards)
    assert refused.returncode != 0 and "not_an_export: not an SVD-layout folder" in refused.stderr
