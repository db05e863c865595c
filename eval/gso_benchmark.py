"""GSO benchmark (Sec. 4.1-4.3): image-to-multiview and image-to-3D against ground-truth renders.

For each object of the selection:

1. Ground truth: orbit 0 of the object rendered with the project's renderer
   (``data_pipeline.render.render_object``, cameras drawn from the object name like every
   training orbit), only the 8 frames the model sees: ``training_frame_indices(0)`` =
   0, 2, ..., 14. Frame 0 is the condition image ("pick the first frame as the conditioning
   image", Sec. 4.1). The frames go through the training loader's own conversion
   (``common.training_views.to_training_views``: composited over the model's background, resized to
   the model resolution, cameras in the model frame of frame 0).
2. Sampling (Algorithm 2) twice with the same seed: ``ouroboros`` = the checkpoint with its
   3D-aware feedback; ``two_stage`` = the same checkpoint with the feedback switched off
   (multi-view generation, then one reconstruction of the final views: the two-stage baseline
   and the no-feedback row of Table 2).
3. Metrics (PSNR, SSIM, LPIPS, ``common/image_metrics.py``) on all 8 views: (a) generated views vs
   ground truth, (b) renders of the reconstructed Gaussians at the same cameras vs ground truth;
   and geometry (Chamfer, F-score, ``eval/geometry.py``): the mesh of the final Gaussians vs
   the ground-truth mesh in the normalised object frame.

Outputs in ``--output``: ``per_object.parquet`` / ``.csv``, ``tables.md`` / ``tables.json``
(Table 1 and Table 2 layouts), ``report.md`` with ``strips/<object>.png``, and
``objects/<object>.json`` per finished object (a rerun skips those: the run is resumable).

    python eval/gso_benchmark.py --gso-root <dir> --checkpoint <export dir> --output <dir>
        [--limit N --steps 25 --resolution PX --selection FILE|all]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from tqdm import tqdm

from common.atomic import atomic_write_text
from common.conventions import condition_frame_transform, training_frame_indices
from common.image_metrics import LPIPSMetric, image_metrics
from common.images import save_png
from eval import geometry, gso, report
from inference.image_to_3d import resolve_device
from model.shipped import resolve_checkpoint

VARIANT_FEEDBACK_OFF = "two_stage"
VARIANT_FEEDBACK_ON = "ouroboros"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python eval/gso_benchmark.py",
        description="GSO benchmark of an Ouroboros3D checkpoint (paper Tables 1 and 2).",
    )
    p.add_argument("--gso-root", required=True, action="append", type=split_root, metavar="[SPLIT=]DIR",
                   help="folder of GSO objects (<name>/meshes/model.obj); repeat with a SPLIT label "
                        "(e.g. seen=DIR --gso-root held-out=DIR2) to score sets in separate rows")
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="Ouroboros3D export folder (Ouroboros3D.save_pretrained), or a shipped one's name (tiny)")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--selection", default=None,
                   help="selection file (default eval/gso_selection.txt) or 'all'")
    p.add_argument("--limit", type=int, default=None, help="first N objects found")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: the checkpoint config's edm.num_steps, the paper's 25)")
    p.add_argument("--feedback-every", type=int, default=1,
                   help="feedback every k steps for the ouroboros variant")
    p.add_argument("--resolution", type=int, default=None,
                   help="ground-truth render resolution (default: the model's; resized to it)")
    p.add_argument("--render-samples", type=int, default=32, help="Cycles samples per pixel")
    p.add_argument("--render-device", default="auto", help="auto | cpu | cuda | optix")
    p.add_argument("--obj-up-axis", default="z", choices=("z", "y"),
                   help="up axis of the OBJ meshes (GSO's are +Z up, as Gazebo loads them)")
    p.add_argument("--device", default="auto", help="model device: auto | cpu | cuda")
    p.add_argument("--lpips-net", default="vgg", choices=("vgg", "alex"))
    p.add_argument("--variants", nargs="+", default=[VARIANT_FEEDBACK_ON, VARIANT_FEEDBACK_OFF],
                   choices=(VARIANT_FEEDBACK_ON, VARIANT_FEEDBACK_OFF),
                   help="what to sample: the checkpoint as trained (ouroboros) and/or with its "
                        "feedback off (two_stage); one is enough for a checkpoint without feedback")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="recompute finished objects")
    return p.parse_args(argv)


DEFAULT_SPLIT = "test"


def split_root(text: str) -> tuple[str, Path]:
    """``SPLIT=DIR`` or ``DIR`` (split ``test``) -> (split, folder)."""
    split, sep, folder = text.partition("=")
    if not sep:
        return DEFAULT_SPLIT, Path(text)
    if not split or "/" in split:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SPLIT=DIR with a plain SPLIT name")
    return split, Path(folder)


def result_name(split: str, name: str) -> str:
    """Where an object's results go under ``objects/`` and ``strips/``: ``name`` for the default
    split, ``split/name`` for labelled ones (the same name may be in two splits)."""
    return name if split == DEFAULT_SPLIT else f"{split}/{name}"


# ----------------------------------------------------------------------------- ground truth
def render_ground_truth(obj: gso.GSOObject, resolution: int, samples: int, device: str,
                        obj_up_axis: str = "z"):  # fmt: skip
    """Orbit 0 of a GSO object, only the model's 8 frames (0, 2, ..., 14).

    GSO meshes are +Z up (Gazebo and MuJoCo load them unrotated, standing), hence the default
    ``obj_up_axis``; the renderer's own default is Blender's +Y-up OBJ convention.

    Returns:
        ``data_pipeline.render.OrbitRender`` with F = 8 frames, frame 0 = condition.
    """
    from data_pipeline.render import RenderSettings, render_object

    settings = RenderSettings(
        resolution=resolution, samples=samples, num_orbits=1, device=device,
        obj_up_axis=obj_up_axis, frames=tuple(int(i) for i in training_frame_indices(0)),
    )  # fmt: skip
    return render_object(obj.mesh_path, obj.name, settings, source="gso")[0]


def ground_truth_views(orbit, resolution: int, background: float) -> dict:
    """Rendered frames (an ``OrbitRender``) -> the model's view set, exactly as the training
    loader builds it.

    Returns:
        dict(images [8,3,R,R] in [0,1], alphas, ccm, c2w [8,4,4] model frame, K [8,3,3]).
    """
    from common.training_views import to_training_views

    return to_training_views(orbit, resolution, [background] * 3)


# ----------------------------------------------------------------------------- sampling
def generate(model, gt: dict, steps: int | None, feedback_every: int, seed: int, device,
             use_feedback: bool = True) -> dict:
    """Algorithm 2 on one object (``use_feedback=False``: the two-stage baseline on the same
    weights, zero feedback at every step, one reconstruction of the final views); the model
    renders its Gaussians at the 8 cameras.

    Returns:
        dict(views [8,3,R,R] in [0,1], renders [8,3,R,R] in [0,1], seconds)
    """
    cond = gt["images"][:1].to(device)
    c2w, K = gt["c2w"][None].to(device), gt["K"][None].to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.sample(cond, c2w, K, num_steps=steps, feedback_every=feedback_every,
                           generator=generator, progress=False, use_feedback=use_feedback)  # fmt: skip
    seconds = time.perf_counter() - start
    return dict(views=out.views[0].float().cpu(),
                renders=out.renders["rgb"][0].clamp(0, 1).float().cpu(), seconds=seconds,
                gaussians=out.gaussians[0].float().cpu())  # fmt: skip


def object_seed(seed: int, name: str) -> int:
    """Per-object seed, the same for both variants (they differ only by the feedback)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


# ----------------------------------------------------------------------------- one object
def evaluate_object(model, obj: gso.GSOObject, split: str, args, lpips_metric, device) -> tuple[list, np.ndarray]:
    """Render the ground truth, sample both variants, compute metrics.

    Returns:
        (one per-object row per variant, strip image [(1 + 2 x variants) R + gaps, 8 R + 7, 3] uint8)
    """
    cfg = model.config
    orbit = render_ground_truth(obj, args.resolution or cfg.resolution, args.render_samples,
                                args.render_device, args.obj_up_axis)  # fmt: skip
    gt = ground_truth_views(orbit, cfg.resolution, float(cfg.background))
    target = gt["images"]
    gt_mesh = geometry.ground_truth_mesh(obj.mesh_path, orbit.meta["normalization"]["source_to_world"],
                                         condition_frame_transform(orbit.c2w[0]))  # fmt: skip
    seed = object_seed(args.seed, obj.name)
    variants = [(VARIANT_FEEDBACK_ON, cfg.feedback, True), (VARIANT_FEEDBACK_OFF, "none", False)]
    variants = [v for v in variants if v[0] in args.variants]
    rows, strip_rows = [], [target]
    for variant, mode, use_feedback in variants:
        out = generate(model, gt, args.steps, args.feedback_every, seed, device, use_feedback)
        mv = image_metrics(out["views"], target, lpips_metric)
        gs = image_metrics(out["renders"], target, lpips_metric)
        row = dict(object=obj.name, split=split, variant=variant, feedback=mode,
                   joint_training=bool(cfg.joint_training), views=int(target.shape[0]),
                   seconds=round(out["seconds"], 3))  # fmt: skip
        row.update({f"mv_{k}": float(v.mean()) for k, v in mv.items()})
        row.update({f"gs_{k}": float(v.mean()) for k, v in gs.items()})
        row.update(geometry.gaussians_vs_mesh(out["gaussians"], gt_mesh))
        rows.append(row)
        strip_rows += [out["views"], out["renders"]]
    return rows, report.image_strip(strip_rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    objects, missing = [], []
    for split, root in args.gso_root:
        found = gso.discover(root, args.selection, args.limit)
        print(f"{split}: {found.summary()}", file=sys.stderr)
        objects += [(split, obj) for obj in found.objects]
        missing += found.missing
    if not objects:
        roots = ", ".join(str(root) for _, root in args.gso_root)
        print(f"error: no selected object found under {roots}", file=sys.stderr)
        return 2
    try:
        args.checkpoint = resolve_checkpoint(args.checkpoint)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.checkpoint.is_dir():
        print(f"error: checkpoint {args.checkpoint} is not a folder", file=sys.stderr)
        return 2
    from data_pipeline.render import RenderError
    from model.ouroboros import Ouroboros3D

    device = resolve_device(args.device)
    model = Ouroboros3D.from_pretrained(args.checkpoint).to(device).eval()
    args.steps = args.steps or model.config.edm.num_steps
    lpips_metric = LPIPSMetric(args.lpips_net, device=device)
    out_dir = args.output
    (out_dir / "objects").mkdir(parents=True, exist_ok=True)

    rows, strips, failed = [], {}, {}
    for split, obj in tqdm(objects, desc="GSO objects", unit="obj"):
        name = result_name(split, obj.name)
        done = out_dir / "objects" / f"{name}.json"
        strip_rel = f"strips/{name}.png"
        if done.is_file() and not args.overwrite:
            rows += json.loads(done.read_text())
            strips[name] = strip_rel
            continue
        try:
            obj_rows, strip = evaluate_object(model, obj, split, args, lpips_metric, device)
        except RenderError as err:
            failed[name] = f"render failed ({err.reason}): {err}"
            tqdm.write(f"{name}: {failed[name]}", file=sys.stderr)
            continue
        save_png(out_dir / strip_rel, strip)
        atomic_write_text(done, json.dumps(obj_rows, indent=2))
        rows += obj_rows
        strips[name] = strip_rel

    if not rows:
        print("error: no object could be evaluated", file=sys.stderr)
        return 1
    meta = dict(checkpoint=str(args.checkpoint), objects=len({(r["split"], r["object"]) for r in rows}),
                steps=args.steps, views=rows[0]["views"], resolution=model.config.resolution,
                lpips_net=lpips_metric.net, lpips_comparable=lpips_metric.comparable,
                lpips_trunk=lpips_metric.trunk.describe(),
                seed=args.seed, missing=missing, failed=failed)  # fmt: skip
    report.write_rows(out_dir, rows)
    tables = report.write_tables(out_dir, rows, meta)
    path = report.write_report(out_dir, rows, tables, strips)
    print((out_dir / "tables.md").read_text())
    print(f"report: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
