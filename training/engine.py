"""DeepSpeed engine: distributed setup, the ZeRO-2 config, and one optimizer step.

The engine wraps an objective module (:func:`objective_module`: the model's ``training_losses``
or ``reconstruction_losses`` as ``forward``, or the autoencoder's loss), so DeepSpeed's forward
hooks, loss scaling and gradient accumulation all apply. Only the objective's
``parameter_groups()`` go to the optimizer (for Algorithm 1: VAE and CLIP stay frozen).
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from training.config import TrainConfig
from training.loader import rng_seed

# The DeepSpeed configs of infra/deepspeed, package data of the ``infra`` package.
DEEPSPEED_DIR = resources.files("infra") / "deepspeed"


def free_port() -> int:
    """A TCP port on loopback that nothing holds now (a rendezvous port for a launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed():
    """Select the accelerator, initialise torch.distributed (nccl on CUDA, gloo on CPU).

    Under the ``deepspeed`` launcher the rank variables are set; a plain ``python`` run gets a
    one-process group on a free local port. Must run before DeepSpeed is imported elsewhere.

    Returns:
        the deepspeed module
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return deepspeed


def resolve_precision(precision: str) -> str:
    """``auto`` -> fp16 on CUDA (the paper), fp32 on CPU (DeepSpeed's fp16 is GPU-only)."""
    if precision == "auto":
        return "fp16" if torch.cuda.is_available() else "fp32"
    if precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("fp16 mixed precision needs a GPU; use precision bf16 or fp32 on CPU")
    return precision


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed config: the infra/deepspeed file with this run's numbers filled in.

    Gradient accumulation = total_batch / (micro_batch x world_size) (must divide).
    """
    o = cfg.optim
    precision = resolve_precision(o.precision)
    if o.deepspeed_config == "auto":
        name = {"fp16": "zero2_gpu_fp16", "bf16": "zero2_cpu_bf16", "fp32": "zero2_cpu_fp32"}[precision]
        path = DEEPSPEED_DIR / f"{name}.json"
    else:
        path = Path(o.deepspeed_config)
    try:
        ds = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the DeepSpeed config ({exc})") from exc
    per_step = o.micro_batch * world_size
    if o.total_batch % per_step:
        raise ValueError(
            f"total batch {o.total_batch} is not a multiple of micro batch {o.micro_batch} x "
            f"{world_size} rank(s)"
        )
    ds.update(
        train_batch_size=o.total_batch,
        train_micro_batch_size_per_gpu=o.micro_batch,
        gradient_accumulation_steps=o.total_batch // per_step,
        gradient_clipping=o.grad_clip if o.grad_clip_mode == "global" else 0.0,
    )
    ds["optimizer"]["params"].update(lr=o.lr, betas=list(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if not torch.cuda.is_available():
        ds["optimizer"]["params"]["torch_adam"] = True
    ds["zero_optimization"]["stage"] = o.zero_stage
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": precision == "fp16"}
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
    return ds


def lr_factor(step: int, max_steps: int, warmup_steps: int = 0, schedule: str = "constant",
              min_lr_ratio: float = 0.0) -> float:
    """The learning rate of optimizer step ``step`` (0-based) over ``optim.lr``: a linear warmup
    ``(step + 1) / warmup_steps`` over the first ``warmup_steps``, then 1 (``constant``, the
    paper's: it states no schedule) or the cosine from 1 down to ``min_lr_ratio`` at ``max_steps``
    (``min + (1 - min) (1 + cos(pi t)) / 2``, ``t`` the fraction of the steps after warmup)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    t = min((step - warmup_steps) / max(max_steps - warmup_steps, 1), 1.0)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def lr_scheduler(cfg: TrainConfig):
    """The callable DeepSpeed builds its scheduler with: ``LambdaLR`` of :func:`lr_factor`
    (stepped by the engine after each optimizer step, saved in its checkpoints)."""
    o = cfg.optim

    def factor(step: int) -> float:
        return lr_factor(step, cfg.max_steps, o.warmup_steps, o.schedule, o.min_lr_ratio)

    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class TrainingObjective(torch.nn.Module):
    """``forward(batch, generator)`` = ``model.training_losses`` (Algorithm 1, section 3.3), or
    ``model.reconstruction_losses`` (LGM alone on clean views) for the ``reconstruction`` objective.

    The batch stays float32 under fp16 / bf16 engines: the model casts what enters each
    network to that network's dtype and keeps cameras, preprocessing and losses in float32.
    """

    def __init__(self, model: torch.nn.Module, objective: str = "algorithm1"):
        super().__init__()
        self.model = model
        self.objective = objective

    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """``Ouroboros3D.trainable_parameter_groups`` of the objective (``denoiser``, ``lgm``)."""
        return self.model.trainable_parameter_groups(self.objective)

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        if self.objective == "reconstruction":
            return self.model.reconstruction_losses(batch, generator=generator)
        return self.model.training_losses(batch, generator=generator)


def objective_module(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """What the engine trains: :class:`TrainingObjective` of an ``Ouroboros3D``, or
    ``training.autoencoder.AutoencoderObjective`` of an autoencoder (``objective: autoencoder``)."""
    if cfg.objective == "autoencoder":
        from training.autoencoder import AutoencoderObjective

        return AutoencoderObjective(model, cfg.autoencoder)
    if cfg.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if cfg.objective == "reconstruction":  # LGM alone: the denoiser stays as it is
        model.denoiser.requires_grad_(False)
        model.lgm.requires_grad_(True)
    return TrainingObjective(model, cfg.objective)


def build_engine(model: torch.nn.Module, cfg: TrainConfig, deepspeed):
    """Wrap the model's objective (:func:`objective_module`) in a DeepSpeed engine (ZeRO-2, AdamW
    on its parameter groups only, the lr of :func:`lr_factor`)."""
    objective = objective_module(model, cfg)
    params = [p for group in objective.parameter_groups().values() for p in group if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    ds_config = deepspeed_config(cfg, torch.distributed.get_world_size())
    engine, _, _, _ = deepspeed.initialize(model=objective, model_parameters=params, config=ds_config,
                                           lr_scheduler=lr_scheduler(cfg))
    return engine


def step_seed(seed: int, rank: int, micro_step: int) -> int:
    """Seed of the model's generator for one micro step: independent of resumes and of timing."""
    return rng_seed(seed, rank, micro_step)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@dataclass
class StepResult:
    """Losses averaged over the micro steps of one optimizer step (this rank)."""

    losses: dict
    self_cond_fraction: float
    data_wait_s: float
    step_s: float
    visuals: dict
    grad_norms: dict  # per parameter group, before clipping (empty when not measured)


def group_grad_norms(groups: dict[str, list[torch.nn.Parameter]]) -> dict[str, float]:
    """L2 norm of each parameter group's full gradient (ZeRO-partitioned or not), all ranks'
    average; call at a gradient-accumulation boundary, before ``engine.step()``.

    Under fp16 the gradients still carry the loss scale: the norms are divided by it by the
    caller (:func:`train_step`).
    """
    from deepspeed.utils import safe_get_full_grad

    norms = {}
    for name, params in groups.items():
        total = 0.0
        for p in params:
            g = safe_get_full_grad(p)
            if g is not None:
                total += float(g.float().pow(2).sum())
        norms[name] = total**0.5
    return norms


def clip_per_model(groups: dict[str, list[torch.nn.Parameter]], norms: dict[str, float], max_norm: float,
                   loss_scale: float = 1.0) -> None:
    """Scale each group's gradient to norm at most ``max_norm`` on its own (``grad_clip_mode:
    per_model``), so one model's large gradients cannot shrink the other's step."""
    from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

    for name, params in groups.items():
        factor = max_norm * loss_scale / (norms[name] + 1e-6)
        if factor >= 1.0:
            continue
        for p in params:
            g = safe_get_full_grad(p)
            if g is not None:
                safe_set_full_grad(p, g * factor)


def train_step(engine, batches, seed: int, want_visuals: bool = False,
               groups: dict[str, list[torch.nn.Parameter]] | None = None,
               clip_mode: str = "global", max_norm: float = 1.0) -> StepResult:
    """One optimizer step: ``gradient_accumulation_steps`` micro batches, backward, step.

    Args:
        batches: iterator of loader batches.  seed: run seed (generator per micro step).
        groups: parameter groups (the objective's ``parameter_groups()``) whose gradient
            norms are measured before the step (``StepResult.grad_norms``); required by
            ``clip_mode="per_model"``, which clips each group to ``max_norm`` on its own.
    """
    accum = engine.gradient_accumulation_steps()
    rank = torch.distributed.get_rank()
    sums: dict[str, float] = {}
    self_cond = 0
    wait = 0.0
    visuals: dict = {}
    grad_norms: dict = {}
    start = time.perf_counter()
    for micro in range(accum):
        t0 = time.perf_counter()
        batch = to_device(next(batches), engine.device)
        wait += time.perf_counter() - t0
        micro_step = engine.global_steps * accum + micro
        generator = torch.Generator(device=engine.device).manual_seed(step_seed(seed, rank, micro_step))
        out = engine(batch, generator=generator)
        engine.backward(out["loss"])
        if groups is not None and engine.is_gradient_accumulation_boundary():
            loss_scale = float(getattr(engine.optimizer, "loss_scale", 1.0) or 1.0)
            norms = group_grad_norms(groups)
            if clip_mode == "per_model":
                clip_per_model(groups, norms, max_norm, loss_scale)
            grad_norms = {k: v / loss_scale for k, v in norms.items()}
        engine.step()
        for k, v in out.items():
            if k.startswith(("loss", "psnr")) and torch.is_tensor(v):
                sums[k] = sums.get(k, 0.0) + float(v.detach())
        self_cond += bool(out.get("self_cond_used", False))
        if want_visuals and micro == accum - 1:
            visuals = {k: v.detach().float().cpu() for k, v in out.get("visuals", {}).items()}
    return StepResult(
        losses={k: v / accum for k, v in sums.items()},
        self_cond_fraction=self_cond / accum,
        data_wait_s=wait,
        step_s=time.perf_counter() - start,
        visuals=visuals,
        grad_norms=grad_norms,
    )
