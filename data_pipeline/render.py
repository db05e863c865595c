"""Render one object: 2 orbits x 16 frames of RGBA + canonical coordinate map (CCM) + cameras.

:func:`render_object` is the entry point (docs/interfaces.md). Blender runs in a separate
worker process (:mod:`data_pipeline.blender_worker`, driven by
:mod:`data_pipeline.blender_process`) under a timeout and a memory cap, one process per object
or one kept alive across objects; this module never imports ``bpy``. The worker returns RGBA and the z-depth of each pixel
centre's ray; the CCM is computed here from the depth (docs/design.md section 2)::

    X_cam = d K^-1 (u + 0.5, v + 0.5, 1)^T,  X_world = c2w X_cam,  ccm = X_world + 0.5

Alpha conventions (also in docs/rendering.md): the CCM is non-zero exactly where
``alpha > 0``; pixels whose centre ray misses the surface but that the antialiased alpha
covers (silhouette pixels) take the CCM of the nearest pixel whose centre ray hits. Where a
binary object mask is needed it is ``alpha >= OBJECT_ALPHA_THRESHOLD`` (128 of 255).
"""

from __future__ import annotations

import dataclasses
import json
import struct
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
from scipy import ndimage

from common import conventions as C
from common.orbit import OrbitRender
from data_pipeline.blender_process import BlenderProcess

SUPPORTED_SUFFIXES = (".glb", ".gltf", ".obj", ".ply")
DEVICES = ("auto", "cpu", "cuda", "optix")
OBJECT_ALPHA_THRESHOLD = 128  # uint8 alpha at or above which a pixel counts as object
RENDERER_NAME = "blender-cycles (BlenderProc API)"
_LOG_TAIL_CHARS = 2000
# Failures of the process rather than of the input: in a reused process, retried on a fresh one.
PROCESS_FAULTS = ("timeout", "worker_crashed", "incomplete_output")
FRESH_RETRY_WARNING = "rendered on a fresh Blender worker after a failure in a reused one:"


@dataclass(frozen=True)
class RenderSettings:
    """How to render. ``frames`` selects a subset of the 16 orbit frames (previews, tests);
    shards need all 16, so the data pipeline leaves it ``None``."""

    resolution: int = C.DEFAULT_RESOLUTION
    samples: int = 32
    radius: float = C.DEFAULT_RADIUS
    fov_deg: float = C.DEFAULT_FOV_DEG
    num_orbits: int = C.NUM_ORBITS
    device: str = "auto"  # auto | cpu | cuda | optix
    timeout_s: float = 900.0
    memory_limit_gb: float = 8.0
    denoise: bool = True  # Intel Open Image Denoise on the colour pass
    obj_up_axis: str = "y"  # OBJ files: "y" (Blender's default, like glTF) or "z" (kept as is)
    frames: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ValueError(f"device {self.device!r} not in {DEVICES}")
        if self.obj_up_axis not in ("y", "z"):
            raise ValueError(f"obj_up_axis {self.obj_up_axis!r} not in ('y', 'z')")
        if not 1 <= self.num_orbits <= C.NUM_ORBITS:
            raise ValueError(f"num_orbits {self.num_orbits} not in 1..{C.NUM_ORBITS}")
        if self.resolution < 8 or self.samples < 1:
            raise ValueError(f"resolution {self.resolution} / samples {self.samples} too small")
        if self.frames is not None:
            if not self.frames or any(f not in range(C.NUM_FRAMES) for f in self.frames):
                raise ValueError(f"frames {self.frames} must be a non-empty subset of 0..15")

    @property
    def frame_indices(self) -> np.ndarray:
        """Indices of the orbit frames to render. Returns int [F]."""
        return np.arange(C.NUM_FRAMES) if self.frames is None else np.asarray(self.frames)


class RenderError(RuntimeError):
    """Rendering failed. ``reason``: short machine-readable string; ``str()``: human message."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ----------------------------------------------------------------------------- input checks
def check_mesh_file(mesh_path: Path) -> None:
    """Fast checks that fail before Blender starts: existence, format, emptiness, glTF headers.

    Raises:
        RenderError with reason ``missing_file``, ``unsupported_format``, ``empty_file``,
        ``not_gltf``, ``truncated`` or ``invalid_gltf``.
    """
    if not mesh_path.is_file():
        raise RenderError("missing_file", f"{mesh_path}: no such file")
    suffix = mesh_path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise RenderError("unsupported_format",
                          f"{mesh_path}: format {suffix!r} not in {SUPPORTED_SUFFIXES}")
    size = mesh_path.stat().st_size
    if size == 0:
        raise RenderError("empty_file", f"{mesh_path}: the file is empty")
    if suffix == ".glb":
        with mesh_path.open("rb") as f:
            header = f.read(12)
        if len(header) < 12 or header[:4] != b"glTF":
            raise RenderError("not_gltf", f"{mesh_path}: not a binary glTF (no 'glTF' magic)")
        _, declared = struct.unpack("<II", header[4:])
        if declared > size:
            raise RenderError("truncated",
                              f"{mesh_path}: truncated ({size} of {declared} bytes declared)")
    elif suffix == ".gltf":
        try:
            json.loads(mesh_path.read_bytes())
        except (ValueError, UnicodeDecodeError) as exc:
            raise RenderError("invalid_gltf", f"{mesh_path}: not valid glTF JSON: {exc}")


# ----------------------------------------------------------------------------- cameras
def orbit_cameras(uid: str, orbit: int, settings: RenderSettings) -> dict:
    """The cameras of one orbit (docs/design.md section 2), seeded by ``uid``.

    Returns dict(elevation float, azimuths [F] degrees, c2w [F, 4, 4] OpenCV, K [F, 3, 3]).
    """
    elevation, azimuth_start = C.draw_orbit(uid, orbit)
    azimuths = C.orbit_azimuths(azimuth_start)[settings.frame_indices]
    c2w = C.orbit_c2w(elevation, azimuths, settings.radius)
    K = np.broadcast_to(C.intrinsics(settings.fov_deg, settings.resolution), (len(azimuths), 3, 3))
    return {"elevation": elevation, "azimuths": azimuths, "c2w": c2w, "K": K}


# ----------------------------------------------------------------------------- CCM
def ccm_from_depth(depth: np.ndarray, alpha: np.ndarray, K: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    """Canonical coordinate map of one frame from its pixel-centre z-depth (docs/design.md section 2).

    Pixels with ``alpha > 0`` whose centre ray misses (``depth`` not finite) take the CCM of
    the nearest pixel that hits; pixels with ``alpha == 0`` are 0.

    Args:
        depth: [H, W] z-depth, ``inf`` where the centre ray misses.  alpha: [H, W] uint8.
        K: [3, 3] pixels.  c2w: [4, 4] OpenCV.
    Returns:
        float32 [H, W, 3] in [0, 1].
    """
    hit = np.isfinite(depth)
    covered = alpha > 0
    if not hit.any():
        return np.zeros(depth.shape + (3,), dtype=np.float32)
    points = C.unproject_depth(np.where(hit, depth, 0.0), K, c2w)
    ccm = C.world_to_ccm(points)
    if (covered & ~hit).any():
        _, (rows, cols) = ndimage.distance_transform_edt(~hit, return_indices=True)
        ccm = ccm[rows, cols]
    ccm[~covered] = 0.0
    return np.clip(ccm, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------- worker
def _run_once(job: dict, workdir: Path, settings: RenderSettings, worker: BlenderProcess) -> tuple[dict, dict]:
    job_path = workdir / "job.json"
    job_path.write_text(json.dumps(job))
    mesh = job["mesh_path"]
    outcome = worker.run(job_path, settings.timeout_s)
    if outcome.timed_out:
        raise RenderError("timeout", f"{mesh}: Blender worker exceeded {settings.timeout_s} s")
    error_path, npz_path, result_path = (workdir / n for n in ("error.json", "render.npz", "result.json"))
    if error_path.exists():
        error = json.loads(error_path.read_text())
        raise RenderError(error["reason"], f"{mesh}: {error['message']}")
    if not (npz_path.exists() and result_path.exists()):
        raise RenderError(
            "worker_crashed",
            f"{mesh}: Blender worker exited with code {outcome.exit_code} without output "
            f"(memory limit {settings.memory_limit_gb} GB); log tail:\n{outcome.log_tail}",
        )
    with np.load(npz_path) as data:
        arrays = {k: data[k] for k in data.files}
    n = len(job["c2w"])
    res = job["resolution"]
    if arrays["rgba"].shape != (n, res, res, 4) or arrays["depth"].shape != (n, res, res):
        raise RenderError("incomplete_output",
                          f"{mesh}: worker returned {arrays['rgba'].shape} for {n} frames at {res} px")
    return arrays, json.loads(result_path.read_text())


def run_worker(job: dict, workdir: Path, settings: RenderSettings,
               worker: BlenderProcess | None = None) -> tuple[dict, dict]:
    """Run the Blender worker on ``job`` in ``workdir``; returns (arrays, worker metadata).

    ``worker``: a persistent :class:`BlenderProcess` to render in; None starts a process for
    this job alone. The worker gets ``settings.timeout_s`` seconds and
    ``settings.memory_limit_gb`` of data memory; it is judged by its complete output
    (``render.npz`` + ``result.json``), not by its exit code alone. A timeout, crash or
    incomplete output in a process that had rendered other objects before (whose state might
    be to blame) kills that process, and the job is run once more on a fresh one; the
    metadata's warnings then say so (:data:`FRESH_RETRY_WARNING`).

    Raises:
        RenderError(``timeout`` | ``worker_crashed`` | ``incomplete_output`` | the worker's
        own reason, e.g. ``import_failed``, ``no_faces``).
    """
    if worker is None:
        with BlenderProcess(settings.memory_limit_gb) as one_shot:
            return _run_once(job, workdir, settings, one_shot)
    warm = worker.warm
    try:
        return _run_once(job, workdir, settings, worker)
    except RenderError as error:
        if not (warm and error.reason in PROCESS_FAULTS):
            raise
        first = f"{FRESH_RETRY_WARNING} {error.reason}: {str(error)[:_LOG_TAIL_CHARS]}"
    for name in ("error.json", "render.npz", "result.json"):
        (workdir / name).unlink(missing_ok=True)
    arrays, meta = _run_once(job, workdir, settings, worker)  # worker.warm is False now
    meta["warnings"] = [*meta["warnings"], first]
    return arrays, meta


def project_version() -> str:
    try:
        return metadata.version("ouroboros3d")
    except metadata.PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------- entry point
def render_object(mesh_path, uid: str, settings: RenderSettings = RenderSettings(),
                  source: str = "local", worker: BlenderProcess | None = None) -> list[OrbitRender]:
    """Render ``settings.num_orbits`` orbits of the object in ``mesh_path`` (.glb .gltf .obj .ply).

    Cameras come from ``uid`` (same uid -> same cameras). One worker process renders every
    frame of every orbit: ``worker`` (a persistent :class:`BlenderProcess`, reset between
    objects), or, when None, a process started for this object alone.

    Raises:
        RenderError on any failure (bad file, no faces, timeout, crash).
    """
    mesh_path = Path(mesh_path).resolve()
    try:
        C.sample_key(uid, 0)  # the uid must be usable as a shard key
    except ValueError as exc:
        raise RenderError("bad_uid", f"{mesh_path}: {exc}") from None
    check_mesh_file(mesh_path)
    orbits = [orbit_cameras(uid, k, settings) for k in range(settings.num_orbits)]
    with tempfile.TemporaryDirectory(prefix="render_") as tmp:
        job = {
            "mesh_path": str(mesh_path),
            "output_dir": tmp,
            "resolution": settings.resolution,
            "samples": settings.samples,
            "fov_deg": settings.fov_deg,
            "device": settings.device,
            "denoise": settings.denoise,
            "obj_up_axis": settings.obj_up_axis,
            "c2w": np.concatenate([o["c2w"] for o in orbits]).tolist(),
        }
        arrays, worker_meta = run_worker(job, Path(tmp), settings, worker)

    renderer = {
        "name": RENDERER_NAME,
        "blender_version": worker_meta["blender_version"],
        "device": worker_meta["device"],
        "settings": dataclasses.asdict(settings),
    }
    results, start = [], 0
    for k, cams in enumerate(orbits):
        frames = slice(start, start + len(cams["azimuths"]))
        start = frames.stop
        rgba, depth = arrays["rgba"][frames], arrays["depth"][frames]
        ccm = np.stack([ccm_from_depth(d, a[..., 3], K, c) for d, a, K, c
                        in zip(depth, rgba, cams["K"], cams["c2w"])])
        meta = {
            "uid": uid,
            "orbit": k,
            "frames": settings.frame_indices.tolist(),
            "elevation": cams["elevation"],
            "azimuths": cams["azimuths"].tolist(),
            "radius": settings.radius,
            "fov": settings.fov_deg,
            "resolution": settings.resolution,
            "normalization": worker_meta["normalization"],
            "mesh": worker_meta["mesh"],
            "source": source,
            "source_file": mesh_path.name,
            "renderer": renderer,
            "project_version": project_version(),
            "warnings": worker_meta["warnings"],
        }
        results.append(OrbitRender(key=C.sample_key(uid, k), rgba=rgba, ccm=ccm, c2w=cams["c2w"].astype(np.float32),
                                   K=np.array(cams["K"], dtype=np.float32), meta=meta))
    return results
