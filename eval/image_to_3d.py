"""Image-to-3D with an Ouroboros3D checkpoint: one picture in, 8 views + 3D Gaussians out.

    python -m eval.image_to_3d --image <png> --checkpoint <dir> --output <dir>
        [--steps N --feedback-every 1 --elevation 0]

Input: an RGBA image (the alpha is the object's mask), or an RGB image of an object on a plain,
near-uniform background (the background colour is estimated from the image border and the
alpha made from the distance to it). Anything else is refused with an error saying what is
needed. The object is recentred and rescaled so that it spans the frame like the training
renders (longest side of the object's box = ``--fill`` of the image, 0.7 by default: a
unit-size object at radius 2.0 with a 39.6 degree field of view spans about 70%).

Cameras (``data_pipeline.conventions``): the model frame of the input view, azimuths
0, 45, ..., 315 degrees (the condition view on +X), the elevation assumed for the input,
radius 2.0, field of view 39.6 degrees.

Outputs in ``--output``: ``input.png`` (the prepared condition image), ``views.png`` (the 8
generated views, 2 x 4), ``gaussians.ply`` (standard 3DGS layout, ``model.gaussians_ply.save_ply``),
``mesh.glb`` (a vertex-coloured mesh of the Gaussians, ``eval.mesh_from_gaussians``, +Y up as
glTF specifies; ``--no-mesh`` skips it) and ``orbit.mp4`` (the Gaussians rendered on a
360-degree orbit).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_pipeline.atomic import atomic_path
from data_pipeline.conventions import DEFAULT_FOV_DEG, DEFAULT_RADIUS, intrinsics, orbit_c2w
from eval.report import save_png, to_uint8

ALPHA_LOW, ALPHA_HIGH = 0.06, 0.14  # colour distance to the background: alpha 0 below, 1 above
BORDER_TOLERANCE = 0.10  # a border pixel this close (max over channels) counts as background
BORDER_PLAIN_FRACTION = 0.95  # share of border pixels that must be background


class InputImageError(ValueError):
    """The input image cannot be used; the message names the file and what is needed."""


def estimate_background(rgb: np.ndarray, path: str = "image") -> np.ndarray:
    """Colour of a plain background, from the image border (2% of the short side, >= 1 px).

    Args:
        rgb: [H, W, 3] float in [0, 1].
    Returns:
        [3] the median border colour.
    Raises:
        InputImageError when the border is not near-uniform (a photo, a cluttered scene).
    """
    h, w, _ = rgb.shape
    b = max(1, round(0.02 * min(h, w)))
    border = np.concatenate([rgb[:b].reshape(-1, 3), rgb[-b:].reshape(-1, 3),
                             rgb[:, :b].reshape(-1, 3), rgb[:, -b:].reshape(-1, 3)])  # fmt: skip
    bg = np.median(border, axis=0)
    plain = (np.abs(border - bg).max(-1) < BORDER_TOLERANCE).mean()
    if plain < BORDER_PLAIN_FRACTION:
        raise InputImageError(
            f"{path}: RGB image without a plain background (only {plain:.0%} of the border is "
            f"near one colour, {BORDER_PLAIN_FRACTION:.0%} needed). Give an RGBA image whose "
            "alpha is the object's mask (e.g. from a background-removal tool), or a picture of "
            "the object on a plain, uniform background."
        )
    return bg


def alpha_from_background(rgb: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Soft mask from the colour distance to the background (max over channels).

    Returns:
        [H, W] in [0, 1]: 0 up to ALPHA_LOW, 1 from ALPHA_HIGH, linear in between.
    """
    dist = np.abs(rgb - background).max(-1)
    return np.clip((dist - ALPHA_LOW) / (ALPHA_HIGH - ALPHA_LOW), 0.0, 1.0)


def load_rgba(path: str | Path) -> np.ndarray:
    """An input picture as straight-alpha RGBA float [H, W, 4] in [0, 1].

    RGBA (or LA / paletted with transparency) keeps its alpha; an opaque image must be an
    object on a plain background (:func:`estimate_background`).
    """
    try:
        img = Image.open(path)
        img.load()
    except (OSError, ValueError) as err:
        raise InputImageError(f"{path}: cannot read the image ({err})") from err
    has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
    rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
    if has_alpha and rgba[..., 3].min() < 1.0:
        return rgba
    rgb = rgba[..., :3]
    alpha = alpha_from_background(rgb, estimate_background(rgb, str(path)))
    return np.concatenate([rgb, alpha[..., None]], -1)


def recentre(rgba: np.ndarray, size: int, fill: float, path: str = "image") -> np.ndarray:
    """Crop to the object, centre it and scale its box's longest side to ``fill * size``.

    Args:
        rgba: [H, W, 4] straight alpha in [0, 1].
    Returns:
        [size, size, 4] straight alpha in [0, 1].
    """
    ys, xs = np.nonzero(rgba[..., 3] > 0.5)
    if ys.size == 0:
        raise InputImageError(f"{path}: no object found (the alpha mask is empty)")
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = rgba[y0:y1, x0:x1]
    side = int(np.ceil(max(y1 - y0, x1 - x0) / fill))
    canvas = np.zeros((side, side, 4), np.float32)
    oy, ox = (side - (y1 - y0)) // 2, (side - (x1 - x0)) // 2
    canvas[oy : oy + y1 - y0, ox : ox + x1 - x0] = crop
    # Pillow resamples RGBA with premultiplied alpha, so no colour bleeds in from the zeros.
    image = Image.fromarray((canvas * 255.0 + 0.5).astype(np.uint8), "RGBA")
    image = image.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.float32) / 255.0


def condition_image(rgba: np.ndarray, background: float) -> torch.Tensor:
    """Composite over the model's background. Returns [1, 3, H, W] in [0, 1]."""
    rgb = rgba[..., :3] * rgba[..., 3:] + background * (1.0 - rgba[..., 3:])
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float()


def view_cameras(num_views: int, elevation: float, resolution: int, step_deg: float = 45.0):
    """Cameras of the generated views in the model frame: azimuth k * step (condition at 0).

    Returns:
        c2w [1, V, 4, 4], K [1, V, 3, 3] float32 tensors.
    """
    c2w = orbit_c2w(elevation, np.arange(num_views) * step_deg, DEFAULT_RADIUS)
    K = np.broadcast_to(intrinsics(DEFAULT_FOV_DEG, resolution), (num_views, 3, 3))
    return (torch.from_numpy(c2w).float()[None], torch.from_numpy(np.array(K)).float()[None])


def views_grid(views: torch.Tensor, cols: int = 4) -> np.ndarray:
    """[V, 3, H, W] in [0, 1] -> [rows*H, cols*W, 3] uint8 grid."""
    img = to_uint8(views)
    v, h, w, _ = img.shape
    rows = -(-v // cols)
    grid = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for i in range(v):
        grid[(i // cols) * h : (i // cols + 1) * h, (i % cols) * w : (i % cols + 1) * w] = img[i]
    return grid


def render_orbit(gaussians: torch.Tensor, elevation: float, resolution: int, frames: int,
                 background: float, chunk: int = 8) -> np.ndarray:  # fmt: skip
    """The Gaussians seen from a full 360-degree orbit (radius 2.0, field of view 39.6).

    Returns:
        [frames, H, W, 3] uint8
    """
    from model.rasterizer import render_gaussians

    c2w, K = (t.to(gaussians)[0] for t in view_cameras(frames, elevation, resolution, 360.0 / frames))
    out = []
    for i in range(0, frames, chunk):
        cams = c2w[i : i + chunk][None]
        rgb = render_gaussians(gaussians, cams, K[i : i + chunk][None], resolution,
                               resolution, background=background)["rgb"][0]  # fmt: skip
        out.append(to_uint8(rgb.clamp(0, 1)))
    return np.concatenate(out)


def write_mp4(path: Path, frames: np.ndarray, fps: int = 30) -> None:
    """H.264 video through imageio-ffmpeg, written to a temporary name and renamed."""
    import imageio.v2 as imageio

    with atomic_path(path, suffix=".mp4") as tmp:
        imageio.mimwrite(tmp, list(frames), fps=fps, codec="libx264", quality=8,
                         macro_block_size=1, format="FFMPEG")  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.image_to_3d",
                                description="Image-to-3D with an Ouroboros3D checkpoint.")
    p.add_argument("--image", required=True, type=Path, help="RGBA, or RGB on a plain background")
    p.add_argument("--checkpoint", required=True, type=Path, help="Ouroboros3D export folder")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: the checkpoint config's edm.num_steps, the paper's 25)")
    p.add_argument("--feedback-every", type=int, default=1)
    p.add_argument("--elevation", type=float, default=0.0,
                   help="elevation (degrees) assumed for the input view")
    p.add_argument("--fill", type=float, default=0.7,
                   help="longest side of the object's box as a fraction of the image")
    p.add_argument("--orbit-frames", type=int, default=60)
    p.add_argument("--no-mesh", action="store_true", help="do not write mesh.glb")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    return p.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    """``auto`` = CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def main(argv=None) -> int:
    args = parse_args(argv)
    from model.config import OuroborosConfig
    from model.ouroboros import CONFIG_NAME

    if not 0.1 <= args.fill <= 1.0:
        print(f"error: --fill {args.fill} not in [0.1, 1]", file=sys.stderr)
        return 2
    try:  # every check on the inputs happens before the (slow) model load
        rgba = load_rgba(args.image)
        cfg = OuroborosConfig.load(args.checkpoint / CONFIG_NAME)
        prepared = recentre(rgba, cfg.resolution, args.fill, str(args.image))
    except (InputImageError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from model.gaussians_ply import save_ply
    from model.ouroboros import Ouroboros3D

    device = resolve_device(args.device)
    model = Ouroboros3D.from_pretrained(args.checkpoint).to(device).eval()
    bg = float(cfg.background)
    cond = condition_image(prepared, bg).to(device)
    c2w, K = view_cameras(cfg.num_views, args.elevation, cfg.resolution)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():
        out = model.sample(cond, c2w.to(device), K.to(device), num_steps=args.steps,
                           feedback_every=args.feedback_every, generator=generator)  # fmt: skip
        video = render_orbit(out.gaussians[:1], args.elevation, cfg.resolution,
                             args.orbit_frames, bg)  # fmt: skip

    args.output.mkdir(parents=True, exist_ok=True)
    save_png(args.output / "input.png", to_uint8(cond[0]))
    save_png(args.output / "views.png", views_grid(out.views[0]))
    save_ply(out.gaussians[0].detach().cpu(), args.output / "gaussians.ply")
    write_mp4(args.output / "orbit.mp4", video)
    written = ["input.png", "views.png", "gaussians.ply", "orbit.mp4"]
    if not args.no_mesh:
        from eval.export_mesh import write_mesh
        from eval.mesh_from_gaussians import mesh_from_gaussians

        try:
            write_mesh(mesh_from_gaussians(out.gaussians[0].detach().cpu()), args.output / "mesh.glb")
            written.append("mesh.glb")
        except ValueError as err:  # e.g. Gaussians too faint to have a surface
            print(f"warning: no mesh.glb: {err}", file=sys.stderr)
    print(f"wrote {args.output}/{{{', '.join(written)}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
