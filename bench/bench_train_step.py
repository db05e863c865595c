"""Training step time through the real DeepSpeed engine (one process), micro batch 1.

    python bench/bench_train_step.py [--steps 3] [--variants fast tiny] [--full-on-gpu]

Variants: ``fast`` = tiny preset without the LGM branch (feedback none, no joint training: the
diffusion path of Algorithm 1, what most trainer tests run); ``tiny`` = the full tiny preset
(feedback adapters + LGM joint training + rendering); ``full`` = the paper's model at 512 px,
only with CUDA (``--full-on-gpu``). Inputs: random views with real orbit cameras (the step
time does not depend on image content).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's packages, however the script is started

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import conventions as cv  # noqa: E402
from training.config import load_config  # noqa: E402
from training.engine import build_engine, init_distributed, train_step  # noqa: E402

VARIANTS = {
    "fast": ("tiny", dict(feedback="none", joint_training=False)),
    "tiny": ("tiny", {}),
    "full": ("full", {}),
}


def random_batches(resolution: int, num_views: int, batch_size: int = 1):
    """Endless loader-like batches (docs/interfaces.md) of random views on a real orbit."""
    c2w, _ = cv.to_condition_frame(cv.orbit_c2w(15.0, cv.orbit_azimuths(0.0)[::2][:num_views]))
    K = cv.intrinsics(cv.DEFAULT_FOV_DEG, resolution)
    g = torch.Generator().manual_seed(0)
    B, V, R = batch_size, num_views, resolution
    while True:
        yield dict(
            images=torch.rand(B, V, 3, R, R, generator=g),
            alphas=torch.ones(B, V, 1, R, R),
            ccm=torch.rand(B, V, 3, R, R, generator=g),
            c2w=torch.tensor(c2w, dtype=torch.float32).expand(B, V, 4, 4).clone(),
            K=torch.tensor(np.broadcast_to(K, (B, V, 3, 3)).copy(), dtype=torch.float32),
            key=["bench"] * B,
        )


def bench(variant: str, steps: int, deepspeed) -> None:
    from model.config import preset
    from model.ouroboros import Ouroboros3D

    name, overrides = VARIANTS[variant]
    cfg = load_config(REPO / "training" / "configs" / f"{name}.yaml")
    cfg.optim.total_batch = cfg.optim.micro_batch = 1
    torch.manual_seed(0)
    model = Ouroboros3D.from_config(preset(name, **overrides))
    engine = build_engine(model, cfg, deepspeed)
    batches = random_batches(model.config.resolution, model.config.num_views)
    train_step(engine, batches, seed=0)  # warm-up (allocations, lazy init)
    times = [train_step(engine, batches, seed=0).step_s for _ in range(steps)]
    n = sum(p.numel() for p in model.trainable_parameters())
    print(f"{variant:5s} ({name} preset {overrides or ''}): {np.median(times):.2f} s/step median of "
          f"{steps} (min {min(times):.2f}), {n / 1e6:.1f}M trainable, device {engine.device}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=["fast", "tiny"], choices=["fast", "tiny"])
    p.add_argument("--full-on-gpu", action="store_true", help="also the full preset (needs CUDA)")
    args = p.parse_args()
    deepspeed = init_distributed()
    print(f"machine: {os.cpu_count()} CPU cores, CUDA: {torch.cuda.is_available()}, "
          f"torch threads {torch.get_num_threads()}")
    variants = list(args.variants)
    if args.full_on_gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--full-on-gpu needs CUDA")
        variants.append("full")
    for variant in variants:
        bench(variant, args.steps, deepspeed)


if __name__ == "__main__":
    main()
