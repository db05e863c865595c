"""A picture of what a job rendered: one row per object, a few frames of RGBA (over grey) and
the same frames' canonical coordinate maps.

The render workers draw each unit's first object (:func:`labelled_row`, a fixed-size PNG that
travels in the unit's result); the driver stacks the rows (:func:`contact_sheet`), so it never
reads a shard back.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from common.orbit import OrbitRender

GREY = 128
FRAMES = (0, 4, 8, 12)
TILE = 96
LABEL_HEIGHT = 14


def over_grey(rgba: np.ndarray) -> np.ndarray:
    """Composite straight-alpha RGBA uint8 [H, W, 4] over grey. Returns RGB uint8 [H, W, 3]."""
    alpha = rgba[..., 3:].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * alpha + GREY * (1.0 - alpha)
    return np.round(rgb).astype(np.uint8)


def object_row(orbit: OrbitRender, frames=FRAMES, tile: int = TILE) -> np.ndarray:
    """A decoded orbit -> RGB uint8 [tile, 2 * len(frames) * tile, 3]: RGBA frames, then CCMs."""
    tiles = [over_grey(orbit.rgba[i]) for i in frames]
    tiles += [np.round(orbit.ccm[i] * 255).astype(np.uint8) for i in frames]
    resized = [np.asarray(Image.fromarray(t).resize((tile, tile), Image.NEAREST)) for t in tiles]
    return np.concatenate(resized, axis=1)


def labelled_row(orbit: OrbitRender, frames=FRAMES, tile: int = TILE) -> np.ndarray:
    """:func:`object_row` under a band with the object's uid: RGB uint8
    [LABEL_HEIGHT + tile, 2 * len(frames) * tile, 3], whatever the render's resolution."""
    band = Image.new("RGB", (2 * len(frames) * tile, LABEL_HEIGHT), (32, 32, 32))
    ImageDraw.Draw(band).text((3, 1), f"{orbit.meta.get('uid', orbit.key)}  (RGBA | CCM)",
                              fill=(230, 230, 230))
    return np.concatenate([np.asarray(band), object_row(orbit, frames, tile)], axis=0)


def contact_sheet(rows_png: list[bytes], max_objects: int = 16) -> bytes | None:
    """Stack up to ``max_objects`` rows (PNG bytes of :func:`labelled_row`) into one PNG.

    Returns:
        the PNG's bytes, or None when there is no row.
    """
    rows = [np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for png in rows_png[:max_objects]]
    if not rows:
        return None
    buffer = io.BytesIO()
    Image.fromarray(np.concatenate(rows, axis=0)).save(buffer, format="PNG")
    return buffer.getvalue()
