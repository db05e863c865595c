"""A picture of what a job rendered: one row per object, a few frames of RGBA (over grey) and
the same frames' canonical coordinate maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data_pipeline.atomic import atomic_path
from data_pipeline.shards import decode_sample, iter_shard

GREY = 128


def over_grey(rgba: np.ndarray) -> np.ndarray:
    """Composite straight-alpha RGBA uint8 [H, W, 4] over grey. Returns RGB uint8 [H, W, 3]."""
    alpha = rgba[..., 3:].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * alpha + GREY * (1.0 - alpha)
    return np.round(rgb).astype(np.uint8)


def object_row(sample: dict, frames=(0, 4, 8, 12), tile: int = 96) -> np.ndarray:
    """A decoded sample -> RGB uint8 [tile, 2 * len(frames) * tile, 3]: RGBA frames, then CCMs."""
    tiles = [over_grey(sample["rgba"][i]) for i in frames]
    tiles += [np.round(sample["ccm"][i] * 255).astype(np.uint8) for i in frames]
    resized = [np.asarray(Image.fromarray(t).resize((tile, tile), Image.NEAREST)) for t in tiles]
    return np.concatenate(resized, axis=1)


def write_contact_sheet(shard_paths, out_path: str | Path, max_objects: int = 16,
                        frames=(0, 4, 8, 12), tile: int = 96) -> Path | None:
    """Write a PNG grid of the first orbit (``_o0``) of up to ``max_objects`` objects.

    Returns:
        the PNG path, or None when the shards hold no sample.
    """
    label_h = 14
    rows = []
    for shard in shard_paths:
        for raw in iter_shard(shard):
            if not raw["__key__"].endswith("_o0"):
                continue
            sample = decode_sample(raw)
            band = Image.new("RGB", (2 * len(frames) * tile, label_h), (32, 32, 32))
            ImageDraw.Draw(band).text((3, 1), f"{sample['meta'].get('uid', raw['__key__'])}  "
                                      f"(RGBA | CCM)", fill=(230, 230, 230))
            rows += [np.asarray(band), object_row(sample, frames, tile)]
            if len(rows) // 2 >= max_objects:
                break
        if len(rows) // 2 >= max_objects:
            break
    if not rows:
        return None
    out_path = Path(out_path)
    with atomic_path(out_path, suffix=".png") as tmp:
        Image.fromarray(np.concatenate(rows, axis=0)).save(tmp)
    return out_path
