"""Training configuration: one YAML file -> typed dataclasses (unknown keys are errors).

See ``training/configs/tiny.yaml`` (CPU demo, overfits a few objects) and
``training/configs/full.yaml`` (the paper's run, section 4.1). The files of ``training/configs``
are package data: ``--config tiny`` names one of them from anywhere, a path names any other file.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import yaml

from training.autoencoder_recipe import AUGMENT_MODES, AUTOENCODER_INITS
from training.shard_store import ReadPolicy

PRECISIONS = ("auto", "fp16", "bf16", "fp32")
# ``global``: one norm over every trainable parameter, clipped by DeepSpeed (the paper's recipe).
# ``per_model``: the denoiser's and LGM's gradients clipped each to ``grad_clip`` on their own
# (training/engine.py, clip_per_model; why: docs/training.md, "Gradient clipping").
CLIP_MODES = ("global", "per_model")
# What the engine trains: Algorithm 1 (the paper), LGM alone on the clean views (Eq. 2 at
# c_noise(sigma_min)), LGM's own pretraining, which gives the joint stage a pretrained LGM, or the
# latent autoencoder where no pretrained one exists (training/autoencoder.py).
OBJECTIVES = ("algorithm1", "reconstruction", "autoencoder")
# The learning rate after ``warmup_steps`` of linear warmup: constant (the paper states no
# schedule), or a cosine decay to ``lr x min_lr_ratio`` at ``max_steps`` (training.engine.lr_factor).
SCHEDULES = ("constant", "cosine")


@dataclass
class ModelSection:
    """``preset`` of ``model.config`` with field ``overrides``, or a ``pretrained`` export dir
    (its config with the same ``overrides`` applied: ``Ouroboros3D.from_pretrained``).
    ``latent_channels``: the preset's autoencoder and UNet at another latent width
    (``model.config.with_latent_channels``; what the ``autoencoder`` objective trains)."""

    preset: str = "tiny"
    overrides: dict = field(default_factory=dict)
    pretrained: str | None = None
    latent_channels: int | None = None
    gradient_checkpointing: bool = False


@dataclass
class DataSection:
    """Streaming loader settings (training.loader.LoaderConfig); the resolution is the model's.
    ``reads``: timeouts and retries of shards in an object store (training.shard_store.ReadPolicy,
    e.g. ``--set data.reads.read_timeout_s=60``)."""

    shuffle_buffer: int = 64
    shuffle_initial: int = 16
    num_workers: int = 2
    reads: ReadPolicy = field(default_factory=ReadPolicy)


@dataclass
class AutoencoderLoss:
    """The weights of ``training.autoencoder.autoencoder_loss``: KL (in SD's units), squared error,
    its colour part (chroma), LPIPS; L1 has weight 1."""

    kl_weight: float = 1e-6
    mse_weight: float = 1.0
    chroma_weight: float = 0.0
    lpips_weight: float = 0.0


@dataclass
class AutoencoderSection:
    """The ``autoencoder`` objective's recipe (training/autoencoder.py)."""

    # colour augmentation (training/autoencoder_recipe.py) drawn per step | orbit | view, or none
    augment: str = "none"
    # default: PyTorch's initialisation; linear-path: init_linear_path
    init: str = "default"
    loss: AutoencoderLoss = field(default_factory=AutoencoderLoss)
    # batches of a second loader that measure the latent std at each export
    scale_batches: int = 16


@dataclass
class OptimSection:
    """AdamW and the DeepSpeed engine (paper section 4.1: lr 1e-5, clip 1.0, fp16, ZeRO-2).

    ``total_batch`` = micro_batch x ranks x gradient accumulation steps (computed).
    ``precision`` auto: fp16 on CUDA, fp32 on CPU. ``deepspeed_config`` auto: the matching file
    of infra/deepspeed.
    """

    total_batch: int = 32
    micro_batch: int = 1
    lr: float = 1e-5
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    grad_clip_mode: str = "global"
    precision: str = "auto"
    zero_stage: int = 2
    deepspeed_config: str = "auto"


@dataclass
class TrainConfig:
    seed: int = 0
    objective: str = "algorithm1"
    max_steps: int = 30000
    checkpoint_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    images_every: int = 500
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    autoencoder: AutoencoderSection = field(default_factory=AutoencoderSection)

    def validate(self) -> None:
        o = self.optim
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if o.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {o.schedule!r}")
        if self.autoencoder.augment not in AUGMENT_MODES:
            raise ValueError(f"autoencoder.augment must be one of {AUGMENT_MODES}, got {self.autoencoder.augment!r}")
        if self.autoencoder.init not in AUTOENCODER_INITS:
            raise ValueError(f"autoencoder.init must be one of {AUTOENCODER_INITS}, got {self.autoencoder.init!r}")
        if o.grad_clip_mode not in CLIP_MODES:
            raise ValueError(f"optim.grad_clip_mode must be one of {CLIP_MODES}, got {o.grad_clip_mode!r}")
        if o.precision not in PRECISIONS:
            raise ValueError(f"optim.precision must be one of {PRECISIONS}, got {o.precision!r}")
        if o.total_batch % o.micro_batch:
            raise ValueError(f"optim.total_batch {o.total_batch} is not a multiple of micro_batch {o.micro_batch}")
        for name in ("max_steps", "checkpoint_every", "keep_last", "log_every", "images_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        sub = SECTIONS.get((cls, name))
        kwargs[name] = _build(sub, value, f"{where}.{name}") if sub else value
    return cls(**kwargs)


# the mappings of a config that are dataclasses of their own: (owner, key) -> class
SECTIONS = {(TrainConfig, "model"): ModelSection, (TrainConfig, "data"): DataSection,
            (TrainConfig, "optim"): OptimSection, (TrainConfig, "autoencoder"): AutoencoderSection,
            (AutoencoderSection, "loss"): AutoencoderLoss,
            (DataSection, "reads"): ReadPolicy}


def apply_overrides(data: dict, assignments: list[str]) -> dict:
    """``key.sub=value`` assignments (values parsed as YAML, ``3e-4`` as a number) applied to a
    config mapping.

    ``model.overrides.svd_path=runs/ae/svd`` sets ``data["model"]["overrides"]["svd_path"]``;
    intermediate mappings are created where missing (unknown keys still fail validation).
    """
    for item in assignments:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected key.path=value")
        node = data
        *parents, leaf = key.split(".")
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {name} is not a mapping")
        node[leaf] = _scalar(yaml.safe_load(text))
    return data


def _scalar(value):
    """YAML 1.1 reads ``3e-4`` (no dot) as a string; a command line means the number."""
    if isinstance(value, str):
        try:
            return float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "+inf") else value
        except ValueError:
            return value
    return value


PRESET_DIR = resources.files("training") / "configs"  # the shipped configs (package data)


def preset_names() -> list[str]:
    """Names of the shipped training configs (``training/configs/<name>.yaml``)."""
    return sorted(f.name[: -len(".yaml")] for f in PRESET_DIR.iterdir() if f.name.endswith(".yaml"))


def resolve_config(spec: str | Path) -> Path | Traversable:
    """``--config``: an existing YAML file, or the name of a shipped config (``tiny``, ``full``...).

    Raises:
        ValueError naming the argument and the shipped names when it is neither.
    """
    if Path(spec).is_file():
        return Path(spec)
    if re.fullmatch(r"[A-Za-z0-9_\-]+", str(spec)) and (PRESET_DIR / f"{spec}.yaml").is_file():
        return PRESET_DIR / f"{spec}.yaml"
    raise ValueError(f"{spec}: no such training config file, nor a shipped config name "
                     f"({', '.join(preset_names())})")


def load_config(spec: str | Path, assignments: list[str] = ()) -> TrainConfig:
    """Read and validate a training YAML (a file or a shipped name, :func:`resolve_config`),
    with ``--set`` assignments applied (see :func:`apply_overrides`); errors name the file and
    the key."""
    path = resolve_config(spec)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read the training config ({exc})") from exc
    try:
        data = apply_overrides(data, list(assignments))
        cfg = _build(TrainConfig, data, str(path))
        cfg.optim.betas = tuple(cfg.optim.betas)
        cfg.validate()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return cfg
