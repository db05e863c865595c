"""Checkpoints: DeepSpeed engine state + per-rank trainer state, keep-last-K, inference export.

Layout under ``<output>/checkpoints``::

    step_0000100/                     one tag per saved step
        trainer_rank_000.pt ...       per rank: loader position, RNG states (written FIRST)
        <DeepSpeed model / optimizer shards>
    latest                            DeepSpeed's pointer, written LAST by save_checkpoint

so ``latest`` only ever names a complete checkpoint. The export (``<output>/export``) is
``Ouroboros3D.save_pretrained`` written to a temporary folder and swapped in by rename.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from common.atomic import atomic_path

TAG_RE = re.compile(r"^step_(\d{7})$")


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def rng_state() -> dict:
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rank_file(ckpt_dir: Path, tag: str, rank: int) -> Path:
    return ckpt_dir / tag / f"trainer_rank_{rank:03d}.pt"


def save(engine, ckpt_dir: str | Path, step: int, trainer_state: dict, keep_last: int) -> Path:
    """Save on every rank: this rank's trainer state, then the engine (``latest`` last), prune.

    Args:
        trainer_state: this rank's loader position and anything else to resume (picklable).
    Returns:
        the tag folder
    """
    ckpt_dir = Path(ckpt_dir)
    rank = torch.distributed.get_rank()
    tag = tag_for(step)
    path = _rank_file(ckpt_dir, tag, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(dict(step=step, rng=rng_state(), **trainer_state), tmp)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=dict(step=step))
    torch.distributed.barrier()
    if rank == 0:
        prune(ckpt_dir, keep_last)
    torch.distributed.barrier()
    return ckpt_dir / tag


def saved_steps(ckpt_dir: str | Path) -> list[int]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in ckpt_dir.iterdir() if (m := TAG_RE.match(p.name)))


def prune(ckpt_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` tags (never the one ``latest`` names)."""
    ckpt_dir = Path(ckpt_dir)
    keep = {tag_for(s) for s in saved_steps(ckpt_dir)[-keep_last:]}
    latest = latest_tag(ckpt_dir)
    for step in saved_steps(ckpt_dir):
        tag = tag_for(step)
        if tag not in keep and tag != latest:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The tag DeepSpeed's ``latest`` file names, or None when there is no checkpoint."""
    pointer = Path(ckpt_dir) / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (Path(ckpt_dir) / tag).is_dir():
        raise FileNotFoundError(f"{pointer} names {tag!r}, which does not exist")
    return tag


def resume(engine, ckpt_dir: str | Path, tag: str) -> dict:
    """Load the engine (model, optimizer, scheduler, loss scale) and this rank's trainer state.

    Returns:
        this rank's trainer state (``step``, ``loader``, ...); RNG states are restored.
    """
    ckpt_dir = Path(ckpt_dir)
    path = _rank_file(ckpt_dir, tag, torch.distributed.get_rank())
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: checkpoint {tag} was written by fewer ranks than this run has"
        )
    load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    state = torch.load(path, weights_only=False)
    set_rng_state(state["rng"])
    return state


def export(model, out_dir: str | Path) -> Path:
    """Inference weights (``model.save_pretrained``) swapped into ``out_dir`` atomically (rank 0)."""
    model.save_pretrained(out_dir)  # built beside and swapped in (common.atomic.atomic_dir)
    return out_dir
