"""Image-to-3D with an Ouroboros3D checkpoint: one picture in, 8 views + 3D Gaussians out.

    python -m inference.image_to_3d --image <png> --output <dir> [--checkpoint <dir>|tiny]
        [--steps N --feedback-every 1 --elevation 0]

Input: an RGBA image (the alpha is the object's mask), or an RGB image of an object on a plain,
near-uniform background (the background colour is estimated from the image border and the
alpha made from the distance to it). Anything else is refused with an error saying what is
needed. The object is recentred and rescaled so that it spans the frame like the training
renders (longest side of the object's box = ``--fill`` of the image, 0.7 by default: a
unit-size object at radius 2.0 with a 39.6 degree field of view spans about 70%).

Cameras (``common.conventions``): the model frame of the input view, azimuths
0, 45, ..., 315 degrees (the condition view on +X), the elevation assumed for the input,
radius 2.0, field of view 39.6 degrees.

Outputs in ``--output``: ``input.png`` (the prepared condition image), ``views.png`` (the 8
generated views, 2 x 4), ``gaussians.ply`` (standard 3DGS layout, ``model.gaussians_ply.save_ply``),
``mesh.glb`` (a vertex-coloured mesh of the Gaussians, ``inference.mesh_from_gaussians``, +Y up as
glTF specifies; ``--no-mesh`` skips it) and ``orbit.mp4`` (the Gaussians rendered on a
360-degree orbit).

The steps are functions that the browser app (``inference.app``) shares: :func:`prepare_input`
(reading, refusals, framing), :func:`generate` (Algorithm 2 with a per-step callback, then the
orbit video) and :func:`write_outputs` (the files above), so that both give the same files for
the same image, seed and settings.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from common.atomic import atomic_path
from common.conventions import DEFAULT_FOV_DEG, DEFAULT_RADIUS, intrinsics, orbit_c2w
from common.images import save_png, to_uint8
from model.shipped import resolve_checkpoint

ALPHA_LOW, ALPHA_HIGH = 0.06, 0.14  # colour distance to the background: alpha 0 below, 1 above
BORDER_TOLERANCE = 0.10  # a border pixel this close (max over channels) counts as background
BORDER_PLAIN_FRACTION = 0.95  # share of border pixels that must be background
# Reading a picture: above MAX_INPUT_PIXELS it is refused before it is decoded (memory: a
# 100-megapixel RGBA image is 1.6 GB as float32); a longest side above MAX_INPUT_SIDE is
# downscaled first (the model sees it at its own resolution, 64 to 512 px, anyway), with a note.
MAX_INPUT_PIXELS = 64_000_000
MAX_INPUT_SIDE = 2048


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


def load_rgba(path: str | Path, notes: list[str] | None = None) -> np.ndarray:
    """An input picture as straight-alpha RGBA float [H, W, 4] in [0, 1].

    RGBA (or LA / paletted with transparency) keeps its alpha; an opaque image must be an
    object on a plain background (:func:`estimate_background`). A picture of more than
    ``MAX_INPUT_PIXELS`` is refused before it is decoded; one whose longest side exceeds
    ``MAX_INPUT_SIDE`` is downscaled to it, and a note saying so is appended to ``notes``.
    """
    try:
        img = Image.open(path)
        w, h = img.size
        if w * h > MAX_INPUT_PIXELS:
            raise InputImageError(f"{path}: the image is {w}x{h} pixels, more than the "
                                  f"{MAX_INPUT_PIXELS / 1e6:.0f} megapixels accepted; give a smaller picture")
        img.load()
    except Image.DecompressionBombError as err:
        raise InputImageError(f"{path}: the image is too large to read safely ({err})") from err
    except (OSError, ValueError, SyntaxError) as err:
        raise InputImageError(f"{path}: cannot read the image ({err})") from err
    has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
    img = img.convert("RGBA")
    if max(w, h) > MAX_INPUT_SIDE:
        scale = MAX_INPUT_SIDE / max(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)  # premultiplied: no colour from the background
        if notes is not None:
            notes.append(f"the image ({w}x{h}) was downscaled to {size[0]}x{size[1]} before it was prepared")
    rgba = np.asarray(img, dtype=np.float32) / 255.0
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


@dataclass(frozen=True)
class Settings:
    """What a run is given besides the image and the checkpoint (the CLI's flags).

    ``steps`` None: the checkpoint's ``edm.num_steps``; ``guidance`` None: the checkpoint's
    (min, max) classifier-free guidance; ``use_feedback`` False: the two-stage baseline on the
    same weights (``Ouroboros3D.sample(use_feedback=False)``).
    """

    seed: int = 0
    steps: int | None = None
    feedback_every: int = 1
    use_feedback: bool = True
    guidance: tuple[float, float] | None = None
    elevation: float = 0.0
    fill: float = 0.7
    orbit_frames: int = 60
    mesh: bool = True

    def check(self) -> None:
        """Raise ValueError with the CLI's message for a setting out of range."""
        if not 0.1 <= self.fill <= 1.0:
            raise ValueError(f"--fill {self.fill} not in [0.1, 1]")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps {self.steps} must be >= 1")
        if self.feedback_every < 1:
            raise ValueError(f"--feedback-every {self.feedback_every} must be >= 1")
        if self.orbit_frames < 1:
            raise ValueError(f"--orbit-frames {self.orbit_frames} must be >= 1")
        if not -90.0 < self.elevation < 90.0:
            raise ValueError(f"--elevation {self.elevation} not in (-90, 90) degrees")
        if self.guidance is not None:
            low, high = self.guidance
            if not 0.0 <= low <= high:
                raise ValueError(f"--guidance {low} {high}: need 0 <= min <= max")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"--seed {self.seed} not in [0, 2^63)")


def read_config(checkpoint: str | Path):
    """The checkpoint's ``OuroborosConfig`` (ValueError naming the folder when it has none)."""
    from model.config import OuroborosConfig
    from model.ouroboros import CONFIG_NAME

    return OuroborosConfig.load(Path(checkpoint) / CONFIG_NAME)


def prepare_input(image: str | Path, resolution: int, fill: float, notes: list[str] | None = None) -> np.ndarray:
    """Read, check and frame an input picture: [resolution, resolution, 4] straight alpha in
    [0, 1]. Raises :class:`InputImageError` with the message the CLI prints."""
    return recentre(load_rgba(image, notes), resolution, fill, str(image))


@dataclass
class Generated:
    """One run's results in memory. ``views`` [V, 3, H, W] in [0, 1]; ``gaussians`` [N, 14] on
    the CPU (model frame, +Z up); ``video`` [F, H, W, 3] uint8; ``timings`` seconds."""

    condition: torch.Tensor
    views: torch.Tensor
    gaussians: torch.Tensor
    video: np.ndarray
    steps: int
    timings: dict = field(default_factory=dict)


def generate(model, prepared: np.ndarray, settings: Settings, device: torch.device,
             callback: Callable | None = None, progress: bool = True) -> Generated:  # fmt: skip
    """Algorithm 2 on one prepared image (``Ouroboros3D.sample`` with ``callback``: see
    ``model.sampling.sample_euler``), then the Gaussians' orbit video."""
    cfg = model.config
    bg = float(cfg.background)
    steps = settings.steps or cfg.edm.num_steps
    cond = condition_image(prepared, bg).to(device)
    c2w, K = view_cameras(cfg.num_views, settings.elevation, cfg.resolution)
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.sample(cond, c2w.to(device), K.to(device), num_steps=steps,
                           feedback_every=settings.feedback_every, guidance=settings.guidance,
                           generator=generator, progress=progress, use_feedback=settings.use_feedback,
                           callback=callback)  # fmt: skip
        sampled = time.perf_counter()
        video = render_orbit(out.gaussians[:1], settings.elevation, cfg.resolution,
                             settings.orbit_frames, bg)  # fmt: skip
    timings = dict(sample_s=sampled - start, orbit_s=time.perf_counter() - sampled)
    return Generated(condition=cond[0].cpu(), views=out.views[0].clamp(0, 1).cpu(),
                     gaussians=out.gaussians[0].detach().cpu(), video=video, steps=steps, timings=timings)  # fmt: skip


def write_outputs(result: Generated, output: str | Path, mesh: bool = True) -> tuple[list[str], list[str]]:
    """Write ``input.png``, ``views.png``, ``gaussians.ply``, ``orbit.mp4`` and (``mesh``)
    ``mesh.glb`` into ``output``. Returns (the names written, warnings)."""
    from model.gaussians_ply import save_ply

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    save_png(output / "input.png", to_uint8(result.condition))
    save_png(output / "views.png", views_grid(result.views))
    save_ply(result.gaussians, output / "gaussians.ply")
    write_mp4(output / "orbit.mp4", result.video)
    written, warnings = ["input.png", "views.png", "gaussians.ply", "orbit.mp4"], []
    if mesh:
        from inference.export_mesh import write_mesh
        from inference.mesh_from_gaussians import mesh_from_gaussians

        start = time.perf_counter()
        try:
            write_mesh(mesh_from_gaussians(result.gaussians), output / "mesh.glb")
            written.append("mesh.glb")
        except ValueError as err:  # e.g. Gaussians too faint to have a surface
            warnings.append(f"no mesh.glb: {err}")
        result.timings["mesh_s"] = time.perf_counter() - start
    return written, warnings


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m inference.image_to_3d",
                                description="Image-to-3D with an Ouroboros3D checkpoint.")
    p.add_argument("--image", required=True, type=Path, help="RGBA, or RGB on a plain background")
    p.add_argument("--checkpoint", default="tiny",
                   help="Ouroboros3D export folder, or a shipped one's name (default: tiny, pretrained/tiny)")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: the checkpoint config's edm.num_steps, the paper's 25)")
    p.add_argument("--feedback-every", type=int, default=1)
    p.add_argument("--no-feedback", action="store_true",
                   help="the two-stage baseline: zero 3D feedback, reconstruct only at the end")
    p.add_argument("--guidance", type=float, nargs=2, metavar=("MIN", "MAX"), default=None,
                   help="per-frame classifier-free guidance range (default: the checkpoint's)")
    p.add_argument("--elevation", type=float, default=0.0,
                   help="elevation (degrees) assumed for the input view")
    p.add_argument("--fill", type=float, default=0.7,
                   help="longest side of the object's box as a fraction of the image")
    p.add_argument("--orbit-frames", type=int, default=60)
    p.add_argument("--no-mesh", action="store_true", help="do not write mesh.glb")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(seed=args.seed, steps=args.steps, feedback_every=args.feedback_every,
                    use_feedback=not args.no_feedback,
                    guidance=tuple(args.guidance) if args.guidance is not None else None,
                    elevation=args.elevation, fill=args.fill, orbit_frames=args.orbit_frames,
                    mesh=not args.no_mesh)  # fmt: skip


def resolve_device(name: str) -> torch.device:
    """``auto`` = CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = settings_from_args(args)
    notes: list[str] = []
    try:  # every check on the inputs happens before the (slow) model load
        settings.check()
        rgba = load_rgba(args.image, notes)
        checkpoint = resolve_checkpoint(args.checkpoint)
        cfg = read_config(checkpoint)
        prepared = recentre(rgba, cfg.resolution, settings.fill, str(args.image))
    except (InputImageError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    from model.ouroboros import Ouroboros3D

    device = resolve_device(args.device)
    model = Ouroboros3D.from_pretrained(checkpoint).to(device).eval()
    result = generate(model, prepared, settings, device)
    written, warnings = write_outputs(result, args.output, settings.mesh)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {args.output}/{{{', '.join(written)}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
