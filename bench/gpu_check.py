"""The prepared GPU check (issue 9): one run, one table. Started by ``bench/gpu_check.sh``.

    python bench/gpu_check.py              # on one CUDA GPU (H100 / H200): the full preset
    python bench/gpu_check.py --dry-run    # anywhere: the same code on tiny sizes (CPU test)

Rows:
1. rasterizer: gsplat against the torch reference (``model/rasterizer``) on LGM-like Gaussians,
   images and gradients, with tolerances. gsplat compiles its CUDA extension at its first call;
   that time is a row of its own. The dry run renders the reference only (gsplat needs CUDA).
2. train step: Algorithm 1 of the full preset (random weights, ``from_config``) under DeepSpeed
   ZeRO-2 on one GPU in fp16 (dry run: tiny preset, bf16, CPU), self-conditioning at every step
   so that every part runs: seconds per step (median), peak memory, achieved TFLOP/s
   (``torch.utils.flop_counter`` FLOPs of one step, recomputation included, / step time).
3. sampling: Algorithm 2 with feedback at every step, 25 steps (dry run: 2), seconds.
4. metrics: PSNR + SSIM + LPIPS (``common.image_metrics.image_metrics``) of 8 views, images per second.

Every section runs even when an earlier one failed; a failure is a row saying so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's packages, however the script is started

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.bench_train_step import random_batches  # noqa: E402
from common import conventions as cv  # noqa: E402

# gsplat vs reference: float32 kernels differ by ~1e-6 per pixel; pixels where an alpha sits at
# the 1/255 cutoff or the transmittance at the 1e-4 stop may flip, so the image tolerance is on
# the 99.9th percentile and the mean, and the maximum is reported as it is.
IMAGE_P999_TOL = 1e-3
IMAGE_MEAN_TOL = 1e-4
GRAD_REL_TOL = 1e-2  # ||g_gsplat - g_torch|| / ||g_torch|| per parameter group
GRAD_GROUPS = {"xyz": slice(0, 3), "opacity": slice(3, 4), "scale": slice(4, 7), "rotation": slice(7, 11),
               "rgb": slice(11, 14)}


class Table:
    """Rows of (check, setting, result, verdict), printed once as a Markdown table."""

    def __init__(self):
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, check: str, setting: str, result: str, verdict: str = "") -> None:
        self.rows.append((check, setting, result, verdict))
        print(f"[gpu_check] {check} | {setting} | {result} | {verdict}", flush=True)

    def markdown(self) -> str:
        lines = ["| check | setting | result | verdict |", "|---|---|---|---|"]
        lines += [f"| {' | '.join(row)} |" for row in self.rows]
        return "\n".join(lines)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(result of fn(), wall seconds), the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


# ----------------------------------------------------------------------------- 1. rasterizer
def lgm_like_gaussians(n: int, generator: torch.Generator) -> torch.Tensor:
    """[1, n, 14] Gaussians as a trained LGM emits them: centres near a surface inside the unit
    box, ``0.1 softplus`` scales of a few thousandths, sigmoid opacities from nearly 0 to above
    0.999 (the clamp and the 1e-4 stop are exercised), random rotations and colours."""
    direction = torch.nn.functional.normalize(torch.randn(n, 3, generator=generator), dim=-1)
    radius = 0.3 + 0.05 * torch.randn(n, 1, generator=generator)
    xyz = (direction * radius).clamp(-0.5, 0.5)
    opacity = torch.sigmoid(3.0 * torch.randn(n, 1, generator=generator))
    scale = 0.1 * torch.nn.functional.softplus(torch.randn(n, 3, generator=generator) - 3.5)
    rotation = torch.nn.functional.normalize(torch.randn(n, 4, generator=generator), dim=-1)
    rgb = torch.rand(n, 3, generator=generator)
    return torch.cat([xyz, opacity, scale, rotation, rgb], -1)[None]


def orbit_cameras(num_views: int, size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, V, 4, 4] c2w on the default orbit (15 degrees up, every 360 / V) and [1, V, 3, 3] K."""
    c2w = cv.orbit_c2w(15.0, np.arange(num_views) * 360.0 / num_views)
    K = np.broadcast_to(cv.intrinsics(cv.DEFAULT_FOV_DEG, size), (num_views, 3, 3))
    return (torch.tensor(c2w, dtype=torch.float32, device=device)[None],
            torch.tensor(np.array(K), dtype=torch.float32, device=device)[None])


def render_and_grad(g: torch.Tensor, c2w, K, size: int, backend: str, weights: dict):
    """Outputs of ``render_gaussians`` and the gradient of ``sum_k <weights_k, out_k>`` w.r.t. ``g``."""
    from model.rasterizer import render_gaussians

    g = g.detach().clone().requires_grad_(True)
    out = render_gaussians(g, c2w, K, size, size, background=1.0, backend=backend)
    loss = sum((out[k] * w).sum() for k, w in weights.items())
    (grad,) = torch.autograd.grad(loss, g)
    return {k: v.detach() for k, v in out.items()}, grad


def image_errors(ref: dict, test: dict) -> dict:
    """Per output (depth only where both alphas > 0.5): (mean, 99.9th percentile, max) |diff|."""
    errors = {}
    for key in ("rgb", "alpha", "ccm", "depth"):
        diff = (test[key].float() - ref[key].float()).abs()
        if key == "depth":
            diff = diff[((ref["alpha"] > 0.5) & (test["alpha"] > 0.5)).expand_as(diff)]
        diff = diff.flatten().cpu()
        p999 = float(torch.quantile(diff[:: max(1, diff.numel() // 1_000_000)], 0.999))
        errors[key] = (float(diff.mean()), p999, float(diff.max()))
    return errors


def check_rasterizer(table: Table, dry_run: bool, device: torch.device) -> None:
    n, size, views = (128, 16, 2) if dry_run else (16384, 256, 4)
    setting = f"{n} LGM-like Gaussians, {views} views, {size} px"
    gen = torch.Generator().manual_seed(0)
    g = lgm_like_gaussians(n, gen).to(device)
    c2w, K = orbit_cameras(views, size, device)
    weights = {k: torch.randn(1, views, c, size, size, generator=gen).to(device)
               for k, c in (("rgb", 3), ("alpha", 1), ("ccm", 3))}  # fmt: skip
    (ref, ref_grad), ref_s = timed(lambda: render_and_grad(g, c2w, K, size, "torch", weights), device)
    table.add("rasterizer: torch reference", f"{setting}, {device.type}", f"forward + backward {ref_s:.2f} s")
    if device.type != "cuda":
        table.add("rasterizer: gsplat vs torch", setting, "skipped (no CUDA)", "not run")
        return
    _, build_s = timed(lambda: render_and_grad(g[:, :8], c2w[:, :1], K[:, :1], 16, "gsplat",
                                               {"alpha": torch.ones(1, 1, 1, 16, 16, device=device)}), device)
    table.add("rasterizer: gsplat first call", "JIT build of its CUDA extension (cached after)", f"{build_s:.1f} s")
    (test, test_grad), test_s = timed(lambda: render_and_grad(g, c2w, K, size, "gsplat", weights), device)
    table.add("rasterizer: gsplat", f"{setting}, cuda", f"forward + backward {test_s * 1e3:.1f} ms")
    for key, (mean, p999, worst) in image_errors(ref, test).items():
        ok = mean <= IMAGE_MEAN_TOL and p999 <= IMAGE_P999_TOL
        table.add(f"gsplat vs torch: {key}", f"mean <= {IMAGE_MEAN_TOL:g}, p99.9 <= {IMAGE_P999_TOL:g}",
                  f"mean {mean:.2e}, p99.9 {p999:.2e}, max {worst:.2e}", "PASS" if ok else "FAIL")
    for name, cols in GRAD_GROUPS.items():
        rel = float((test_grad[..., cols] - ref_grad[..., cols]).norm() / ref_grad[..., cols].norm().clamp_min(1e-30))
        table.add(f"gsplat vs torch: d/d {name}", f"relative L2 <= {GRAD_REL_TOL:g}", f"{rel:.2e}",
                  "PASS" if rel <= GRAD_REL_TOL else "FAIL")


# ----------------------------------------------------------------------------- 2. train step
def train_config(dry_run: bool, micro_batch: int | None):
    """The preset's training YAML for one rank: total batch = micro batch, no accumulation."""
    from training.config import load_config

    name = "tiny" if dry_run else "full"
    cfg = load_config(REPO / "training" / "configs" / f"{name}.yaml")
    cfg.optim.micro_batch = cfg.optim.total_batch = micro_batch or cfg.optim.micro_batch
    cfg.optim.precision = "bf16" if dry_run else "fp16"
    return name, cfg


def build_model(preset_name: str, device: torch.device, dry_run: bool):
    """Random weights (``from_config``), built directly on ``device``; self-conditioning always.
    The dry run keeps 4 views (the LGM's inputs) to stay within a CPU test's budget."""
    from model.config import preset
    from model.ouroboros import Ouroboros3D

    overrides = dict(self_cond_prob=1.0)
    if dry_run:
        overrides.update(num_views=4, lgm_input_views=(0, 1, 2, 3))
    torch.manual_seed(0)
    with device:
        return Ouroboros3D.from_config(preset(preset_name, **overrides))


def counted_flops(fn):
    """(fn(), FLOPs of the matrix products, convolutions and attention it runs, forward and
    backward, as ``torch.utils.flop_counter`` counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    return out, counter.get_total_flops()


def check_train_step(table: Table, dry_run: bool, device: torch.device, steps: int, micro_batch: int | None):
    from training.engine import build_engine, init_distributed, train_step

    deepspeed = init_distributed()
    name, cfg = train_config(dry_run, micro_batch)
    model = build_model(name, device, dry_run)
    engine = build_engine(model, cfg, deepspeed)
    setting = (f"{name} preset, micro batch {cfg.optim.micro_batch} x {model.config.num_views} views at "
               f"{model.config.resolution} px, {cfg.optim.precision}, ZeRO-{cfg.optim.zero_stage}, "
               f"checkpointing {cfg.model.gradient_checkpointing}, {engine.device}")
    batches = random_batches(model.config.resolution, model.config.num_views, cfg.optim.micro_batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # warm-up (allocations, kernel selection), counted: every step runs the same parts
    first, flops = counted_flops(lambda: train_step(engine, batches, seed=0))
    results = [train_step(engine, batches, seed=0) for _ in range(steps)]
    times = [r.step_s for r in results]
    losses = [first.losses["loss"]] + [r.losses["loss"] for r in results]
    finite = all(np.isfinite(losses)) and all(r.self_cond_fraction == 1.0 for r in results)
    table.add("train step (Algorithm 1)", setting,
              f"{statistics.median(times):.2f} s/step (median of {steps}; first {first.step_s:.1f} s), "
              f"losses {', '.join(f'{x:.3f}' for x in losses)}", "PASS" if finite else "FAIL: non-finite loss")
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        table.add("train step: peak memory", setting, f"{peak:.1f} GiB allocated (torch)")
    table.add("train step: achieved TFLOP/s", "FLOPs counted in one step (recomputation included) / median step",
              f"{flops / 1e12:.3g} TFLOP per step, {flops / statistics.median(times) / 1e12:.3g} TFLOP/s")
    trainable = sum(p.numel() for p in model.trainable_parameters())
    table.add("train step: model", name, f"{trainable / 1e9:.3f} B trainable parameters")
    return engine.module.model


# ----------------------------------------------------------------------------- 3. sampling
def check_sampling(table: Table, model, num_steps: int, device: torch.device) -> None:
    model.eval()
    V, H = model.config.num_views, model.config.resolution
    c2w, K = orbit_cameras(V, H, device)
    cond = torch.rand(1, 3, H, H, generator=torch.Generator().manual_seed(0)).to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    out, seconds = timed(lambda: model.sample(cond, c2w, K, num_steps=num_steps, generator=generator,
                                              progress=False), device)
    dtype = next(model.denoiser.parameters()).dtype
    ok = bool(torch.isfinite(out.views).all() and torch.isfinite(out.gaussians).all())
    table.add("sampling (Algorithm 2)", f"{num_steps} steps, feedback every step, CFG, {V} views at {H} px, "
              f"{str(dtype).replace('torch.', '')}", f"{seconds:.1f} s ({seconds / num_steps:.2f} s/step)",
              "PASS" if ok else "FAIL: non-finite output")


# ----------------------------------------------------------------------------- 4. metrics
def check_metrics(table: Table, size: int, device: torch.device) -> None:
    from common.image_metrics import LPIPSMetric, image_metrics

    lpips_metric = LPIPSMetric("vgg", device=device)
    gen = torch.Generator().manual_seed(0)
    pred, target = (torch.rand(8, 3, size, size, generator=gen).to(device) for _ in range(2))
    image_metrics(pred, target, lpips_metric)  # warm-up
    _, seconds = timed(lambda: image_metrics(pred, target, lpips_metric), device)
    trunk = "ImageNet VGG" if lpips_metric.comparable else "random VGG trunk (weights not cached)"
    table.add("metrics: PSNR + SSIM + LPIPS", f"8 views at {size} px, {device.type}, LPIPS {trunk}",
              f"{8 / seconds:.1f} images/s ({seconds:.2f} s)")


# ----------------------------------------------------------------------------- main
def run_section(table: Table, name: str, fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a failed section is reported, the others still run
        traceback.print_exc()
        table.add(name, "", f"ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}",
                  "FAIL")
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes; no gsplat, bf16 instead of fp16 without CUDA")
    p.add_argument("--steps", type=int, default=3, help="timed training steps after one warm-up")
    p.add_argument("--micro-batch", type=int, default=None, help="default: the preset's training YAML")
    p.add_argument("--sample-steps", type=int, default=None, help="default 25 (dry run: 2)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run, or on a GPU machine")
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    table = Table()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    table.add("machine", name, f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"{torch.get_num_threads()} threads", "dry run" if args.dry_run else "")
    run_section(table, "rasterizer", lambda: check_rasterizer(table, args.dry_run, device))
    model = run_section(table, "train step", lambda: check_train_step(
        table, args.dry_run, device, args.steps, args.micro_batch))
    if model is not None:
        steps = args.sample_steps or (2 if args.dry_run else 25)
        run_section(table, "sampling", lambda: check_sampling(table, model, steps, device))
    else:
        table.add("sampling (Algorithm 2)", "", "not run: no model (the train step failed)", "FAIL")
    run_section(table, "metrics", lambda: check_metrics(table, 64 if args.dry_run else 512, device))
    print("\n" + table.markdown())
    if args.json:
        args.json.write_text(json.dumps(table.rows, indent=1))
    failed = any(v.startswith("FAIL") for *_, v in table.rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
