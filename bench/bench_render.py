"""Rendering throughput of both worker kinds, side by side in one run: fixed cost per object,
cost per frame and objects per hour for 2 orbits x 16 frames + CCM.

    python bench/bench_render.py [--mesh tests/assets/Duck.glb] [--resolutions 64 128]
        [--samples 32] [--device auto] [--no-denoise] [--frames-per-orbit 1 2 4]
        [--repeats 5] [--full-repeats 2] [--modes persistent per-object]

For each resolution, ``render_object`` renders the mesh with 2 orbits of each of
``--frames-per-orbit`` frames, ``--repeats`` times, the two worker kinds interleaved (so that a
change in the machine's load hits both alike): ``per-object`` starts a Blender process per object
(the ``--worker-mode per-object`` job), ``persistent`` renders in one
:class:`~data_pipeline.blender_process.BlenderProcess` kept alive (started and warmed up by one
render before timing, as in the job's actors). The line through the medians of time against
frame count gives the cost per frame (slope) and the fixed cost per object (intercept: process,
Blender and BlenderProc start-up where there is one, reset, import, scene set-up, the two render
passes' own start, the parent's work). Wall seconds and CPU seconds (this process, its finished
children and the live persistent worker, from /proc) are both reported: CPU time is the steadier
figure on a loaded machine. Whole objects (16 frames per orbit) are then timed ``--full-repeats``
times per kind: their median gives seconds per object and objects per hour for one worker.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's packages, however the script is started
sys.path.insert(1, str(REPO / "tests"))  # the tests' helpers, as pytest imports them

from data_paths import ASSETS  # noqa: E402

from common.conventions import NUM_FRAMES, NUM_ORBITS  # noqa: E402
from data_pipeline.blender_process import BlenderProcess  # noqa: E402
from data_pipeline.render import RenderSettings, render_object  # noqa: E402

DEFAULT_MESH = ASSETS / "Duck.glb"
MODES = ("persistent", "per-object")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int | None) -> float:
    """User + system CPU seconds of a live process (0 when there is none)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def own_cpu() -> float:
    """CPU seconds of this process and of its children that have ended."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def timed_render(mesh: Path, settings: RenderSettings, worker: BlenderProcess | None) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one ``render_object`` call."""
    pid = worker.pid if worker else None
    cpu, worker_cpu = own_cpu(), process_cpu(pid)
    start = time.perf_counter()
    render_object(mesh, "bench", settings, worker=worker)
    wall = time.perf_counter() - start
    if worker is not None and worker.pid != pid:
        raise RuntimeError("the persistent worker was replaced during the benchmark")
    return wall, own_cpu() - cpu + process_cpu(pid) - worker_cpu


def fit(points: dict[int, list[tuple[float, float]]]) -> dict:
    """Line through the medians of (wall, CPU) against frames per object."""
    frames = np.array(sorted(points), dtype=float)
    out = {}
    for i, name in enumerate(("wall", "cpu")):
        medians = np.array([statistics.median(p[i] for p in points[f]) for f in sorted(points)])
        slope, intercept = np.polyfit(frames, medians, 1)
        out[name] = (intercept, slope)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mesh", type=Path, default=DEFAULT_MESH)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-denoise", action="store_true")
    parser.add_argument("--frames-per-orbit", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--full-repeats", type=int, default=2, help="whole objects timed per kind")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = parser.parse_args()

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average at start "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; mesh {args.mesh.name}, "
          f"samples {args.samples}, denoise {not args.no_denoise}, repeats {args.repeats}", flush=True)
    rows = []
    for res in args.resolutions:
        common = dict(resolution=res, samples=args.samples, device=args.device,
                      denoise=not args.no_denoise, timeout_s=3600)
        persistent = BlenderProcess(RenderSettings().memory_limit_gb, max_objects=10**9)
        workers = {"persistent": persistent, "per-object": None}
        render_object(args.mesh, "bench", RenderSettings(frames=(0,), **common), worker=persistent)  # warm-up
        points = {mode: {} for mode in args.modes}
        for _ in range(args.repeats):
            for f in args.frames_per_orbit:
                settings = RenderSettings(frames=tuple(range(f)), **common)
                for mode in args.modes:
                    points[mode].setdefault(NUM_ORBITS * f, []).append(
                        timed_render(args.mesh, settings, workers[mode]))
        full = {mode: [timed_render(args.mesh, RenderSettings(**common), workers[mode])
                       for _ in range(args.full_repeats)] for mode in args.modes}
        persistent.close()
        for mode in args.modes:
            line = fit(points[mode])
            wall_object = statistics.median(w for w, _ in full[mode])
            cpu_object = statistics.median(c for _, c in full[mode])
            rows.append((res, mode, line, wall_object, cpu_object))
            print(f"  {res} px {mode}: medians by frames "
                  + ", ".join(f"{n}: {statistics.median(w for w, _ in p):.2f} s / "
                              f"{statistics.median(c for _, c in p):.2f} CPU-s"
                              for n, p in sorted(points[mode].items())), flush=True)

    print(f"load average at end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| resolution | worker | fixed s / object | fixed CPU-s / object | s / frame | CPU-s / frame "
          f"| s / object ({NUM_ORBITS} x {NUM_FRAMES} frames, median) | CPU-s / object | objects / hour |")
    print("|---|---|---|---|---|---|---|---|---|")
    for res, mode, line, wall_object, cpu_object in rows:
        print(f"| {res} | {mode} | {line['wall'][0]:.2f} | {line['cpu'][0]:.2f} | {line['wall'][1]:.3f} "
              f"| {line['cpu'][1]:.3f} | {wall_object:.1f} | {cpu_object:.1f} | {3600 / wall_object:.0f} |")
    by = {(res, mode): (line, wall) for res, mode, line, wall, _ in rows}
    for res in args.resolutions:
        if (res, "persistent") in by and (res, "per-object") in by:
            (p, pw), (o, ow) = by[res, "persistent"], by[res, "per-object"]
            print(f"{res} px, persistent / per-object: fixed wall {p['wall'][0] / o['wall'][0]:.2f}, "
                  f"fixed CPU {p['cpu'][0] / o['cpu'][0]:.2f}, s / object {pw / ow:.2f}")


if __name__ == "__main__":
    main()
