"""Rank-0 logging: TensorBoard scalars and image grids, a tqdm bar, and ``losses.jsonl``.

``losses.jsonl`` holds one line per optimizer step (step, every loss term, lr, grad norm):
the machine-readable record tests and benchmarks compare. On resume, lines after the
resumed step are dropped so the file always describes one consistent run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torchvision.utils import make_grid

from common.atomic import atomic_write_text


def visual_grid(images: torch.Tensor) -> torch.Tensor:
    """One picture from a visual: the first batch item's views side by side.

    Args:
        images: [B, V, C, H, W] or [B, C, H, W]; C = 1 (shown grey) or 3; values in [0, 1]
            (clamped: a model-frame CCM may leave it slightly).
    Returns:
        [3, H', W'] in [0, 1]
    """
    x = images.detach().float().cpu()
    if x.dim() == 5:
        x = x[0]
    elif x.dim() == 4:
        x = x[:1]
    else:
        raise ValueError(f"visual of shape {tuple(images.shape)}: expected [B,V,C,H,W] or [B,C,H,W]")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return make_grid(x.clamp(0, 1), nrow=x.shape[0], padding=1, pad_value=1.0)


class TrainLogger:
    """Everything written by rank 0; other ranks get a logger that does nothing."""

    def __init__(self, output: str | Path, rank: int, start_step: int, max_steps: int):
        self.active = rank == 0
        self.jsonl = Path(output) / "losses.jsonl"
        self.writer = self.bar = None
        if not self.active:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        Path(output).mkdir(parents=True, exist_ok=True)
        self._truncate(start_step)
        self.writer = SummaryWriter(str(Path(output) / "tb"), purge_step=start_step + 1)
        self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def _truncate(self, step: int) -> None:
        if not self.jsonl.exists():
            return
        lines = [ln for ln in self.jsonl.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        atomic_write_text(self.jsonl, "".join(ln + "\n" for ln in lines))

    def step(self, step: int, record: dict) -> None:
        """One line of losses.jsonl and the progress bar (every step)."""
        if not self.active:
            return
        with self.jsonl.open("a") as f:
            f.write(json.dumps(dict(step=step, **record)) + "\n")
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}")

    def scalars(self, step: int, values: dict) -> None:
        if self.active:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def images(self, step: int, visuals: dict) -> None:
        if self.active:
            for name, tensor in visuals.items():
                self.writer.add_image(f"visuals/{name}", visual_grid(tensor), step)

    def close(self) -> None:
        if self.active:
            self.writer.close()
            self.bar.close()
