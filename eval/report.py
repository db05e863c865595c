"""Benchmark outputs: per-object rows (Parquet + CSV), Table 1 / Table 2 aggregates (Markdown +
JSON), image strips and report.md.

A per-object row (one per object and variant) holds::

    object, split, variant, feedback, joint_training, views,
    mv_psnr, mv_ssim, mv_lpips      generated multi-view images vs ground truth
    gs_psnr, gs_ssim, gs_lpips      renders of the reconstructed 3D Gaussians vs ground truth
    seconds

Variants: ``ouroboros`` (the checkpoint with its 3D-aware feedback, Algorithm 2) and
``two_stage`` (the same checkpoint with feedback switched off: multi-view generation, then
reconstruction; the paper's "separated stages" baseline and the no-feedback ablation row).
Splits (``test`` by default; e.g. ``seen`` and ``held-out`` for the demo) are aggregated apart:
every table has one row per split and variant, so memorisation and generalisation never mix.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from common.atomic import atomic_write_bytes, atomic_write_text
from common.images import to_uint8
from eval import geometry

METRICS = ("psnr", "ssim", "lpips")
VARIANTS = ("ouroboros", "two_stage")
ROW_COLUMNS = (
    "object", "split", "variant", "feedback", "joint_training", "views",
    "mv_psnr", "mv_ssim", "mv_lpips", "gs_psnr", "gs_ssim", "gs_lpips", *geometry.COLUMNS, "seconds",
)  # fmt: skip

# The paper's Table 1 and Table 2 (GSO, its own 100 objects), for reference next to ours.
PAPER_TABLE1 = [
    ("Image-to-Multiview", "Ouroboros3D (SVD), paper", "512x512", 21.770, 0.8866, 0.1093),
    ("Image-to-3D", "Ouroboros3D (LGM), paper", "512x512", 21.761, 0.8894, 0.1091),
    ("Image-to-3D", "LGM, paper", "512x512", 17.716, 0.8319, 0.1894),
]
PAPER_TABLE2 = [
    ("no", "none", 20.012, 0.8465, 0.1287, 1.067, 0.0125, 0.0189),
    ("yes", "none", 20.549, 0.8651, 0.1221, 0.511, 0.0094, 0.0070),
    ("yes", "CCM", 21.325, 0.8738, 0.1192, 0.304, 0.0036, 0.0018),
    ("yes", "CCM + RGB", 21.761, 0.8894, 0.1091, 0.009, 0.0028, 0.0002),
]
METHOD_NAMES = {  # variant -> (multi-view method, 3D method)
    "ouroboros": ("Ouroboros3D (SVD)", "Ouroboros3D (LGM)"),
    "two_stage": ("Two-stage, no feedback (SVD)", "Two-stage, no feedback (SVD + LGM)"),
}
FEEDBACK_LABEL = {"none": "none", "ccm": "CCM", "ccm_rgb": "CCM + RGB"}


# ----------------------------------------------------------------------------- aggregates
def aggregate(rows: list[dict]) -> list[dict]:
    """Mean of each metric over objects, per split and variant.

    Returns:
        [{"split", "variant", "objects": n, "feedback", "joint_training", "mv_psnr": mean, ...,
        "gs_lpips": mean}], splits in order of appearance, variants in :data:`VARIANTS` order;
        PSNR means skip +inf (a pixel-perfect object) so that one perfect match cannot hide
        the others.
    """
    out = []
    splits = list(dict.fromkeys(r.get("split", "test") for r in rows))
    for split in splits:
        in_split = [r for r in rows if r.get("split", "test") == split]
        for variant in sorted({r["variant"] for r in in_split}, key=_variant_order):
            sel = [r for r in in_split if r["variant"] == variant]
            agg = {"split": split, "variant": variant, "objects": len(sel), "feedback": sel[0]["feedback"],
                   "joint_training": sel[0]["joint_training"]}  # fmt: skip
            for kind in ("mv", "gs"):
                for m in METRICS:
                    vals = [float(r[f"{kind}_{m}"]) for r in sel]
                    finite = [v for v in vals if math.isfinite(v)]
                    agg[f"{kind}_{m}"] = float(np.mean(finite)) if finite else float("nan")
            out.append(agg)
    return out


def _variant_order(variant: str) -> int:
    return VARIANTS.index(variant) if variant in VARIANTS else len(VARIANTS)


def table1(agg: list[dict], resolution: int) -> list[dict]:
    """Rows in the layout of the paper's Table 1: task, method, resolution, PSNR, SSIM, LPIPS.

    Multi-view rows compare the generated images with the ground truth; 3D rows compare
    renders of the reconstructed Gaussians at the same cameras.
    """
    rows = []
    for task, kind, idx in (("Image-to-Multiview", "mv", 0), ("Image-to-3D", "gs", 1)):
        for a in agg:
            rows.append({
                "split": a["split"], "task": task,
                "method": METHOD_NAMES.get(a["variant"], (a["variant"],) * 2)[idx],
                "resolution": f"{resolution}x{resolution}", "objects": a["objects"],
                "psnr": a[f"{kind}_psnr"], "ssim": a[f"{kind}_ssim"], "lpips": a[f"{kind}_lpips"],
            })  # fmt: skip
    return rows


def table2(agg: list[dict]) -> list[dict]:
    """Rows in the layout of the paper's Table 2 (ablation of the feedback).

    Metrics are those of the 3DGS renders; the deltas are the absolute differences between the
    multi-view and the 3DGS means (Sec. 4.3: "absolute distances of performance metrics
    between the generated multiviews and 3DGS").
    """
    rows = []
    for a in agg:
        row = {"split": a["split"], "jointly_training": "yes" if a["joint_training"] else "no",
               "feedbacks": FEEDBACK_LABEL.get(a["feedback"], a["feedback"]),
               "objects": a["objects"]}  # fmt: skip
        for m in METRICS:
            row[m] = a[f"gs_{m}"]
        for m in METRICS:
            row[f"delta_{m}"] = abs(a[f"mv_{m}"] - a[f"gs_{m}"])
        rows.append(row)
    return rows


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A Markdown table of ``rows`` with ``columns`` = [(key, header), ...]."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]  # fmt: skip
    lines += ["| " + " | ".join(_fmt(r[k]) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


T1_COLUMNS = [("split", "Objects set"), ("task", "Task"), ("method", "Method"), ("resolution", "Resolution"),
              ("objects", "Objects"), ("psnr", "PSNR ↑"), ("ssim", "SSIM ↑"),
              ("lpips", "LPIPS ↓")]  # fmt: skip
T2_COLUMNS = [("split", "Objects set"), ("jointly_training", "Jointly training"), ("feedbacks", "Feedbacks"),
              ("objects", "Objects"), ("psnr", "PSNR ↑"), ("ssim", "SSIM ↑"),
              ("lpips", "LPIPS ↓"), ("delta_psnr", "ΔPSNR ↓"), ("delta_ssim", "ΔSSIM ↓"),
              ("delta_lpips", "ΔLPIPS ↓")]  # fmt: skip


def geometry_markdown(geo: list[dict]) -> str:
    """The geometry table (eval/geometry.py): per objects set and variant, objects with a surface, CD, F-scores."""
    rows = [{"split": a["split"], "method": METHOD_NAMES.get(a["variant"], (a["variant"],) * 2)[1],
             "objects": f"{a['with_surface']}/{a['objects']}", **{k: a[k] for k in geometry.COLUMNS}}
            for a in geo]  # fmt: skip
    cols = [("split", "Objects set"), ("method", "Method"), ("objects", "Objects with a surface"),
            *((k, geometry.HEADERS[k]) for k in geometry.COLUMNS)]  # fmt: skip
    return "\n\n".join([
        "## Geometry: mesh of the final Gaussians vs the ground-truth mesh",
        "Normalised object frame (longest side 1); Chamfer = mean of both directions' mean "
        f"nearest distance over {geometry.SAMPLES} surface samples each; F-score at 2% and 5% "
        "of the object's size (docs/evaluation.md, \"Geometry metrics\").",
        markdown_table(rows, cols)])  # fmt: skip


def tables_markdown(t1: list[dict], t2: list[dict], meta: dict, geo: list[dict]) -> str:
    """Table 1, Table 2 and the geometry table as Markdown, with the run's settings and the
    paper's numbers."""
    paper1 = [dict(zip([k for k, _ in T1_COLUMNS], ("GSO (paper)", *r[:3], 100, *r[3:]))) for r in PAPER_TABLE1]
    paper2 = [dict(zip([k for k, _ in T2_COLUMNS], ("GSO (paper)", *r[:2], 100, *r[2:]))) for r in PAPER_TABLE2]
    lpips_note = f"LPIPS trunk: {meta['lpips_trunk']}"
    skipped = "".join(
        f" {len(meta[k])} selected objects {what}: {', '.join(meta[k])}."
        for k, what in (("missing", "missing from the GSO root"), ("failed", "failed to render"))
        if meta.get(k)
    )
    return "\n\n".join([
        "# GSO benchmark",
        f"Checkpoint `{meta['checkpoint']}`, {meta['objects']} objects, {meta['steps']} sampling "
        f"steps, {meta['views']} views per object, resolution {meta['resolution']} px. "
        f"{lpips_note}.{skipped}",
        "## Table 1: multi-view images and 3D (renders of the Gaussians) vs ground truth",
        markdown_table(t1, T1_COLUMNS),
        "## Table 2: feedback ablation (3DGS metrics; Δ = |multi-view − 3DGS|)",
        markdown_table(t2, T2_COLUMNS),
        geometry_markdown(geo),
        "## For reference: the paper's numbers (its own, unpublished, 100-object GSO selection)",
        markdown_table(paper1, T1_COLUMNS),
        markdown_table(paper2, T2_COLUMNS),
    ]) + "\n"  # fmt: skip


# ----------------------------------------------------------------------------- files
def write_rows(out_dir: str | Path, rows: list[dict]) -> tuple[Path, Path]:
    """Per-object rows as ``per_object.parquet`` and ``per_object.csv`` (atomic writes)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    table = pa.Table.from_pylist([{c: r[c] for c in ROW_COLUMNS} for r in rows])
    paths = out_dir / "per_object.parquet", out_dir / "per_object.csv"
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(paths[0], sink.getvalue().to_pybytes())
    sink = pa.BufferOutputStream()
    pacsv.write_csv(table, sink)
    atomic_write_bytes(paths[1], sink.getvalue().to_pybytes())
    return paths


def write_tables(out_dir: str | Path, rows: list[dict], meta: dict) -> dict:
    """Aggregate ``rows`` and write ``tables.md`` and ``tables.json``. Returns the JSON dict."""
    out_dir = Path(out_dir)
    agg = aggregate(rows)
    t1, t2 = table1(agg, meta["resolution"]), table2(agg)
    geo = geometry.aggregate(rows)
    result = {"meta": meta, "aggregates": agg, "table1": t1, "table2": t2, "geometry": geo}
    atomic_write_text(out_dir / "tables.json", json.dumps(result, indent=2, allow_nan=True))
    atomic_write_text(out_dir / "tables.md", tables_markdown(t1, t2, meta, geo))
    return result


def image_strip(rows: list) -> np.ndarray:
    """Stack rows of views into one picture: each row [V, 3, H, W] in [0, 1] side by side.

    Returns:
        [rows * H, V * W, 3] uint8 (1 px white separators).
    """
    lines = []
    for views in rows:
        v = to_uint8(views)  # [V, H, W, 3]
        sep = np.full((v.shape[1], 1, 3), 255, np.uint8)
        lines.append(np.concatenate([x for img in v for x in (img, sep)][:-1], axis=1))
    hsep = np.full((1, lines[0].shape[1], 3), 255, np.uint8)
    return np.concatenate([x for line in lines for x in (line, hsep)][:-1], axis=0)


def write_report(out_dir: str | Path, rows: list[dict], tables: dict, strips: dict[str, str]) -> Path:
    """report.md: the tables, then per object its strip and its numbers.

    Args:
        strips: {object name: strip path relative to ``out_dir``}; each strip's rows are GT,
            then generated views and 3DGS renders of each variant (the order in
            :data:`STRIP_ROWS`).
    """
    out_dir = Path(out_dir)
    meta = tables["meta"]
    parts = [tables_markdown(tables["table1"], tables["table2"], meta, tables["geometry"]).rstrip(),
             "## Per object",
             "Strip rows, top to bottom: " + ", ".join(STRIP_ROWS) + "."]  # fmt: skip
    cols = [("split", "Objects set"), ("variant", "Variant"), ("mv_psnr", "MV PSNR"), ("mv_ssim", "MV SSIM"),
            ("mv_lpips", "MV LPIPS"), ("gs_psnr", "3DGS PSNR"), ("gs_ssim", "3DGS SSIM"),
            ("gs_lpips", "3DGS LPIPS"), *((k, geometry.HEADERS[k]) for k in geometry.COLUMNS),
            ("seconds", "Seconds")]  # fmt: skip
    for split, obj in dict.fromkeys((r.get("split", "test"), r["object"]) for r in rows):
        name = obj if split == "test" else f"{split}/{obj}"
        parts.append(f"### {name}")
        if name in strips:
            parts.append(f"![{obj}]({strips[name]})")
        parts.append(markdown_table([r for r in rows if r["object"] == obj and r.get("split", "test") == split], cols))
    path = out_dir / "report.md"
    atomic_write_text(path, "\n\n".join(parts) + "\n")
    return path


STRIP_ROWS = (
    "ground truth",
    "Ouroboros3D generated views",
    "Ouroboros3D 3DGS renders",
    "two-stage generated views",
    "two-stage 3DGS renders",
)
