"""Rasterizer speed and memory: the CPU torch reference at several resolutions for LGM-sized
(4 x 128 x 128 = 65,536) and tiny (4 x 16 x 16 = 1,024) Gaussian sets, forward and
forward + backward; the same through gsplat when CUDA is present.

Each configuration runs in a fresh process so that its peak resident memory (CPU) is its own.

    .venv/bin/python bench/bench_rasterizer.py --threads 1         # full table
    .venv/bin/python bench/bench_rasterizer.py --sizes 64 128 --counts 1024
    .venv/bin/python bench/bench_rasterizer.py --sizes 64 --counts 1024 --picture docs/images/rasterizer_duck.png
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's packages, however the script is started
sys.path.insert(1, str(REPO / "tests"))  # the tests' helpers, as pytest imports them

from data_paths import ASSETS  # noqa: E402

from common import conventions as C  # noqa: E402


def lgm_like_gaussians(n: int, device: str, seed: int = 0) -> torch.Tensor:
    """[1, n, 14] Gaussians shaped like an LGM output: small, inside the unit object box."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.cat(
        [
            (torch.rand(n, 3, generator=gen) - 0.5) * 0.9,
            torch.rand(n, 1, generator=gen),
            0.003 + 0.02 * torch.rand(n, 3, generator=gen),
            torch.nn.functional.normalize(torch.randn(n, 4, generator=gen), dim=-1),
            torch.rand(n, 3, generator=gen),
        ],
        -1,
    )
    return g[None].to(device)


def run_one(size: int, n: int, backend: str, device: str, repeats: int, threads: int, queue) -> None:
    from model.rasterizer import render_gaussians

    torch.set_num_threads(threads)
    g = lgm_like_gaussians(n, device)
    c2w = torch.tensor(C.orbit_c2w(15.0, [30.0]), dtype=torch.float32, device=device)[None]
    K = torch.tensor(C.intrinsics(C.DEFAULT_FOV_DEG, size), dtype=torch.float32, device=device)[None, None]
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def forward():
        return render_gaussians(g, c2w, K, size, size, backend=backend)

    def forward_backward():
        gg = g.clone().requires_grad_(True)
        out = render_gaussians(gg, c2w, K, size, size, backend=backend)
        (out["rgb"].mean() + out["ccm"].mean() + out["depth"].mean()).backward()

    times = {}
    for name, fn in (("forward", forward), ("forward+backward", forward_backward)):
        with torch.no_grad() if name == "forward" else torch.enable_grad():
            fn()  # warm-up (gsplat: JIT build on first call)
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            with torch.no_grad() if name == "forward" else torch.enable_grad():
                fn()
        sync()
        times[name] = (time.perf_counter() - start) / repeats
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024  # MiB
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    queue.put((times["forward"], times["forward+backward"], peak))


def save_picture(path: str, size: int = 256) -> None:
    """Render Gaussians sampled on tests/assets/Duck.glb (coloured by normal) from 4
    views; save rows rgb | alpha | depth | ccm as one PNG, to look at."""
    import numpy as np
    import trimesh
    from PIL import Image

    from model.rasterizer import render_gaussians

    mesh = trimesh.load(ASSETS / "Duck.glb", force="mesh")
    scale, offset = C.normalization_from_bounds(*mesh.bounds)
    mesh.apply_scale(scale)
    mesh.apply_translation(offset)
    points, faces = trimesh.sample.sample_surface(mesh, 65536, seed=0)
    n = len(points)
    g = torch.zeros(1, n, 14)
    g[0, :, 0:3] = torch.tensor(points, dtype=torch.float32)
    g[0, :, 3] = 0.9
    g[0, :, 4:7] = 0.006
    g[0, :, 7] = 1.0
    g[0, :, 11:14] = torch.tensor(mesh.face_normals[faces] * 0.5 + 0.5, dtype=torch.float32)
    c2w = torch.tensor(C.orbit_c2w(20.0, [0.0, 90.0, 180.0, 270.0]), dtype=torch.float32)[None]
    K = torch.tensor(C.intrinsics(C.DEFAULT_FOV_DEG, size), dtype=torch.float32).expand(1, 4, 3, 3)
    with torch.no_grad():
        out = render_gaussians(g, c2w, K, size, size, background=1.0)
    depth = out["depth"]
    near, far = depth[depth > 0].min(), depth.max()
    depth = torch.where(depth > 0, (far - depth) / (far - near), torch.zeros_like(depth))
    rows = [out["rgb"], out["alpha"].expand(-1, -1, 3, -1, -1), depth.expand(-1, -1, 3, -1, -1), out["ccm"]]
    grid = torch.cat([torch.cat(list(r[0]), 2) for r in rows], 1)  # [3, 4H, 4W]
    img = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(img).save(path)
    print(f"wrote {path}: rows rgb | alpha | depth | ccm, columns azimuth 0/90/180/270")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--counts", type=int, nargs="+", default=[1024, 65536])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads (1 on a shared machine: contended OpenMP threads spin)")
    parser.add_argument("--picture", help="also save a PNG of a rendered Gaussian Duck here")
    args = parser.parse_args()
    if args.picture:
        save_picture(args.picture)

    setups = [("torch", "cpu")]
    if torch.cuda.is_available():
        setups += [("torch", "cuda"), ("gsplat", "cuda")]
    else:
        print("CUDA not available: gsplat not measured.")
    ctx = mp.get_context("spawn")
    print(f"torch {torch.__version__}, {args.threads} CPU threads, 1 view per render")
    print("| backend | device | Gaussians | px | forward s | fwd+bwd s | peak mem MiB |")
    print("|---|---|---|---|---|---|---|")
    for backend, device in setups:
        for n in args.counts:
            for size in args.sizes:
                queue = ctx.Queue()
                proc = ctx.Process(target=run_one, args=(size, n, backend, device, args.repeats, args.threads, queue))
                proc.start()
                proc.join()
                if proc.exitcode != 0:
                    print(f"| {backend} | {device} | {n} | {size} | failed (exit {proc.exitcode}) | | |")
                    continue
                fwd, fwdbwd, peak = queue.get()
                print(f"| {backend} | {device} | {n:,} | {size} | {fwd:.3f} | {fwdbwd:.3f} | {peak:.0f} |", flush=True)


if __name__ == "__main__":
    main()
