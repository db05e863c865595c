"""The trainer: DeepSpeed ZeRO-2 on streamed WebDataset shards, for every objective of the
config (``algorithm1``: the paper's Algorithm 1; ``reconstruction``: LGM alone on clean views;
``autoencoder``: the latent autoencoder of the tiny preset).

    deepspeed training/main.py --config tiny --data 'shards/shard-*.tar' --output runs/tiny \
        [--set key.path=value ...] [--max-steps N] [--resume auto]
    DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 training/main.py ...   # two CPU ranks
    python training/main.py ...                                                # one process

``--config`` is a YAML file or a shipped config's name (training/configs); ``--set`` changes any
key of it; ``--max-steps N`` is shorthand for ``--set max_steps=N``.

Writes ``<output>/checkpoints/step_XXXXXXX`` (+ ``latest``), ``<output>/export`` (inference
weights: ``Ouroboros3D.from_pretrained`` for the model's objectives, an SVD-layout folder for the
autoencoder's), ``<output>/tb`` (TensorBoard), ``<output>/losses.jsonl`` (one line per step,
losses averaged over ranks), ``<output>/train_config.yaml`` (the resolved config) and
``<output>/lpips_trunk.json`` (the LPIPS trunk the run trains against, if any: ImageNet VGG16
from the install step's cache; a random one only with the model config's
``allow_random_lpips: true``).
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
from training.autoencoder import export_autoencoder  # noqa: E402
from training.autoencoder_recipe import init_linear_path  # noqa: E402
from training.config import ModelSection, TrainConfig, load_config  # noqa: E402
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
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="assignments",
                   help="override a config entry, e.g. model.overrides.svd_path=runs/ae/export (repeatable)")
    p.add_argument("--max-steps", type=int, default=None, help="shorthand for --set max_steps=N")
    p.add_argument("--resume", default="none", help="'auto' (latest checkpoint if any), 'none', or a tag")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = p.parse_args(argv)
    if args.max_steps is not None:
        args.assignments.append(f"max_steps={args.max_steps}")
    return args


# ----------------------------------------------------------------------------- building the run
def model_config(section: ModelSection):
    """The model config of a preset run: ``preset`` with ``overrides``, at ``latent_channels``."""
    from model.config import preset, with_latent_channels

    cfg = preset(section.preset, **section.overrides)
    return cfg if section.latent_channels is None else with_latent_channels(cfg, section.latent_channels)


def build_model(cfg: TrainConfig):
    """(the module the objective trains, its model config); the same init on every rank.

    ``Ouroboros3D`` from a preset (+ overrides) or a pretrained export (overrides switch parts on
    or off; new parts are built fresh), or, for the ``autoencoder`` objective, the preset's
    ``AutoencoderKLTemporalDecoder`` (``autoencoder.init``)."""
    from model.ouroboros import Ouroboros3D

    torch.manual_seed(cfg.seed)
    if cfg.objective == "autoencoder":
        from diffusers import AutoencoderKLTemporalDecoder

        if cfg.model.pretrained:
            raise ValueError("objective autoencoder trains a preset's autoencoder: model.pretrained must be null")
        mcfg = model_config(cfg.model)
        vae = AutoencoderKLTemporalDecoder(**mcfg.vae)
        if cfg.autoencoder.init == "linear-path":
            init_linear_path(vae)
        return vae, mcfg
    if cfg.model.pretrained:
        model = Ouroboros3D.from_pretrained(cfg.model.pretrained, **cfg.model.overrides)
    else:
        model = Ouroboros3D.from_config(model_config(cfg.model))
    return model, model.config


def resume_tag(resume: str, ckpt_dir: Path) -> str | None:
    """``--resume``: ``auto`` -> the latest checkpoint (None without one), ``none`` -> None
    (refused when the folder already holds checkpoints), else the tag itself."""
    if resume == "auto":
        return checkpoint.latest_tag(ckpt_dir)
    if resume != "none":
        return resume
    if checkpoint.latest_tag(ckpt_dir) is not None:
        raise SystemExit(f"{ckpt_dir} already holds checkpoints: pass --resume auto or another --output")
    return None


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


def loader_config(cfg: TrainConfig, mcfg, seed: int, num_workers: int | None = None) -> LoaderConfig:
    """What the model eats (resolution, views, background) and how the config streams it."""
    return LoaderConfig(
        resolution=mcfg.resolution,
        batch_size=cfg.optim.micro_batch,
        num_views=mcfg.num_views,
        background=(float(mcfg.background),) * 3,
        shuffle_buffer=cfg.data.shuffle_buffer,
        shuffle_initial=cfg.data.shuffle_initial,
        num_workers=cfg.data.num_workers if num_workers is None else num_workers,
        seed=seed,
        reads=cfg.data.reads,
    )


def lpips_trunk(cfg: TrainConfig, mcfg) -> dict | None:
    """The LPIPS trunk the run's loss uses (None when it has no LPIPS term); refuses a random
    trunk unless the model config's ``allow_random_lpips``."""
    from model.lgm.loss import lpips_network
    from common.perceptual.builder import RandomLPIPSRefused

    if cfg.objective == "autoencoder":
        needed = cfg.autoencoder.loss.lpips_weight > 0
    else:
        needed = mcfg.joint_training and mcfg.lpips_weight > 0
    if not needed:
        return None
    try:
        return lpips_network("cpu", mcfg.allow_random_lpips).trunk.to_dict()
    except RandomLPIPSRefused as err:
        raise SystemExit(f"training refuses to start: {err}") from err


def write_run_files(output: Path, cfg: TrainConfig, ds_config: dict, trunk: dict | None) -> None:
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / "train_config.yaml", yaml.safe_dump(json.loads(json.dumps(cfg.to_dict()))))
    atomic_write_text(output / "deepspeed_config.json", json.dumps(ds_config, indent=2))
    atomic_write_text(output / "lpips_trunk.json", json.dumps({"lpips_trunk": trunk}, indent=2))


# ----------------------------------------------------------------------------- the loop's steps
def _mean_over_ranks(values: dict) -> dict:
    names = sorted(values)
    t = torch.tensor([float(values[n]) for n in names], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    t /= torch.distributed.get_world_size()
    return dict(zip(names, t.tolist()))


def step_record(engine, result, lr: float, per_model: bool) -> dict:
    """One line of ``losses.jsonl``: the step's losses and metrics (rank means), the lr it used,
    gradient norms."""
    grad_norm = engine.get_global_grad_norm()
    if per_model:  # DeepSpeed clipped nothing and measured no norm: ours, before clipping
        grad_norm = sum(v**2 for v in result.grad_norms.values()) ** 0.5
    return dict(_mean_over_ranks(result.losses), lr=lr,
                grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                **{f"grad_norm_{k}": v for k, v in result.grad_norms.items()})  # fmt: skip


def log_scalars(logger: TrainLogger, engine, loader, cfg: TrainConfig, step: int, record: dict, result) -> None:
    """TensorBoard scalars of a logged step: losses, metrics, optimizer and data rates (rank means)."""
    world = torch.distributed.get_world_size()
    shared = _mean_over_ranks(dict(
        samples_per_s=cfg.optim.total_batch / world / result.step_s,
        data_wait_s=result.data_wait_s,
        self_cond_fraction=result.self_cond_fraction,
        skipped_samples=loader.skipped["samples"] * world,
        skipped_shards=loader.skipped["shards"] * world,
    ))
    loss_scale = getattr(engine.optimizer, "loss_scale", None)
    logger.scalars(step, {
        **{(f"loss/{k}" if k.startswith("loss") else f"metric/{k}"): v for k, v in result.losses.items()},
        "optim/lr": record["lr"],
        "optim/grad_norm": record["grad_norm"],
        **{f"optim/grad_norm_{k}": v for k, v in result.grad_norms.items()},
        **({"optim/loss_scale": float(loss_scale)} if loss_scale is not None else {}),
        "data/samples_per_s": shared["samples_per_s"] * world,
        "data/wait_s": shared["data_wait_s"],
        "data/skipped_samples": shared["skipped_samples"],
        "data/skipped_shards": shared["skipped_shards"],
        "train/self_cond_fraction": shared["self_cond_fraction"],
    })


def export(engine, cfg: TrainConfig, mcfg, urls: list[str], output: Path, step: int) -> None:
    """Rank 0: the run's inference weights into ``<output>/export`` (swapped in atomically)."""
    if cfg.objective != "autoencoder":
        checkpoint.export(engine.module.model, output / "export")
        return
    # the latent std from a second loader (no workers), so the training stream is untouched
    scale = iter(StreamingLoader(urls, loader_config(cfg, mcfg, cfg.seed + 1, num_workers=0)))
    batches = [next(scale)["images"] for _ in range(cfg.autoencoder.scale_batches)]
    export_autoencoder(engine.module.vae, mcfg, output / "export", batches, cfg.seed, step)


def train(engine, loader, cfg: TrainConfig, mcfg, output: Path, start: int) -> int:
    """The loop from step ``start`` to ``cfg.max_steps``: a step, its record, scalars and
    pictures, and at every ``checkpoint_every`` steps (and the last) a checkpoint and the
    export. Returns the last step."""
    rank = torch.distributed.get_rank()
    logger = TrainLogger(output, rank, start, cfg.max_steps)
    batches = iter(loader)
    groups = engine.module.parameter_groups()
    per_model = cfg.optim.grad_clip_mode == "per_model"
    step = start
    while step < cfg.max_steps:
        want_images = (step + 1) % cfg.images_every == 0
        measure = per_model or (step + 1) % cfg.log_every == 0  # per-model norms cost a gather
        lr = engine.get_lr()[0]  # the scheduler moves it on after the step
        result = train_step(engine, batches, cfg.seed, want_visuals=want_images,
                            groups=groups if measure else None, clip_mode=cfg.optim.grad_clip_mode,
                            max_norm=cfg.optim.grad_clip)  # fmt: skip
        step = engine.global_steps
        record = step_record(engine, result, lr, per_model)
        logger.step(step, record)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            log_scalars(logger, engine, loader, cfg, step, record, result)
        if want_images and result.visuals:
            logger.images(step, result.visuals)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            checkpoint.save(engine, output / "checkpoints", step, dict(loader=loader.state_dict()), cfg.keep_last)
            if rank == 0:
                export(engine, cfg, mcfg, loader.urls, output, step)
            torch.distributed.barrier()
    logger.close()
    return step


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.assignments)
    deepspeed = init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    output = Path(args.output)
    tag = resume_tag(args.resume, output / "checkpoints")
    model, mcfg = build_model(cfg)
    trunk = lpips_trunk(cfg, mcfg)
    log.info("LPIPS trunk of the loss: %s", trunk or "none (no LPIPS term)")
    engine = build_engine(model, cfg, deepspeed)
    loader = StreamingLoader(list_shards_on_rank0(args.data, cfg.data.reads), loader_config(cfg, mcfg, cfg.seed))
    start = 0
    if tag is not None:
        state = checkpoint.resume(engine, output / "checkpoints", tag)
        loader.load_state_dict(state["loader"])
        start = int(state["step"])
        log.info("resumed from %s at step %d", output / "checkpoints" / tag, start)
    if rank == 0:
        write_run_files(output, cfg, deepspeed_config(cfg, world), trunk)
    log.info("objective %s: %d rank(s), %d shard(s), total batch %d = %d x %d ranks x %d accumulation",
             cfg.objective, world, len(loader.urls), cfg.optim.total_batch, cfg.optim.micro_batch, world,
             engine.gradient_accumulation_steps())
    step = train(engine, loader, cfg, mcfg, output, start)
    skipped = loader.skipped
    log.info("done at step %d; skipped %d corrupt sample(s) and %d broken shard(s) on rank %d",
             step, skipped["samples"], skipped["shards"], rank)
    torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
