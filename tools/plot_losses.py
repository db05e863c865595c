"""Training curves of runs of the trainer, from their ``losses.jsonl``, as one PNG.

    python tools/plot_losses.py --run autoencoder=<run dir> --run lgm=<run dir> --output curves.png \
        [--key loss] [--smooth 100] [--log]

One panel a run: the ``--key`` column of each optimizer step (light) and its running mean over
``--smooth`` steps (dark); a run's panel also shows any extra columns given with
``--key name:column`` for that run (e.g. ``--key lgm:loss_recon_mse``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.atomic import atomic_path  # noqa: E402


def read_losses(run: Path) -> list[dict]:
    path = run / "losses.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: no losses.jsonl (not a run of training/main.py)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at each step (fewer at the start)."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    return (sums[idx] - sums[np.maximum(idx - window, 0)]) / np.minimum(idx, window)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", required=True, metavar="NAME=DIR")
    p.add_argument("--key", action="append", default=[], metavar="[NAME:]COLUMN",
                   help="column to plot (default loss); NAME:COLUMN for one run only")
    p.add_argument("--smooth", type=int, default=100)
    p.add_argument("--log", action="store_true", help="logarithmic y axis")
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args(argv)
    runs = [item.split("=", 1) for item in args.run]
    keys = args.key or ["loss"]
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.2), squeeze=False)
    for ax, (name, folder) in zip(axes[0], runs):
        rows = read_losses(Path(folder))
        columns = [k for k in keys if ":" not in k] + [k.split(":", 1)[1] for k in keys if k.startswith(f"{name}:")]
        for column in columns:
            steps = np.array([r["step"] for r in rows if column in r])
            values = np.array([r[column] for r in rows if column in r], dtype=float)
            if len(values) == 0:
                raise SystemExit(f"{folder}/losses.jsonl: no column {column!r}")
            line = ax.plot(steps, values, alpha=0.2, lw=0.6)[0]
            ax.plot(steps, running_mean(values, args.smooth), color=line.get_color(), lw=1.5,
                    label=f"{column} (mean of {args.smooth})")
        ax.set_title(f"{name}: {len(rows)} steps")
        ax.set_xlabel("optimizer step")
        if args.log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(args.output) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    print(f"curves: {args.output}")


if __name__ == "__main__":
    main()
