"""Table 2 from separately trained checkpoints: one GSO benchmark run per ablation row.

Each row of the paper's Table 2 is its own training run (joint training on or off, feedback
none / CCM / CCM + RGB). Each run's checkpoint is scored by ``eval/gso_benchmark.py`` with its
own setting (variant ``ouroboros``: the checkpoint as trained); this collects those benchmark
folders into one table per objects set (e.g. seen / held-out), with the 3DGS metrics and the
Δ columns (|multi-view − 3DGS|), and one comparison picture per object.

    python -m eval.ablation --row <bench dir> [--row <bench dir> ...] --output <dir>

Runs named ``<row>_s<seed>`` are one row trained with several seeds: the table gives each run,
and each row's mean and min – max over its seeds. Writes ``table2.md``, ``table2.json`` and
``strips/<split>/<object>.png`` (rows: ground truth, then for each run its generated views and
its 3DGS renders).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from common.atomic import atomic_write_text
from common.images import save_png
from eval import report

VARIANT = "ouroboros"
COLUMNS = [("split", "Objects set"), ("run", "Run"), ("jointly_training", "Jointly training"),
           ("feedbacks", "Feedbacks"), ("objects", "Objects"), ("mv_psnr", "MV PSNR ↑"),
           ("psnr", "3DGS PSNR ↑"), ("ssim", "3DGS SSIM ↑"), ("lpips", "3DGS LPIPS ↓"),
           ("delta_psnr", "ΔPSNR ↓"), ("delta_ssim", "ΔSSIM ↓"), ("delta_lpips", "ΔLPIPS ↓")]  # fmt: skip


def load_rows(bench_dir: Path) -> list[dict]:
    """The benchmark's per-object rows of the checkpoint as trained (variant ``ouroboros``)."""
    path = bench_dir / "per_object.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a finished GSO benchmark folder")
    rows = [r for r in pq.read_table(path).to_pylist() if r["variant"] == VARIANT]
    if not rows:
        raise ValueError(f"{path}: no '{VARIANT}' rows (run the benchmark with that variant)")
    return rows


def ablation_table(runs: dict[str, list[dict]]) -> list[dict]:
    """One Table 2 row per (objects set, run): 3DGS metrics, MV PSNR and the Δ columns."""
    out = []
    splits = list(dict.fromkeys(r["split"] for rows in runs.values() for r in rows))
    for split in splits:
        for name, rows in runs.items():
            for agg in report.aggregate([r for r in rows if r["split"] == split]):
                row = report.table2([agg])[0]
                row.update(run=name, mv_psnr=agg["mv_psnr"])
                out.append(row)
    return out


SEED_COLUMNS = [("split", "Objects set"), ("row", "Row"), ("seeds", "Seeds"), ("mv_psnr", "MV PSNR ↑"),
                ("psnr", "3DGS PSNR ↑"), ("psnr_range", "3DGS PSNR min – max"), ("ssim", "3DGS SSIM ↑"),
                ("lpips", "3DGS LPIPS ↓")]  # fmt: skip


def row_name(run: str) -> str:
    """The Table 2 row of a run: its name without a ``_s<seed>`` suffix (``joint_s1`` -> ``joint``)."""
    stem, _, seed = run.rpartition("_s")
    return stem if stem and seed.isdigit() else run


def over_seeds(table: list[dict]) -> list[dict]:
    """Each (objects set, row) over its runs (seeds): the means, and the 3DGS PSNR's min and max,
    the seed-to-seed spread that a difference between rows must exceed to mean something."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in table:
        groups.setdefault((r["split"], row_name(r["run"])), []).append(r)
    out = []
    for (split, row), runs in groups.items():
        psnrs = [r["psnr"] for r in runs]
        out.append(dict(split=split, row=row, seeds=len(runs), mv_psnr=float(np.mean([r["mv_psnr"] for r in runs])),
                        psnr=float(np.mean(psnrs)), psnr_range=f"{min(psnrs):.2f} – {max(psnrs):.2f}",
                        ssim=float(np.mean([r["ssim"] for r in runs])),
                        lpips=float(np.mean([r["lpips"] for r in runs]))))  # fmt: skip
    return out


def strip_rows(path: Path) -> list[np.ndarray]:
    """A benchmark strip split back into its rows of 8 views ([H, W, 3] uint8 each)."""
    image = np.asarray(Image.open(path).convert("RGB"))
    side = (image.shape[1] - 7) // 8
    return [image[i * (side + 1): i * (side + 1) + side] for i in range((image.shape[0] + 1) // (side + 1))]


def comparison_strip(paths: list[Path]) -> np.ndarray:
    """Ground truth, then each run's generated views and 3DGS renders, 1 px white gaps."""
    rows = [strip_rows(paths[0])[0]]
    for path in paths:
        rows += strip_rows(path)[1:3]
    gap = np.full((1, rows[0].shape[1], 3), 255, np.uint8)
    return np.concatenate([x for row in rows for x in (row, gap)][:-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.ablation", description=__doc__.splitlines()[0])
    p.add_argument("--row", action="append", required=True, type=Path, metavar="BENCH_DIR",
                   help="a benchmark output folder, one per Table 2 row, in the table's order")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--title", default="Table 2 (feedback ablation)")
    args = p.parse_args(argv)
    runs = {path.name: load_rows(path) for path in args.row}
    table = ablation_table(runs)
    seeds = over_seeds(table)
    meta = json.loads((args.row[0] / "tables.json").read_text())["meta"]
    pictures = []
    first = runs[args.row[0].name]
    for split, obj in dict.fromkeys((r["split"], r["object"]) for r in first):
        rel = obj if split == "test" else f"{split}/{obj}"
        paths = [path / "strips" / f"{rel}.png" for path in args.row]
        if all(path.is_file() for path in paths):
            save_png(args.output / "strips" / f"{rel}.png", comparison_strip(paths))
            pictures.append((rel, f"strips/{rel}.png"))
    order = ", ".join(f"`{path.name}` (generated views, 3DGS renders)" for path in args.row)
    lpips = f"LPIPS trunk: {meta['lpips_trunk']}"
    text = "\n\n".join([
        f"# {args.title}",
        f"{meta['steps']} sampling steps, {meta['views']} views per object, {meta['resolution']} px; "
        f"{lpips}. Each run is scored as trained (variant `{VARIANT}`); Δ = |multi-view − 3DGS|.",
        report.markdown_table(table, COLUMNS),
        "## Each row over its seeds\n\nRuns named `<row>_s<seed>` are one row trained with another seed; "
        "a difference between rows means something where it exceeds the rows' min – max spread.",
        report.markdown_table(seeds, SEED_COLUMNS),
        f"## Per object\n\nRows, top to bottom: ground truth, then {order}.",
        *[f"### {rel}\n\n![{rel}]({pic})" for rel, pic in pictures],
    ]) + "\n"  # fmt: skip
    atomic_write_text(args.output / "table2.md", text)
    atomic_write_text(args.output / "table2.json", json.dumps(dict(meta=meta, rows=table, over_seeds=seeds), indent=2))
    print(report.markdown_table(table, COLUMNS) + "\n\n" + report.markdown_table(seeds, SEED_COLUMNS))
    print(f"report: {args.output / 'table2.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
