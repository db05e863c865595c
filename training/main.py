"""Train Ouroboros3D (Algorithm 1) with DeepSpeed ZeRO-2 on streamed WebDataset shards.

    deepspeed training/main.py --config training/configs/tiny.yaml --data 'shards/shard-*.tar' \
        --output runs/tiny [--max-steps N] [--resume auto]
    DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 training/main.py ...   # two CPU ranks
    python training/main.py ...                                                # one process

Writes ``<output>/checkpoints/step_XXXXXXX`` (+ ``latest``), ``<output>/export`` (inference
weights, ``Ouroboros3D.from_pretrained``), ``<output>/tb`` (TensorBoard) and
``<output>/losses.jsonl`` (one line per step, losses averaged over ranks) and
``<output>/lpips_trunk.json`` (the LPIPS trunk Eq. 2 trains against: ImageNet VGG16 from the
install step's cache; a random one only with the model config's ``allow_random_lpips: true``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python training/main.py` / the deepspeed launcher: repo on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import yaml  # noqa: E402

from common.atomic import atomic_write_text  # noqa: E402
from training import checkpoint  # noqa: E402
from training.config import TrainConfig, load_config  # noqa: E402
from training.engine import build_engine, deepspeed_config, init_distributed, train_step  # noqa: E402
from training.loader import LoaderConfig, StreamingLoader  # noqa: E402
from training.logging_utils import TrainLogger  # noqa: E402
from training.shard_store import ReadPolicy, expand_shards  # noqa: E402

log = logging.getLogger("training")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True,
                   help="training YAML file, or a shipped config by name: tiny, full, tiny_joint, ... (training/configs)")
    p.add_argument("--data", required=True,
                   help="shard pattern: dir, glob, {a..b} braces, s3:// prefix / glob / object, pipe:, "
                        "http(s) URLs; '::' joins (S3: the standard AWS configuration)")
    p.add_argument("--output", required=True, help="run folder")
    p.add_argument("--max-steps", type=int, default=None, help="override the config's max_steps")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="assignments",
                   help="override a config entry, e.g. model.overrides.svd_path=runs/ae/svd (repeatable)")
    p.add_argument("--resume", default="none", help="'auto' (latest checkpoint if any), 'none', or a tag")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def build_model(cfg: TrainConfig):
    """Ouroboros3D from a preset (+ overrides) or a pretrained export; same init on every rank."""
    from model.config import preset
    from model.ouroboros import Ouroboros3D

    torch.manual_seed(cfg.seed)
    if cfg.model.pretrained:  # overrides switch parts on or off (new parts are built fresh)
        return Ouroboros3D.from_pretrained(cfg.model.pretrained, **cfg.model.overrides)
    return Ouroboros3D.from_config(preset(cfg.model.preset, **cfg.model.overrides))


def list_shards_on_rank0(pattern: str, reads: ReadPolicy) -> list[str]:
    """The shard URLs of ``--data``, listed once by rank 0 and sent to every rank, so that all
    ranks split the same list even while a render job adds shards to the store. A listing error
    stops every rank with rank 0's message (none waits for a list that never comes)."""
    box: list = [None]
    if torch.distributed.get_rank() == 0:
        try:
            box = [expand_shards(pattern, reads)]
        except OSError as err:  # FileNotFoundError included
            box = [f"--data {pattern}: {err}"]
    torch.distributed.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise SystemExit(box[0])
    return box[0]


def _mean_over_ranks(values: dict) -> dict:
    names = sorted(values)
    t = torch.tensor([float(values[n]) for n in names], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    t /= torch.distributed.get_world_size()
    return dict(zip(names, t.tolist()))


def lpips_trunk(model_config) -> dict | None:
    """The LPIPS trunk of Eq. 2 (None when the run has no LPIPS term); refuses a random trunk
    unless ``model_config.allow_random_lpips``."""
    from model.lgm.loss import lpips_network
    from common.perceptual.builder import RandomLPIPSRefused

    if not (model_config.joint_training and model_config.lpips_weight > 0):
        return None
    try:
        return lpips_network("cpu", model_config.allow_random_lpips).trunk.to_dict()
    except RandomLPIPSRefused as err:
        raise SystemExit(f"training refuses to start: {err}") from err


def _write_run_files(output: Path, cfg: TrainConfig, ds_config: dict, trunk: dict | None) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "train_config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict()))))
    (output / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))
    atomic_write_text(output / "lpips_trunk.json", json.dumps({"lpips_trunk": trunk}, indent=2))


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.assignments)
    if args.max_steps is not None:
        cfg.max_steps = args.max_steps
        cfg.validate()
    deepspeed = init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    output = Path(args.output)
    ckpt_dir = output / "checkpoints"

    tag = None
    if args.resume == "auto":
        tag = checkpoint.latest_tag(ckpt_dir)
    elif args.resume != "none":
        tag = args.resume
    elif checkpoint.latest_tag(ckpt_dir) is not None:
        raise SystemExit(f"{ckpt_dir} already holds checkpoints: pass --resume auto or another --output")

    model = build_model(cfg)
    trunk = lpips_trunk(model.config)
    log.info("LPIPS trunk of Eq. 2: %s", trunk or "none (no LPIPS term)")
    engine = build_engine(model, cfg, deepspeed)
    loader = StreamingLoader(
        list_shards_on_rank0(args.data, cfg.data.reads),
        LoaderConfig(
            resolution=model.config.resolution,
            batch_size=cfg.optim.micro_batch,
            num_views=model.config.num_views,
            background=(float(model.config.background),) * 3,
            shuffle_buffer=cfg.data.shuffle_buffer,
            shuffle_initial=cfg.data.shuffle_initial,
            num_workers=cfg.data.num_workers,
            seed=cfg.seed,
            reads=cfg.data.reads,
        ),
    )
    start = 0
    if tag is not None:
        state = checkpoint.resume(engine, ckpt_dir, tag)
        loader.load_state_dict(state["loader"])
        start = int(state["step"])
        log.info("resumed from %s at step %d", ckpt_dir / tag, start)
    if rank == 0:
        _write_run_files(output, cfg, deepspeed_config(cfg, world), trunk)
    logger = TrainLogger(output, rank, start, cfg.max_steps)
    log.info("%d rank(s), %d shard(s), total batch %d = %d x %d ranks x %d accumulation",
             world, len(loader.urls), cfg.optim.total_batch, cfg.optim.micro_batch, world,
             engine.gradient_accumulation_steps())

    batches = iter(loader)
    step = start
    groups = engine.module.model.trainable_parameter_groups(cfg.objective)
    per_model = cfg.optim.grad_clip_mode == "per_model"
    while step < cfg.max_steps:
        want_images = (step + 1) % cfg.images_every == 0
        measure = per_model or (step + 1) % cfg.log_every == 0  # per-model norms cost a gather
        result = train_step(engine, batches, cfg.seed, want_visuals=want_images,
                            groups=groups if measure else None, clip_mode=cfg.optim.grad_clip_mode,
                            max_norm=cfg.optim.grad_clip)  # fmt: skip
        step = engine.global_steps
        losses = _mean_over_ranks(result.losses)
        grad_norm = engine.get_global_grad_norm()
        if per_model:  # DeepSpeed clipped nothing and measured no norm: ours, before clipping
            grad_norm = sum(v**2 for v in result.grad_norms.values()) ** 0.5
        record = dict(losses, lr=engine.get_lr()[0],
                      grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                      **{f"grad_norm_{k}": v for k, v in result.grad_norms.items()})
        logger.step(step, record)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            shared = _mean_over_ranks(dict(
                samples_per_s=cfg.optim.total_batch / world / result.step_s,
                data_wait_s=result.data_wait_s,
                self_cond_fraction=result.self_cond_fraction,
                skipped_samples=loader.skipped["samples"] * world,
                skipped_shards=loader.skipped["shards"] * world,
            ))
            shared["samples_per_s"] *= world
            loss_scale = getattr(engine.optimizer, "loss_scale", None)
            logger.scalars(step, {
                **{f"loss/{k}": v for k, v in losses.items()},
                "optim/lr": record["lr"],
                "optim/grad_norm": record["grad_norm"],
                **{f"optim/grad_norm_{k}": v for k, v in result.grad_norms.items()},
                **({"optim/loss_scale": float(loss_scale)} if loss_scale is not None else {}),
                "data/samples_per_s": shared["samples_per_s"],
                "data/wait_s": shared["data_wait_s"],
                "data/skipped_samples": shared["skipped_samples"],
                "data/skipped_shards": shared["skipped_shards"],
                "train/self_cond_fraction": shared["self_cond_fraction"],
            })
        if want_images and result.visuals:
            logger.images(step, result.visuals)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            checkpoint.save(engine, ckpt_dir, step, dict(loader=loader.state_dict()), cfg.keep_last)
            if rank == 0:
                checkpoint.export(engine.module.model, output / "export")
    skipped = loader.skipped
    log.info("done at step %d; skipped %d corrupt sample(s) and %d broken shard(s) on rank %d",
             step, skipped["samples"], skipped["shards"], rank)
    logger.close()
    torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
