"""Model (SVD multi-view generator) benchmark: step time and peak memory.

CPU (always): the tiny preset, one Algorithm 1 training step (``training_losses`` +
backward) with and without 3D self-conditioning, and the denoiser alone (forward+backward).
CUDA (only when a GPU is present): the full preset at 512 px, 8 views, batch 1, fp16
autocast: denoiser forward+backward and the whole Algorithm 1 step, with and without
gradient checkpointing; step time and peak memory.

    python bench/bench_model.py [--repeats 2] [--skip-cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's packages, however the script is started

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.conventions import DEFAULT_FOV_DEG, intrinsics, orbit_c2w  # noqa: E402
from model.camera_embedding import latent_plucker_rays  # noqa: E402
from model.config import preset  # noqa: E402
from model.ouroboros import Ouroboros3D  # noqa: E402


def make_batch(resolution: int, views: int, device) -> dict:
    """A synthetic training batch in docs/interfaces.md's layout (model-frame orbit cameras)."""
    gen = torch.Generator().manual_seed(0)
    c2w = torch.tensor(orbit_c2w(10.0, np.arange(views) * 360.0 / views), dtype=torch.float32)[None]
    K = torch.tensor(intrinsics(DEFAULT_FOV_DEG, resolution), dtype=torch.float32).expand(1, views, 3, 3)
    alphas = (torch.rand(1, views, 1, resolution, resolution, generator=gen) > 0.3).float()
    images = torch.rand(1, views, 3, resolution, resolution, generator=gen) * alphas + (1 - alphas)
    batch = dict(images=images, alphas=alphas, ccm=torch.rand_like(images) * alphas, c2w=c2w, K=K.clone())
    return {k: v.to(device) for k, v in batch.items()} | {"key": ["bench_o0"]}


def timed(fn, repeats: int, device) -> tuple[float, float]:
    """(median seconds, peak CUDA memory in GiB or nan) of ``fn`` after one warm-up call."""
    fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return float(np.median(times)), peak


def denoiser_step(model: Ouroboros3D, batch: dict, amp: bool):
    """One forward+backward of the multi-view UNet with camera rays and feedback maps."""
    cfg = model.config
    B, V = batch["images"].shape[:2]
    h = cfg.resolution // 8
    device = batch["images"].device

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            noisy = torch.randn(B, V, 4, h, h, device=device)
            embedding = torch.randn(B, 1, model.image_encoder.config.projection_dim, device=device)
            cond = torch.randn(B, 4, h, h, device=device)
            plucker = latent_plucker_rays(batch["c2w"], batch["K"], cfg.resolution, h)
            feedback = model.feedback_maps(None, noisy)
            pred = model.denoise(noisy, torch.ones(B, device=device), embedding, cond, plucker, feedback)
        pred.float().square().mean().backward()

    return step


def algorithm1_step(model: Ouroboros3D, batch: dict, self_cond: bool, amp: bool):
    def step():
        model.zero_grad(set_to_none=True)
        model.config.self_cond_prob = 1.0 if self_cond else 0.0
        with torch.autocast(batch["images"].device.type, dtype=torch.float16, enabled=amp):
            loss = model.training_losses(batch, torch.Generator().manual_seed(0))["loss"]
        loss.backward()

    return step


def run(name: str, device: torch.device, repeats: int, amp: bool, checkpointing_options) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    model = Ouroboros3D.from_config(preset(name)).to(device).train()
    batch = make_batch(model.config.resolution, model.config.num_views, device)
    for checkpointing in checkpointing_options:
        if checkpointing:
            model.enable_gradient_checkpointing()
        cases = {
            "denoiser fwd+bwd": denoiser_step(model, batch, amp),
            "Algorithm 1 step, no self-cond": algorithm1_step(model, batch, False, amp),
            "Algorithm 1 step, self-cond": algorithm1_step(model, batch, True, amp),
        }
        for case, fn in cases.items():
            try:
                seconds, peak = timed(fn, repeats, device)
                rows.append(dict(preset=name, device=str(device), case=case, checkpointing=checkpointing,
                                 seconds=seconds, peak_gib=peak))
            except torch.OutOfMemoryError:
                rows.append(dict(preset=name, device=str(device), case=case, checkpointing=checkpointing,
                                 seconds=float("nan"), peak_gib="OOM"))
                torch.cuda.empty_cache()
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, cuda: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    rows = []
    if not args.skip_cpu:
        rows += run("tiny", torch.device("cpu"), args.repeats, amp=False, checkpointing_options=(False,))
    if torch.cuda.is_available():
        rows += run("full", torch.device("cuda"), args.repeats, amp=True, checkpointing_options=(False, True))
    else:
        print("no CUDA device: the full-preset GPU benchmark was not run")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
