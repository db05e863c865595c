"""Images as pictures: float images to uint8 pixels, and PNG files written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.atomic import atomic_write_bytes


def to_uint8(images) -> np.ndarray:
    """[..., 3, H, W] float in [0, 1] (tensor or array) -> [..., H, W, 3] uint8."""
    arr = np.asarray(images.detach().cpu() if hasattr(images, "detach") else images, np.float32)
    return (np.clip(np.moveaxis(arr, -3, -1), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_png(path: str | Path, image: np.ndarray) -> None:
    """Save an [H, W, 3|4] uint8 image as PNG, atomically."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
