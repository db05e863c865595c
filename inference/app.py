"""A browser app for any Ouroboros3D checkpoint: one image in; views, Gaussians, mesh and video
out; the recursion of Algorithm 2 shown step by step.

    python -m inference.app [--checkpoint DIR|tiny] [--host 127.0.0.1] [--port N] [--device auto]
        [--max-queue 8] [--work-dir DIR]

Without ``--checkpoint`` it serves the tiny stages shipped in ``pretrained/tiny``
(``model.shipped``).

The steps are :mod:`inference.image_to_3d`'s (``prepare_input``, ``generate``, ``write_outputs``):
the same refusals and messages, and the same files for the same image, seed and settings. The
sampler's callback (``model.sampling.sample_euler``) streams each denoising step into the page:
the decoded x0 prediction of the 8 views and the renders of that step's 3D reconstruction that
are fed back (RGB and CCM).

Serving: one generation at a time (``default_concurrency_limit=1``) with a bounded queue
(``--max-queue``), bound to 127.0.0.1 unless ``--host`` says otherwise, never shared. Each
browser session writes into its own folder under the work folder, removed when the session
ends (the tab closes) and, with the whole work folder, when the server stops. The checkpoint
is loaded and checked before anything is served: a missing or corrupt one exits with code 2
and a message naming the folder. The API endpoint ``/generate`` (``gradio_client``) returns the
CLI's files: ``input.png``, ``views.png``, ``gaussians.ply``, ``mesh.glb``, ``orbit.mp4``, and
a zip of everything with ``manifest.json``.
"""

import argparse
import hashlib
import json
import os
import platform
import queue
import random
import re
import shutil
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import asdict
from importlib import metadata, resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from inference import image_to_3d as i23
from model.shipped import resolve_checkpoint

TILE = 128  # px of one view in the streamed step picture
MAX_STEPS = 100
PACKAGES = ("ouroboros3d", "torch", "diffusers", "transformers", "gradio", "gradio_client", "numpy", "pillow")


class CheckpointError(RuntimeError):
    """The checkpoint cannot be served; the message names the folder."""


class Cancelled(Exception):
    """The request that started a sampling run went away."""


# ------------------------------------------------------------------ pure helpers (tested alone)
def checkerboard(size: int, square: int = 8) -> np.ndarray:
    """[size, size, 3] float grey checkerboard (0.8 / 0.6), to show transparency."""
    yy, xx = np.mgrid[0:size, 0:size] // square
    return np.where(((yy + xx) % 2 == 0)[..., None], 0.8, 0.6) * np.ones(3)


def preview_image(prepared: np.ndarray, min_size: int = 256) -> np.ndarray:
    """The prepared condition image (straight-alpha RGBA [H, W, 4] in [0, 1]) over a
    checkerboard, enlarged with nearest-neighbour to at least ``min_size``: uint8 [S, S, 3]."""
    h = prepared.shape[0]
    board = checkerboard(h, max(1, h // 8))
    rgb = prepared[..., :3] * prepared[..., 3:] + board * (1.0 - prepared[..., 3:])
    img = (rgb * 255.0 + 0.5).astype(np.uint8)
    factor = max(1, -(-min_size // h))
    return np.repeat(np.repeat(img, factor, 0), factor, 1)


def _tiles(images: torch.Tensor | None, count: int, tile: int) -> np.ndarray:
    """[V, 3, H, W] in [0, 1] (or None: grey) -> one row [tile, count * tile, 3] uint8."""
    if images is None:
        return np.full((tile, count * tile, 3), 128, np.uint8)
    arr = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    resample = Image.Resampling.NEAREST if arr.shape[1] <= tile else Image.Resampling.BILINEAR
    return np.concatenate([np.asarray(Image.fromarray(a).resize((tile, tile), resample)) for a in arr], 1)


def step_picture(views: torch.Tensor, renders: dict | None, tile: int = TILE) -> np.ndarray:
    """One denoising step as a picture: rows = the decoded x0 prediction of the views, the 3D
    feedback's RGB renders, its CCM renders (grey rows while there is no reconstruction yet).

    Args:
        views: [V, 3, H, W] in [0, 1].  renders: ``render_gaussians``'s dict of one batch item
        ([V, 3, H, W] ``rgb`` and ``ccm``), or None.
    Returns:
        uint8 [3 * tile + 2 * 4, V * tile, 3] (4 px white between rows).
    """
    count = views.shape[0]
    rows = [_tiles(views, count, tile),
            _tiles(None if renders is None else renders["rgb"], count, tile),
            _tiles(None if renders is None else renders["ccm"], count, tile)]  # fmt: skip
    gap = np.full((4, count * tile, 3), 255, np.uint8)
    return np.concatenate([rows[0], gap, rows[1], gap, rows[2]], 0)


# world (model frame of the input: +Z up, the input camera on +X) -> the input camera's OpenCV
# axes at the object's centre (x right = world +Y, y down = world -Z, z forward = world -X)
WORLD_TO_INPUT_CAMERA = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [-1.0, 0.0, 0.0]])


def gaussians_for_viewer(g: torch.Tensor) -> torch.Tensor:
    """Gaussians [N, 14] of the world frame turned into the input camera's OpenCV axes
    (``WORLD_TO_INPUT_CAMERA``): the frame of the captures 3DGS viewers are made for (y down),
    in which gradio's splat viewer (gsplat.js) opens with the input's view, upright. Centres and
    rotations turned, the rest unchanged."""
    from model.gaussians import matrix_to_quaternion, quaternion_multiply

    R = torch.tensor(WORLD_TO_INPUT_CAMERA, dtype=g.dtype)
    out = g.clone()
    out[:, 0:3] = g[:, 0:3] @ R.T
    out[:, 7:11] = quaternion_multiply(matrix_to_quaternion(R).expand(g.shape[0], 4), g[:, 7:11])
    return out


def hash_folder(path: Path) -> str:
    """sha256 of every file of a folder (relative names and contents, in sorted order)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def example_images() -> list[str]:
    """The committed example condition images (inference/examples/*.png)."""
    folder = resources.files("inference") / "examples"
    return sorted(str(p) for p in Path(str(folder)).glob("*.png"))


def user_message(err: Exception, upload: str | None, name: str | None) -> str:
    """The CLI's message, with the server's temporary upload path replaced by the file's name."""
    text = str(err)
    if upload and name:
        text = text.replace(str(upload), name)
    return text


# ------------------------------------------------------------------ the served model
def load_checkpoint(path: str | Path, device: torch.device):
    """Load and check a checkpoint (a folder, or a shipped one's name) before serving it. Returns
    (folder, model, config, sha256 of the folder). Raises :class:`CheckpointError` naming it."""
    from model.ouroboros import Ouroboros3D

    try:
        path = resolve_checkpoint(path)
    except FileNotFoundError as err:
        raise CheckpointError(str(err)) from err
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    try:
        cfg = i23.read_config(path)
        model = Ouroboros3D.from_pretrained(path).to(device).eval()
    except Exception as err:  # noqa: BLE001 - any failure to load means: do not serve it
        raise CheckpointError(f"checkpoint folder {path} cannot be loaded: {type(err).__name__}: {err}") from err
    return path, model, cfg, hash_folder(path)


class Generator:
    """The app's generation: one served model, a folder per session, a run per click."""

    def __init__(self, model, config, checkpoint: Path, checkpoint_sha256: str, device: torch.device,
                 work_dir: Path):
        self.model, self.config, self.device = model, config, device
        self.checkpoint, self.checkpoint_sha256 = checkpoint, checkpoint_sha256
        self.work_dir = work_dir
        self.runs = 0
        self.lock = threading.Lock()

    def session_dir(self, session: str | None) -> Path:
        name = re.sub(r"[^A-Za-z0-9_-]", "_", session or "anonymous")[:64]
        return self.work_dir / name

    def end_session(self, session: str | None) -> None:
        shutil.rmtree(self.session_dir(session), ignore_errors=True)

    def settings(self, seed, randomize, steps, guidance_min, guidance_max, feedback, elevation, fill,
                 orbit_frames, mesh) -> i23.Settings:  # fmt: skip
        """The run's settings from the page's controls; ValueError with the CLI's message."""
        try:
            seed = random.SystemRandom().randrange(2**31) if randomize else int(seed)
            settings = i23.Settings(seed=seed, steps=int(steps), use_feedback=bool(feedback),
                                    guidance=(float(guidance_min), float(guidance_max)),
                                    elevation=float(elevation), fill=float(fill),
                                    orbit_frames=int(orbit_frames), mesh=bool(mesh))  # fmt: skip
        except (TypeError, ValueError) as err:
            raise ValueError(f"a setting is not a number: {err}") from err
        settings.check()
        if settings.steps > MAX_STEPS:
            raise ValueError(f"--steps {settings.steps}: at most {MAX_STEPS} in the app")
        return settings

    def prepare(self, upload: str | None, fill: float, name: str | None = None) -> tuple[np.ndarray, list[str]]:
        """The prepared condition image and notes; ValueError with the CLI's message."""
        if not upload:
            raise ValueError("no image: upload an RGBA image, or an RGB image on a plain background")
        notes: list[str] = []
        try:
            return i23.prepare_input(upload, self.config.resolution, fill, notes), notes
        except (i23.InputImageError, ValueError) as err:
            raise ValueError(user_message(err, upload, name or Path(upload).name)) from err

    def run(self, upload: str, settings: i23.Settings, session: str | None, events: "queue.Queue",
            stop: threading.Event, name: str | None = None) -> None:
        """One generation; puts ("step", step, steps, sigma, picture), then ("done", dict) or
        ("error", message) on ``events``. Runs in a thread of its own."""
        try:
            timings = {"start": time.perf_counter()}
            started_at = time.time()
            prepared, notes = self.prepare(upload, settings.fill, name)
            with self.lock:
                self.runs += 1
                run_id = self.runs
            session_dir = self.session_dir(session)
            for old in session_dir.glob("run-*"):  # one run's files per session at a time
                shutil.rmtree(old, ignore_errors=True)
            out = session_dir / f"run-{run_id:04d}"
            (out / "steps").mkdir(parents=True)
            steps = settings.steps or self.config.edm.num_steps

            def callback(step, sigma, x, denoised, gaussians, renders):
                if stop.is_set():
                    raise Cancelled()
                views = self.model.decode_latents(denoised)[0]
                picture = step_picture(views, None if renders is None else {k: renders[k][0] for k in ("rgb", "ccm")})
                Image.fromarray(picture).save(out / "steps" / f"step_{step:03d}.png")
                if step == 0:
                    timings["first_step_s"] = time.perf_counter() - timings["start"]
                events.put(("step", step, steps, float(sigma), picture))

            result = i23.generate(self.model, prepared, settings, self.device, callback=callback, progress=False)
            written, warnings = i23.write_outputs(result, out, settings.mesh)
            from model.gaussians_ply import save_ply

            (out / "viewer").mkdir()  # the app's own copy for the 3D viewer, beside the CLI's files
            save_ply(gaussians_for_viewer(result.gaussians), out / "viewer" / "gaussians_view.ply")
            timings.update(result.timings, total_s=time.perf_counter() - timings.pop("start"))
            manifest = self.manifest(settings, result.steps, upload, name, notes, warnings, written, timings)
            manifest.update(started_at=round(started_at, 3), finished_at=round(time.time(), 3))  # Unix time
            (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
            archive = out / f"ouroboros3d_seed{settings.seed}.zip"
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
                for file in sorted(p for p in out.rglob("*") if p.is_file() and p != archive):
                    zf.write(file, file.relative_to(out))
            events.put(("done", dict(out=out, written=written, warnings=warnings, notes=notes, result=result,
                                     archive=archive, manifest=manifest)))
        except Cancelled:
            events.put(("error", "cancelled"))
        except ValueError as err:
            events.put(("error", str(err)))
        except Exception as err:  # noqa: BLE001 - a failed run must not take the server down
            import traceback

            traceback.print_exc()
            events.put(("error", f"generation failed: {type(err).__name__}: {err}"))

    def manifest(self, settings, steps, upload, name, notes, warnings, written, timings) -> dict:
        with open(upload, "rb") as handle:
            input_sha = hashlib.sha256(handle.read()).hexdigest()
        return dict(
            settings={**asdict(settings), "steps": steps,
                      "guidance": list(settings.guidance) if settings.guidance else None},
            seed=settings.seed,
            checkpoint=dict(path=str(self.checkpoint.resolve()), sha256=self.checkpoint_sha256,
                            resolution=self.config.resolution, num_views=self.config.num_views,
                            feedback=self.config.feedback),
            input=dict(name=name or Path(upload).name, sha256=input_sha),
            device=str(self.device),
            timings_s={k: round(v, 3) for k, v in timings.items()},
            notes=notes, warnings=warnings, files=written,
            versions=package_versions(),
            cli=cli_command(settings, name or Path(upload).name, self.checkpoint),
        )


def cli_command(settings: i23.Settings, image: str, checkpoint: Path) -> str:
    """The ``python -m inference.image_to_3d`` command that writes the same files."""
    parts = ["python -m inference.image_to_3d", f"--image {image}", f"--checkpoint {checkpoint}", "--output OUT",
             f"--seed {settings.seed}", f"--steps {settings.steps}", f"--fill {settings.fill}",
             f"--elevation {settings.elevation}", f"--orbit-frames {settings.orbit_frames}"]
    if settings.guidance is not None:
        parts.append(f"--guidance {settings.guidance[0]} {settings.guidance[1]}")
    if not settings.use_feedback:
        parts.append("--no-feedback")
    if not settings.mesh:
        parts.append("--no-mesh")
    return " ".join(parts)


# ------------------------------------------------------------------ the page
def build_app(gen: Generator, max_queue: int = 8):
    import gradio as gr

    cfg = gen.config
    has_feedback = cfg.feedback != "none"

    def preview(upload, fill):
        if not upload:
            return None, ""
        try:
            prepared, notes = gen.prepare(upload, fill)
        except ValueError as err:
            return None, f"**Refused:** {err}"
        text = "Condition image as the model will see it (checkerboard = transparent)."
        return preview_image(prepared), " ".join([text, *(f"Note: {n}." for n in notes)])

    def generate(upload, fill, seed, randomize, steps, guidance_min, guidance_max, feedback, elevation,
                 orbit_frames, mesh, request: gr.Request, progress=gr.Progress()):
        """Image to 3D: returns the seed used, the last step picture, its caption, the views, the
        orbit video, the Gaussians (the viewer's copy), the downloads, a summary and the mesh's path
        (a State: shown by a chained event, see below)."""
        try:
            settings = gen.settings(seed, randomize, steps, guidance_min, guidance_max, feedback, elevation,
                                    fill, orbit_frames, mesh)
            gen.prepare(upload, settings.fill)  # refuse a bad image before queueing the sampler
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from None
        session = getattr(request, "session_hash", None) if request is not None else None
        events: queue.Queue = queue.Queue()
        stop = threading.Event()
        worker = threading.Thread(target=gen.run, args=(upload, settings, session, events, stop), daemon=True)
        progress(0, desc="encoding the condition image")
        worker.start()
        try:
            while True:
                kind, *payload = events.get()
                if kind == "step":
                    step, total, sigma, picture = payload
                    progress((step + 1, total), desc="denoising step", unit="steps")
                    caption = (f"Step {step + 1}/{total} (sigma {sigma:.3f}). Rows: the denoised views "
                               "(x0 prediction), the 3D feedback's RGB renders, its CCM renders.")
                    yield (settings.seed, picture, caption, *[gr.skip()] * 6)
                elif kind == "error":
                    raise gr.Error(payload[0], print_exception=False)
                else:
                    done = payload[0]
                    break
        finally:
            stop.set()
            worker.join()
        out = done["out"]
        result = done["result"]
        views = [((v.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8), f"view {i}: azimuth {i * 45} deg")
                 for i, v in enumerate(result.views)]  # fmt: skip
        mesh_path = str(out / "mesh.glb") if "mesh.glb" in done["written"] else None
        downloads = [str(out / n) for n in done["written"]] + [str(done["archive"])]
        timings = done["manifest"]["timings_s"]
        lines = [f"Seed {settings.seed}, {result.steps} steps, guidance {settings.guidance[0]:g}-"
                 f"{settings.guidance[1]:g}, feedback {'on' if settings.use_feedback and has_feedback else 'off'}: "
                 f"{timings.get('total_s', 0):.1f} s (first step after {timings.get('first_step_s', 0):.1f} s)."]
        lines += [f"Note: {n}." for n in done["notes"]] + [f"Warning: {w}." for w in done["warnings"]]
        last = sorted((out / "steps").glob("*.png"))[-1]
        yield (settings.seed, str(last), gr.skip(), views, str(out / "orbit.mp4"),
               str(out / "viewer" / "gaussians_view.ply"), downloads, "\n\n".join(lines), mesh_path)

    def end_session(request: gr.Request):
        gen.end_session(getattr(request, "session_hash", None))

    title = f"Ouroboros3D: image to 3D ({gen.checkpoint.name}, {cfg.resolution} px, {cfg.num_views} views)"
    with gr.Blocks(title="Ouroboros3D", delete_cache=(600, 3600)) as demo:
        gr.Markdown(f"# {title}\n3D-aware recursive diffusion (Algorithm 2): at each denoising step the "
                    "views are reconstructed as 3D Gaussians, rendered and fed back. Checkpoint "
                    f"`{gen.checkpoint}` (sha256 {gen.checkpoint_sha256[:12]}), device {gen.device}.")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Image: RGBA (alpha = the object's mask) or RGB on a plain background",
                                 type="filepath", elem_id="upload")
                fill = gr.Slider(0.1, 1.0, value=0.7, step=0.05, label="Foreground ratio (--fill)", elem_id="fill")
                preview_img = gr.Image(label="Prepared condition image", type="numpy", interactive=False,
                                       format="png", height=256, elem_id="preview")
                message = gr.Markdown(elem_id="message")
            with gr.Column(scale=1):
                with gr.Row():
                    seed = gr.Number(0, precision=0, label="Seed", minimum=0)
                    randomize = gr.Checkbox(False, label="Randomize seed")
                steps = gr.Slider(1, MAX_STEPS, value=cfg.edm.num_steps, step=1, label="Denoising steps",
                                  elem_id="steps")
                with gr.Row():
                    gmin = gr.Slider(0.0, 10.0, value=cfg.conditioning.min_guidance, step=0.1,
                                     label="Guidance, first view (min)")
                    gmax = gr.Slider(0.0, 10.0, value=cfg.conditioning.max_guidance, step=0.1,
                                     label="Guidance, last view (max)")
                feedback = gr.Checkbox(has_feedback, label="3D feedback (off: the two-stage baseline)",
                                       interactive=has_feedback)
                elevation = gr.Slider(-30, 60, value=0, step=1, label="Input elevation (degrees)")
                with gr.Accordion("More", open=False):
                    orbit_frames = gr.Slider(4, 120, value=60, step=1, label="Orbit video frames",
                                             elem_id="orbit_frames")
                    mesh = gr.Checkbox(True, label="Mesh (.glb)")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                seed_used = gr.Number(label="Seed used", interactive=False, precision=0, elem_id="seed_used")
                summary = gr.Markdown(elem_id="summary")
        step_img = gr.Image(label="The recursion, live", type="numpy", interactive=False, format="png",
                            elem_id="step")
        step_caption = gr.Markdown(elem_id="step_caption")
        gallery = gr.Gallery(label="Generated views", columns=8, height=240, object_fit="contain", elem_id="views")
        with gr.Row():
            video = gr.Video(label="Orbit video", autoplay=True, loop=True, elem_id="video")
            splat = gr.Model3D(label="Gaussians (.ply; opens at the input view, upright)", elem_id="gaussians",
                               height=360)
            mesh_view = gr.Model3D(label="Mesh (.glb, +Y up)", elem_id="mesh", height=360,
                                   camera_position=(0, 75, None))
        downloads = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="downloads")
        mesh_path = gr.State(None)
        examples = example_images()
        if examples:
            gr.Examples(examples=[[p] for p in examples], inputs=[upload], cache_examples=False,
                        label="Examples: held-out demo objects rendered by the project's renderer")

        upload.change(preview, [upload, fill], [preview_img, message], queue=False, api_name=False)
        fill.release(preview, [upload, fill], [preview_img, message], queue=False, api_name=False)
        # gradio 6.31's babylon viewer stays blank when a streaming (generator) event sets it, while
        # the splat viewer does not: the mesh goes through a State and a chained plain event.
        button.click(generate, [upload, fill, seed, randomize, steps, gmin, gmax, feedback, elevation,
                                orbit_frames, mesh],
                     [seed_used, step_img, step_caption, gallery, video, splat, downloads, summary, mesh_path],
                     api_name="generate", concurrency_limit=1).then(
            lambda path: path, mesh_path, mesh_view, api_name=False, queue=False)  # fmt: skip
        demo.unload(end_session)
    demo.queue(default_concurrency_limit=1, max_size=max_queue)
    return demo


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m inference.app",
                                description="Serve an Ouroboros3D checkpoint in the browser.")
    p.add_argument("--checkpoint", default="tiny",
                   help="Ouroboros3D export folder, or a shipped one's name (default: tiny, pretrained/tiny)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--max-queue", type=int, default=8, help="requests waiting at most; more are refused")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="folder for the sessions' files (default: a temporary folder, removed at exit)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    device = i23.resolve_device(args.device)
    try:
        checkpoint, model, cfg, digest = load_checkpoint(args.checkpoint, device)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    own_work_dir = args.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="ouroboros3d-app-")) if own_work_dir else args.work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    gen = Generator(model, cfg, checkpoint, digest, device, work_dir)
    demo = build_app(gen, args.max_queue)
    print(f"serving {checkpoint} (sha256 {digest[:12]}) on http://{args.host}:{args.port}", flush=True)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=False, allowed_paths=[str(work_dir)],
                    ssr_mode=False, show_error=True, quiet=True)
    finally:
        if own_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
