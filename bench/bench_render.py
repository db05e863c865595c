"""Rendering throughput: seconds per frame and objects per hour for 2 orbits x 16 frames + CCM.

    python bench/bench_render.py [--mesh /work/shared/assets/Duck.glb] [--resolutions 128 512]
                                 [--samples 32] [--device auto] [--no-denoise] [--frames 16]

For each resolution it times ``render_object`` twice: 2 orbits x ``--frames`` frames (16: the
real job) and a one-frame job; the difference gives the cost per frame, the one-frame job the
fixed cost per object (worker start, Blender start, import, scene set-up). Seconds per object
are for 2 x 16 frames: measured when ``--frames 16``, else fixed + 32 x per-frame cost.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from pathlib import Path

from data_pipeline.render import RenderSettings, render_object

DEFAULT_MESH = Path("/work/shared/assets/Duck.glb")


def timed_render(mesh: Path, settings: RenderSettings) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the worker process, device used)."""
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    orbits = render_object(mesh, "bench", settings)
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    return wall, cpu, orbits[0].meta["renderer"]["device"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mesh", type=Path, default=DEFAULT_MESH)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-denoise", action="store_true")
    parser.add_argument("--frames", type=int, default=16, help="frames per orbit to time")
    args = parser.parse_args()

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; mesh {args.mesh.name}, samples {args.samples}, "
          f"denoise {not args.no_denoise}")
    print("| resolution | device | s / object (32 frames) | fixed s / object | s / frame "
          "| objects / hour | CPU s / frame |")
    print("|---|---|---|---|---|---|---|")
    for res in args.resolutions:
        common = dict(resolution=res, samples=args.samples, device=args.device,
                      denoise=not args.no_denoise, timeout_s=3600)
        frames = tuple(range(args.frames))
        full, full_cpu, device = timed_render(args.mesh, RenderSettings(frames=frames, **common))
        single, single_cpu, _ = timed_render(args.mesh, RenderSettings(num_orbits=1, frames=(0,), **common))
        per_frame = (full - single) / (2 * args.frames - 1)
        cpu_per_frame = (full_cpu - single_cpu) / (2 * args.frames - 1)
        fixed = single - per_frame
        per_object = fixed + 32 * per_frame
        print(f"| {res} | {device} | {per_object:.1f} | {fixed:.1f} | {per_frame:.2f} "
              f"| {3600 / per_object:.0f} | {cpu_per_frame:.2f} |", flush=True)


if __name__ == "__main__":
    main()
