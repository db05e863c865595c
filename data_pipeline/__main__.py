"""Command line of the data pipeline.

    python -m data_pipeline render --input <dir> --output <dir> --resolution 128
    python -m data_pipeline render --source demo --count 12 --output <dir> --resolution 128
    python -m data_pipeline render --source objaverse --limit 1000 --output <dir>   # LGM's 80K list
    python -m data_pipeline render --source objaverse --output s3://bucket/shards --ray-address auto --gpus-per-task 0.5
    python -m data_pipeline filter --output <dir> [--objaverse-list lgm]   # the rules, against LGM's list
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

from common.atomic import atomic_path
from data_pipeline import objaverse_filter
from data_pipeline.storage import StorageError, Store, is_remote


NO_LIST = "none"


def _keep_list(value: str) -> Path | str:
    """``--objaverse-list``: a CSV file, ``lgm`` (the shipped list) or ``none``."""
    if value == "lgm":
        return objaverse_filter.LGM_LIST
    if value == NO_LIST:
        return NO_LIST
    if not Path(value).is_file():
        raise argparse.ArgumentTypeError(f"{value}: no such keep list (a CSV file, 'lgm' or 'none')")
    return Path(value)


def _add_filter_args(parser: argparse.ArgumentParser, default_list: str) -> None:
    group = parser.add_argument_group("objaverse selection and filter")
    group.add_argument("--objaverse-list", type=_keep_list,
                       help="keep list, CSV rows glb-group,uid; 'lgm': LGM's 82,575 objects (shipped, "
                            f"data_pipeline/objaverse_lists); 'none': no list (default: {default_list})")
    group.add_argument("--uids", nargs="+", help="only these Objaverse uids (render: no default list then)")
    group.add_argument("--lvis", nargs="+", metavar="CATEGORY", help="only these LVIS categories")
    group.add_argument("--captions", type=Path, help="CSV uid,caption checked for bad words")
    group.add_argument("--limit", type=int, help="at most this many objects after filtering")
    group.add_argument("--min-faces", type=int, default=objaverse_filter.FilterRules.min_faces)
    group.add_argument("--max-faces", type=int, default=objaverse_filter.FilterRules.max_faces)
    group.add_argument("--max-mb", type=float, default=objaverse_filter.FilterRules.max_bytes / 2**20)
    group.add_argument("--allow-untextured", action="store_true", help="keep objects without textures")
    group.add_argument("--apply-rules", action="store_true",
                       help="render: apply the annotation rules on top of the keep list (without a "
                            "list, or with --uids, the rules always apply)")


def _rules(args) -> objaverse_filter.FilterRules:
    return objaverse_filter.FilterRules(
        require_texture=not args.allow_untextured, min_faces=args.min_faces,
        max_faces=args.max_faces, max_bytes=int(args.max_mb * 2**20),
    )


def _objaverse(args, apply_rules: bool):
    from data_pipeline.sources import objaverse_objects

    return objaverse_objects(uids=args.uids, lvis_categories=args.lvis, keep_list=args.objaverse_list,
                             rules=_rules(args), captions=args.captions, limit=args.limit,
                             apply_rules=apply_rules)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    render = commands.add_parser("render", help="render objects into WebDataset shards")
    render.add_argument("--source", choices=("local", "demo", "objaverse"), default="local")
    render.add_argument("--input", type=Path, help="folder of meshes (implies --source local)")
    render.add_argument("--count", type=int, default=12, help="demo objects to make")
    render.add_argument("--seed", type=int, default=0, help="demo object seed")
    render.add_argument("--output", required=True,
                        help="a local folder or an object store URL (s3://bucket/prefix, gs://..., file://...)")
    render.add_argument("--resolution", type=int, default=512)
    render.add_argument("--samples", type=int, default=32, help="Cycles samples per pixel")
    render.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "optix"))
    render.add_argument("--no-denoise", action="store_true",
                        help="skip the denoiser (a large fixed cost per frame on CPU; previews)")
    render.add_argument("--timeout", type=float, default=900.0, help="seconds per object")
    render.add_argument("--memory-gb", type=float, default=8.0, help="data-memory cap (RLIMIT_DATA) of each Blender process")
    render.add_argument("--workers", type=int, help="local Ray CPUs (default: all)")
    render.add_argument("--ray-address", help="'auto' to join the Ray cluster (ray submit)")
    render.add_argument("--gpus-per-task", type=float, default=0.0)
    render.add_argument("--max-in-flight", type=int,
                        help="tasks submitted at once (default: 2 x CPUs/GPUs locally, 1024 on a cluster)")
    render.add_argument("--worker-mode", choices=("persistent", "per-object"), default="persistent",
                        help="persistent: Ray actors that keep one Blender process alive across "
                             "objects (default); per-object: a Ray task and a Blender process per object")
    render.add_argument("--actors", type=int,
                        help="persistent actors (default: one per local CPU, or GPU share of "
                             "--gpus-per-task; 64 on a cluster)")
    render.add_argument("--objects-per-worker", type=int, default=100,
                        help="a persistent Blender process is replaced after this many objects")
    render.add_argument("--worker-recycle-gb", type=float, default=4.0,
                        help="... or when its resident memory after an object exceeds this")
    render.add_argument("--per-shard", type=int, default=64, help="samples (orbits) per shard")
    render.add_argument("--max-retries", type=int, default=2, help="re-runs retry failed objects this often")
    render.add_argument("--no-contact-sheet", action="store_true")
    _add_filter_args(render, default_list="lgm")

    filt = commands.add_parser("filter", help="filter Objaverse by the annotation rules (and a keep list), "
                                              "write the kept objects and the summary")
    filt.add_argument("--output", type=Path, required=True)
    _add_filter_args(filt, default_list="none")

    args = parser.parse_args(argv)
    if args.command == "render":
        if args.input is not None:
            if args.source != "local":
                parser.error("--input goes with --source local")
            if not args.input.is_dir():
                parser.error(f"--input {args.input}: not a folder")
        elif args.source == "local":
            parser.error("--source local needs --input <folder of meshes>")
    if args.objaverse_list is None:  # not given: render takes LGM's list unless --uids choose
        args.objaverse_list = objaverse_filter.LGM_LIST if args.command == "render" and not args.uids else None
    elif args.objaverse_list == NO_LIST:
        args.objaverse_list = None
    return args


def demo_folder(output: str) -> Path:
    """Where the demo objects' meshes are written: beside the shards in a local output, in this
    machine's temporary folder for an object store (the workers read them from local disk)."""
    if is_remote(output):
        return Path(tempfile.gettempdir()) / "ouroboros3d-demo-objects"
    return Path(output.removeprefix("file://")) / "demo_objects"


def command_render(args) -> int:
    from data_pipeline.job import JobConfig, run_job
    from data_pipeline.render import RenderSettings
    from data_pipeline.sources import demo_objects, local_objects

    filtered = []
    if args.source == "local":
        records = local_objects(args.input)
    elif args.source == "demo":
        records = demo_objects(args.count, demo_folder(args.output), seed=args.seed)
    else:
        # the keep list decides; rules on top only when asked (or when there is no list)
        apply_rules = args.apply_rules or args.objaverse_list is None
        records, filtered, summary = _objaverse(args, apply_rules)
        print(summary)
        Store(args.output).write_bytes("filter_summary.json", summary.to_json().encode())
    if not records:
        print("no objects to render", file=sys.stderr)
        return 1
    settings = RenderSettings(resolution=args.resolution, samples=args.samples, device=args.device,
                              denoise=not args.no_denoise, timeout_s=args.timeout,
                              memory_limit_gb=args.memory_gb)
    config = JobConfig(output=args.output, settings=settings, workers=args.workers,
                       ray_address=args.ray_address, per_shard=args.per_shard,
                       max_retries=args.max_retries, gpus_per_task=args.gpus_per_task,
                       max_in_flight=args.max_in_flight, contact_sheet=not args.no_contact_sheet,
                       worker_mode=args.worker_mode, actors=args.actors,
                       objects_per_worker=args.objects_per_worker, recycle_rss_gb=args.worker_recycle_gb)
    summary = run_job(records, config, filtered)
    print(summary)
    print(f"shards and manifest: {args.output}")
    return 0  # failed objects are recorded in the manifest; a re-run retries them


def command_filter(args) -> int:
    records, _, summary = _objaverse(args, apply_rules=True)
    print(summary)
    Store(args.output).write_bytes("filter_summary.json", summary.to_json().encode())
    keep = args.output / "objaverse_keep.csv"
    with atomic_path(keep) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        for record in records:  # URL ends in glbs/<group>/<uid>.glb
            writer.writerow([record.path_or_url.rsplit("/", 2)[-2], record.uid])
    print(f"kept {len(records)} objects: {keep}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return command_render(args) if args.command == "render" else command_filter(args)
    except StorageError as error:  # the store stayed unreachable: what is committed stays
        print(f"error: {error}\nre-run the same command to resume", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
