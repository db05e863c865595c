"""Tests that fail when learning breaks: the denoiser learns one object, the autoencoder
trainer makes an autoencoder that round-trips rendered frames, fresh adapters change nothing.

The denoiser test trains the diffusion path of Algorithm 1 in-process on one rendered orbit and
measures the x0 error at moderate noise (sigma 0.5-2, where the condition image and the cameras
decide the answer) with fixed noise draws: a broken preconditioning, target, condition path or
optimizer leaves it near the untrained model's.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from common.conventions import training_frame_indices
from common.training_views import to_training_views
from data_pipeline.shards import iter_shard, list_shards
from model.config import preset
from model.ouroboros import Ouroboros3D
from model.svd import from_vae_pixels, to_vae_pixels
from training.loader import decode_views
from data_paths import REPO

SIGMAS = (0.5, 1.0, 2.0)


def _orbit_batch(demo_shards: Path, resolution: int = 64) -> dict:
    """One orbit of one demo object as a training batch (condition frame 0)."""
    sample = next(iter_shard(list_shards(demo_shards)[0]))
    views = to_training_views(decode_views(sample, training_frame_indices(0)), resolution, [1.0] * 3)
    batch = {k: v[None] for k, v in views.items()}
    batch["key"] = [sample["__key__"]]
    return batch


@torch.no_grad()
def x0_error(model: Ouroboros3D, batch: dict, draws: int = 4) -> float:
    """Mean squared x0 error of the denoiser (zero feedback) at SIGMAS, fixed noise draws."""
    gen = torch.Generator().manual_seed(123)
    x0 = model.encode_views(batch["images"], torch.Generator().manual_seed(0))
    embedding, cond_latent = model.encode_condition(batch["images"][:, 0], torch.Generator().manual_seed(1))
    from model.camera_embedding import latent_plucker_rays

    plucker = latent_plucker_rays(batch["c2w"], batch["K"], batch["images"].shape[-1], model.latent_size)
    errors = []
    for sigma in SIGMAS:
        for _ in range(draws):
            noise = torch.randn(x0.shape, generator=gen)
            s = torch.tensor([sigma])
            pred = model.denoise(x0 + sigma * noise, s, embedding, cond_latent, plucker, None)
            errors.append(float((pred - x0).pow(2).mean()))
    return float(np.mean(errors))


def test_diffusion_training_on_one_object_lowers_the_x0_error(demo_shards):
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = Ouroboros3D.from_config(preset("tiny", feedback="none", joint_training=False))
        batch = _orbit_batch(demo_shards)
        model.eval()
        before = x0_error(model, batch)
        model.train()
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3, weight_decay=0.0)
        for step in range(80):
            out = model.training_losses(batch, generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), 1.0)
            opt.step()
        model.eval()
        after = x0_error(model, batch)
    finally:
        torch.set_num_threads(threads)
    assert after < 0.5 * before, (before, after)  # seen: 0.278 -> 0.088 (0.085 after 120 steps)


def test_fresh_adapters_leave_a_pretrained_model_unchanged(tmp_path):
    """A diffusion-only export fine-tuned with feedback (``from_pretrained(feedback=...)``)
    starts as exactly the same denoiser: fresh adapters output zero whatever the feedback."""
    torch.manual_seed(0)
    base = Ouroboros3D.from_config(preset("tiny", feedback="none", joint_training=False))
    base.save_pretrained(tmp_path / "base")
    grown = Ouroboros3D.from_pretrained(tmp_path / "base", feedback="ccm_rgb", joint_training=True)
    assert grown.denoiser.ccm_adapter is not None and grown.denoiser.rgb_adapter is not None
    r, h = grown.config.resolution, grown.latent_size
    gen = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, 8, 4, h, h, generator=gen)
    sigma = torch.tensor([1.0])
    emb = torch.randn(1, 1, grown.image_encoder.config.projection_dim, generator=gen)
    cond = torch.randn(1, 4, h, h, generator=gen)
    plucker = torch.randn(1, 8, 6, h, h, generator=gen)
    feedback = dict(ccm=torch.rand(1, 8, 3, r, r, generator=gen), rgb=torch.rand(1, 8, 3, r, r, generator=gen))
    with torch.no_grad():
        plain = grown.denoise(noisy, sigma, emb, cond, plucker, None)  # adapters not run at all
        got = grown.denoise(noisy, sigma, emb, cond, plucker, feedback)
        before = base.denoise(noisy, sigma, emb, cond, plucker, None)
    torch.testing.assert_close(got, plain, rtol=0, atol=0)
    # the same weights as the export (a reloaded UNet differs only by float summation order)
    torch.testing.assert_close(got, before, rtol=0, atol=1e-4)
    # and the switch really builds what it says: a wrong mode is refused with the folder named
    with pytest.raises(ValueError, match="base"):
        Ouroboros3D.from_pretrained(tmp_path / "base", feedback="depth")


def train_autoencoder(config: str, data, out, *assignments: str) -> subprocess.CompletedProcess:
    """``python training/main.py --config <config>`` (objective ``autoencoder``), one process."""
    cmd = [sys.executable, "training/main.py", "--config", config, "--data", str(data), "--output", str(out),
           "--resume", "auto", "--set", "data.num_workers=0", *(x for a in assignments for x in ("--set", a))]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.slow
def test_autoencoder_trainer_output_loads_and_round_trips(demo_shards, tmp_path):
    """The trainer's ``autoencoder`` objective (``--config tiny_autoencoder``) -> an SVD folder
    the tiny preset loads through ``svd_path`` (the real from_pretrained path), which round-trips a
    rendered orbit far better than the randomly initialised autoencoder; a second run resumes
    from its checkpoint."""
    from training.autoencoder import roundtrip

    out = tmp_path / "ae"
    proc = train_autoencoder("tiny_autoencoder", demo_shards, out, "max_steps=100", "checkpoint_every=50",
                             "autoencoder.scale_batches=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "autoencoder.json").read_text())
    assert summary["steps"] == 100 and (out / "roundtrip.png").is_file()
    # scaling factor = 1 / std of the latents, written into the saved VAE config
    saved = json.loads((out / "export" / "vae" / "config.json").read_text())
    assert saved["scaling_factor"] == pytest.approx(1 / summary["latent_std"])

    trained = Ouroboros3D.from_config(preset("tiny", svd_path=str(out / "export"))).vae
    torch.manual_seed(0)
    random_vae = Ouroboros3D.from_config(preset("tiny")).vae
    images = _orbit_batch(demo_shards)["images"]

    def psnr(vae) -> float:
        recon = from_vae_pixels(roundtrip(vae, to_vae_pixels(images)))
        return float(-10 * torch.log10((recon - images).pow(2).mean()))

    with torch.no_grad():
        good, bad = psnr(trained), psnr(random_vae)
    assert good > bad + 6.0, (good, bad)  # seen: 13.98 vs 7.08 dB at 100 steps (6.45 dB apart at 60)
    # the config's cosine schedule is what the optimizer used, step by step
    lrs = [json.loads(line)["lr"] for line in (out / "losses.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([2e-3 * (0.05 + 0.95 * (1 + math.cos(math.pi * s / 100)) / 2) for s in range(100)])

    # resume: a longer run continues from step 100 instead of starting over
    proc = train_autoencoder("tiny_autoencoder", demo_shards, out, "max_steps=110", "checkpoint_every=50",
                             "autoencoder.scale_batches=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "losses.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 111))
    assert json.loads((out / "autoencoder.json").read_text())["steps"] == 110


def test_colour_recipe_config_writes_a_coherent_folder_for_a_wider_latent(demo_shards, tmp_path):
    """The colour recipe's config (``tiny_autoencoder_colour``: a wider latent, colour
    augmentation per view, the linear-path start, the chroma term; here at 8 channels) trains and
    writes an SVD folder whose autoencoder and UNet agree on the wider latent; the tiny preset
    loads it through ``svd_path`` and encodes to that latent."""
    out = tmp_path / "ae"
    proc = train_autoencoder("tiny_autoencoder_colour", demo_shards, out, "max_steps=3", "model.latent_channels=8",
                             "autoencoder.scale_batches=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = yaml.safe_load((out / "train_config.yaml").read_text())["autoencoder"]
    assert (resolved["augment"], resolved["init"], resolved["loss"]["chroma_weight"]) == ("view", "linear-path", 10.0)
    assert json.loads((out / "autoencoder.json").read_text())["latent_channels"] == 8
    model = Ouroboros3D.from_config(preset("tiny", svd_path=str(out / "export")))
    assert model.vae.config.latent_channels == 8
    assert (model.denoiser.unet.config.in_channels, model.denoiser.unet.config.out_channels) == (16, 8)
    images = _orbit_batch(demo_shards)["images"]
    with torch.no_grad():
        z = model.vae.encode(to_vae_pixels(images.flatten(0, 1))).latent_dist.mode()
    assert z.shape == (images.shape[0] * images.shape[1], 8, 8, 8)


def test_autoencoder_objective_weighs_kl_as_stable_diffusion_does():
    """``autoencoder_loss`` x (values per image) is SD's ``LPIPSWithDiscriminator`` objective
    without the adversarial term: reconstruction summed over an image's values plus
    ``kl_weight x KL`` per image, averaged over images (computed here from the same draws)."""
    from diffusers import AutoencoderKLTemporalDecoder

    from training.autoencoder import autoencoder_loss

    torch.manual_seed(0)
    vae = AutoencoderKLTemporalDecoder(**preset("tiny").vae).double()  # float64: the KL term is ~1e-9 of it
    images = torch.rand(1, 8, 3, 64, 64, dtype=torch.float64) * 2 - 1
    ours = autoencoder_loss(vae, images, torch.Generator().manual_seed(5), 1e-6, mse_weight=1.0)["loss"]

    x = images.flatten(0, 1)
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=torch.Generator().manual_seed(5)), num_frames=8).sample
        err = recon - x
        per_image = (err.abs() + err.pow(2)).flatten(1).sum(1) + 1e-6 * posterior.kl()
        kl_share = float(1e-6 * posterior.kl().mean() / per_image.mean())
    assert kl_share > 1e-10  # float64 resolves it: a KL weighed 3 H W times too much or too little shows
    assert float(ours) * x[0].numel() == pytest.approx(float(per_image.mean()), rel=1e-3 * kl_share)


def test_autoencoder_chroma_term_is_the_colour_part_of_the_squared_error():
    """``chroma_weight`` adds that weight times the mean squared error of the colour part (each
    channel minus its BT.601 luma, computed here by hand): zero for a grey error, 0.701^2 + 2 x
    0.299^2 over 3 for a unit red one; and the trainer's loss grows by exactly that term."""
    from diffusers import AutoencoderKLTemporalDecoder

    from common.image_metrics import chroma
    from training.autoencoder import autoencoder_loss

    grey = torch.full((2, 3, 4, 4), 0.7)
    red = torch.zeros(2, 3, 4, 4)
    red[:, 0] = 1.0
    assert chroma(grey).abs().max() < 1e-6
    assert chroma(red).square().mean().item() == pytest.approx((0.701**2 + 2 * 0.299**2) / 3, rel=1e-5)

    torch.manual_seed(0)
    vae = AutoencoderKLTemporalDecoder(**preset("tiny").vae).double()
    images = torch.rand(1, 8, 3, 64, 64, dtype=torch.float64) * 2 - 1
    plain, weighted = (autoencoder_loss(vae, images, torch.Generator().manual_seed(5), 1e-6, mse_weight=1.0,
                                        chroma_weight=w) for w in (0.0, 10.0))  # fmt: skip
    x = images.flatten(0, 1)
    err = weighted["recon"].flatten(0, 1) - x
    by_hand = (err - torch.einsum("c,nchw->nhw", torch.tensor([0.299, 0.587, 0.114], dtype=err.dtype), err)[:, None])
    assert by_hand.square().mean().item() > 1e-3
    assert float(weighted["loss"] - plain["loss"]) == pytest.approx(10.0 * by_hand.square().mean().item(), rel=1e-9)


def test_autoencoder_objective_feeds_the_vae_its_own_pixel_range():
    """The trainer's ``autoencoder`` objective takes the loader's images in [0, 1] to the VAE's
    [-1, 1] (``2 x - 1``, written out here) before ``autoencoder_loss``: the same loss from the same
    draws, and not the loss of the images as they come."""
    from diffusers import AutoencoderKLTemporalDecoder

    from training.autoencoder import AutoencoderObjective, autoencoder_loss
    from training.config import AutoencoderSection

    torch.manual_seed(0)
    vae = AutoencoderKLTemporalDecoder(**preset("tiny").vae)
    images = torch.rand(1, 8, 3, 64, 64)
    out = AutoencoderObjective(vae, AutoencoderSection())({"images": images}, torch.Generator().manual_seed(5))
    same = autoencoder_loss(vae, images * 2 - 1, torch.Generator().manual_seed(5), 1e-6, mse_weight=1.0)
    as_they_come = autoencoder_loss(vae, images, torch.Generator().manual_seed(5), 1e-6, mse_weight=1.0)
    assert float(out["loss"]) == pytest.approx(float(same["loss"]), rel=1e-6)
    assert abs(float(out["loss"]) - float(as_they_come["loss"])) > 1e-3
    assert out["visuals"]["roundtrip"].min() >= 0 and out["visuals"]["roundtrip"].max() <= 1
