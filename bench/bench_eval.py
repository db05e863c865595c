"""Evaluation timings: metrics per object (8 views) and ground-truth rendering per GSO object.

    python bench/bench_eval.py [--resolution 512] [--render-resolution 128] [--render-samples 16]
        [--checkpoint EXPORT_DIR --steps 2]

Prints one line per measurement (median of --repeats runs). The rendering measurement arranges
the shared asset spot.obj in GSO layout, as tests/test_gso_benchmark.py does; with
--checkpoint, one whole benchmark object (ground truth, both variants, metrics) is timed too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's packages, however the script is started
sys.path.insert(1, str(REPO / "tests"))  # the tests' helpers, as pytest imports them

import torch  # noqa: E402

from common.image_metrics import LPIPSMetric, psnr, ssim  # noqa: E402


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--render-resolution", type=int, default=128)
    p.add_argument("--render-samples", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    a = torch.rand(8, 3, args.resolution, args.resolution, generator=g).to(dev)
    b = torch.rand(8, 3, args.resolution, args.resolution, generator=g).to(dev)
    lp = LPIPSMetric("vgg", device=dev)
    r = args.resolution
    print(f"device {dev}, torch threads {torch.get_num_threads()}")
    print(f"PSNR  8 views {r}px: {timed(lambda: psnr(a.double(), b.double()), args.repeats):.3f} s")
    print(f"SSIM  8 views {r}px: {timed(lambda: ssim(a.double(), b.double()), args.repeats):.3f} s")
    print(f"LPIPS-VGG 8 views {r}px: {timed(lambda: lp(a, b), args.repeats):.3f} s")

    from eval import gso
    from eval.gso_benchmark import evaluate_object, parse_args, render_ground_truth
    from data_paths import ASSETS
    from test_gso_benchmark import _checker, _write_gso_object

    with tempfile.TemporaryDirectory() as tmp:
        _write_gso_object(Path(tmp), "spot", ASSETS / "spot.obj", _checker())
        obj = gso.load_object(tmp, "spot")
        t = timed(lambda: render_ground_truth(obj, args.render_resolution, args.render_samples,
                                              "auto"), 1)  # fmt: skip
        print(f"GT render, 8 frames {args.render_resolution}px {args.render_samples} spp: {t:.1f} s")
        if args.checkpoint is not None:
            from model.ouroboros import Ouroboros3D

            model = Ouroboros3D.from_pretrained(args.checkpoint).to(dev).eval()
            bench_args = parse_args(["--gso-root", tmp, "--checkpoint", str(args.checkpoint),
                                     "--output", tmp, "--steps", str(args.steps),
                                     "--render-samples", str(args.render_samples)])  # fmt: skip
            start = time.perf_counter()
            rows, _ = evaluate_object(model, obj, bench_args, lp, dev)
            total = time.perf_counter() - start
            print(f"benchmark object ({model.config.name} preset, {model.config.resolution}px, "
                  f"{args.steps} steps): {total:.1f} s, sample() "
                  + ", ".join(f"{r['variant']} {r['seconds']:.1f} s" for r in rows))  # fmt: skip


if __name__ == "__main__":
    main()
