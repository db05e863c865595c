"""Blender worker: renders meshes from given cameras (RGBA + z-depth), one job after another.
Runs in its own process, kept alive across objects by its parent.

Usage (the parent, :mod:`data_pipeline.blender_process`, is the only caller)::

    python -m data_pipeline.blender_worker <reply-fd>

The worker reads job files from stdin, one path per line, until end of input. After each job
it writes one line to the file descriptor ``reply-fd`` (a pipe its parent passed), the JSON
``{"code": <exit code of the job>}``; its own stdout and stderr are Blender's log.

``job.json`` holds ``mesh_path``, ``output_dir``, ``resolution``, ``samples``, ``fov_deg``,
``device``, ``denoise``, ``obj_up_axis`` and ``c2w`` (a list of 4x4 OpenCV camera-to-world matrices, in the
normalised object frame). The worker writes into ``output_dir``, each file atomically:

* ``render.npz``: ``rgba`` uint8 [N, H, W, 4] (straight alpha), ``depth`` float32 [N, H, W]
  (z-depth of the surface seen through the pixel centre, ``inf`` where that ray misses);
* ``result.json``: normalisation (scale, offset, ``source_to_world``), mesh statistics,
  warnings (e.g. missing textures), the Blender version and the render device used;
* or ``error.json`` (``reason``, ``message``) when the input cannot be rendered.

Every job starts from the same state, whatever the process rendered before
(:func:`reset_blender` after each: factory settings, orphan data purged, BlenderProc's global
storage emptied), so a frame does not depend on the objects rendered before it.

Blender is driven through BlenderProc's API on the pip ``bpy`` module. ``bproc.init()`` fails on
that module (it sets a UI language the module lacks), so :func:`init_blenderproc` performs its
other steps. The process leaves with ``os._exit`` once its output is flushed, because the pip
``bpy`` module may crash at interpreter exit.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import signal
import sys
import traceback
from pathlib import Path

import numpy as np

os.environ.setdefault("OUTSIDE_OF_THE_INTERNAL_BLENDER_PYTHON_ENVIRONMENT_BUT_IN_RUN_SCRIPT", "1")

import bpy  # noqa: E402  (only ever imported in this worker process)
from blenderproc.python.camera import CameraUtility  # noqa: E402
from blenderproc.python.loader.ObjectLoader import load_obj  # noqa: E402
from blenderproc.python.renderer import RendererUtility  # noqa: E402
from blenderproc.python.types.MeshObjectUtility import MeshObject  # noqa: E402
from blenderproc.python.utility.GlobalStorage import GlobalStorage  # noqa: E402
from blenderproc.python.utility.Initializer import _Initializer, clean_up  # noqa: E402
from blenderproc.python.utility.Utility import Utility  # noqa: E402
from mathutils import Matrix  # noqa: E402

from common.atomic import atomic_path, atomic_write_text  # noqa: E402
from common.conventions import normalization_from_bounds, opencv_to_blender_c2w  # noqa: E402

# Axis conversion each importer applies, file coordinates -> Blender world (+Z up), and the
# importer arguments that make it so. glTF is +Y up by its specification (Blender's glTF
# importer converts, no option); OBJ has no defined up axis: +Y (Blender's default) or +Z
# (``obj_up_axis``); PLY is imported as is (+Z up).
Y_UP_TO_Z_UP = [[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]
IDENTITY = np.eye(3).tolist()
KEEP_AXES = {"forward_axis": "Y", "up_axis": "Z"}
Y_UP_AXES = {"forward_axis": "NEGATIVE_Z", "up_axis": "Y"}


def import_convention(suffix: str, obj_up_axis: str) -> tuple[list, dict]:
    """(3x3 file -> world rotation, importer keyword arguments) for a file suffix."""
    if suffix in (".glb", ".gltf"):
        return Y_UP_TO_Z_UP, {}
    if suffix == ".obj":
        return (Y_UP_TO_Z_UP, Y_UP_AXES) if obj_up_axis == "y" else (IDENTITY, KEEP_AXES)
    return IDENTITY, KEEP_AXES  # .ply


CLIP_START, CLIP_END = 0.05, 100.0
# Pixel filter of the geometry pass: (almost) a delta at the pixel centre, so that the
# z-depth belongs to the ray through the pixel centre, as the CCM convention assumes.
GEOMETRY_FILTER_WIDTH = 0.01
BEAUTY_FILTER_WIDTH = 1.5  # Cycles' default Blackman-Harris width: antialiased RGBA
LIGHT_BOUNCES = dict(diffuse_bounces=2, glossy_bounces=1, ao_bounces_render=2, max_bounces=4,
                     transmission_bounces=4, transparent_max_bounces=8, volume_bounces=0)


class WorkerError(Exception):
    """An input that cannot be rendered; ``reason`` is a short machine-readable string."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


# ----------------------------------------------------------------------------- setup
def reset_blender() -> None:
    """Back to the state of a fresh process: factory settings with an empty scene (every data
    block, the scene's settings, compositor nodes and preferences), orphan data purged, and
    BlenderProc's global storage (registered outputs, "enabled" flags) emptied."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.data.orphans_purge(do_local_ids=True, do_linked_ids=True, do_recursive=True)
    GlobalStorage._storage_dict.clear()  # BlenderProc has no public reset of its module state


def init_blenderproc(temp_dir: Path) -> None:
    """``bproc.init()`` without its UI-language step (absent from the pip ``bpy`` module).

    ``temp_dir`` receives BlenderProc's intermediate files (the ``blenderproc run`` command
    would set it).
    """
    temp_dir.mkdir(parents=True, exist_ok=True)
    Utility.temp_dir = str(temp_dir)
    clean_up(clean_up_camera=True)
    bpy.context.scene.render.engine = "CYCLES"
    _Initializer.set_default_parameters()
    GlobalStorage.add("bproc_init_complete", True)


def select_device(device: str) -> str:
    """Cycles device: ``auto`` = OptiX, else CUDA, else CPU; ``cuda``/``optix`` must exist.

    Returns the device type in use ("CPU", "CUDA" or "OPTIX").
    """
    if device == "cpu":
        RendererUtility.set_render_devices(use_only_cpu=True)
        return "CPU"
    wanted = {"auto": ["OPTIX", "CUDA"], "cuda": ["CUDA"], "optix": ["OPTIX"]}[device]
    RendererUtility.set_render_devices(desired_gpu_device_type=wanted)
    if bpy.context.scene.cycles.device == "GPU":
        return bpy.context.preferences.addons["cycles"].preferences.compute_device_type
    if device != "auto":
        raise WorkerError("device_unavailable", f"no {device.upper()} device found by Cycles")
    return "CPU"


def setup_scene(resolution: int, fov_deg: float, samples: int) -> None:
    """Camera intrinsics, even studio light, transparent film, Standard colour transform.

    The world is a uniform white environment of strength 1: a diffuse surface with albedo
    ``a`` that sees the whole sky renders as ``a`` (no hard shadows, no light placement to
    tune); concavities darken softly (ambient occlusion).
    """
    CameraUtility.set_intrinsics_from_blender_params(
        lens=math.radians(fov_deg),
        image_width=resolution,
        image_height=resolution,
        clip_start=CLIP_START,
        clip_end=CLIP_END,
        pixel_aspect_x=1,
        pixel_aspect_y=1,
        shift_x=0,
        shift_y=0,
        lens_unit="FOV",
    )
    bpy.context.scene.camera.data.sensor_fit = "AUTO"
    RendererUtility.set_world_background([1.0, 1.0, 1.0], strength=1.0)
    # "Standard": albedo textures come out as they are stored (no Filmic/AgX tone curve).
    RendererUtility.set_output_format(
        file_format="PNG", color_depth=8, enable_transparency=True, view_transform="Standard"
    )
    bpy.context.scene.view_settings.look = "None"
    RendererUtility.set_noise_threshold(0.0)  # fixed sample count: reproducible cost
    RendererUtility.set_max_amount_of_samples(samples)
    RendererUtility.set_light_bounces(**LIGHT_BOUNCES)


# ----------------------------------------------------------------------------- mesh
def import_mesh(mesh_path: Path, importer_kwargs: dict) -> list:
    """Import a .glb/.gltf/.obj/.ply file; returns the Blender mesh objects of the scene."""
    try:
        load_obj(str(mesh_path), **importer_kwargs)
    except Exception as exc:  # importers raise plain RuntimeErrors on bad files
        raise WorkerError("import_failed", f"Blender could not import it: {exc}")
    return [o for o in bpy.context.scene.objects if o.type == "MESH"]


def flatten_to_world(mesh_objects: list) -> None:
    """Bake each object's world transform into its own mesh data; remove every other object.

    Afterwards every mesh object has an identity transform and no parent, so vertex
    coordinates are world coordinates. Lights and cameras that came with the file go, so
    the studio light is the only light.
    """
    for obj in mesh_objects:
        world = obj.matrix_world.copy()
        if obj.data.users > 1:
            obj.data = obj.data.copy()
        obj.data.transform(world)
        if world.determinant() < 0:
            obj.data.flip_normals()
        obj.parent = None
        obj.matrix_world = Matrix.Identity(4)
    keep = set(mesh_objects) | {bpy.context.scene.camera}
    for obj in list(bpy.context.scene.objects):
        if obj not in keep:
            bpy.data.objects.remove(obj, do_unlink=True)


def wire_vertex_colours(mesh_objects: list) -> None:
    """Show vertex colours as albedo where the file means them to be.

    * Material-less meshes with vertex colours get a material whose base colour is the
      colour attribute: glTF 2.0's default material (section 3.9.6) and the PLY/OBJ colour
      conventions. Blender's glTF importer wires COLOR_0 only into existing materials.
    * Attribute nodes that name a colour layer the mesh lacks (BlenderProc's PLY material asks
      for "Col"; Blender 4.2 names it differently) are pointed at the mesh's colour
      attribute, or removed when there is none: a missing attribute renders black.
    """
    for obj in mesh_objects:
        mesh = obj.data
        colour = mesh.color_attributes[0].name if len(mesh.color_attributes) else None
        for mat in mesh.materials:
            if mat is None or not mat.use_nodes:
                continue
            for node in list(mat.node_tree.nodes):
                if node.type == "ATTRIBUTE" and node.attribute_type == "GEOMETRY" \
                        and node.attribute_name not in mesh.attributes:
                    if colour is None:
                        mat.node_tree.nodes.remove(node)
                    else:
                        node.attribute_name = colour
        if len(mesh.materials) > 0 or colour is None:
            continue
        mat = bpy.data.materials.new("vertex_colour")
        mat.use_nodes = True
        nodes = mat.node_tree.nodes
        attribute = nodes.new("ShaderNodeVertexColor")
        attribute.layer_name = colour
        mat.node_tree.links.new(attribute.outputs["Color"], nodes["Principled BSDF"].inputs["Base Color"])
        mesh.materials.append(mat)


def join_meshes(mesh_objects: list):
    """Join all mesh objects into one (BlenderProc's join); returns the Blender object."""
    target = MeshObject(mesh_objects[0])
    if len(mesh_objects) > 1:
        target.join_with_other_objects([MeshObject(o) for o in mesh_objects[1:]])
    return target.blender_obj


def vertex_array(obj) -> np.ndarray:
    """Vertex coordinates of a mesh object. Returns float64 [N, 3]."""
    co = np.empty(len(obj.data.vertices) * 3, dtype=np.float64)
    obj.data.vertices.foreach_get("co", co)
    return co.reshape(-1, 3)


def normalize_object(obj) -> tuple[float, np.ndarray]:
    """Scale and centre the mesh into [-0.5, 0.5]^3 (docs/design.md section 2).

    Uses the bounding box of the vertices that faces reference. ``p' = scale * p + offset``.
    Returns (scale, offset [3]).
    """
    verts = vertex_array(obj)
    used = np.zeros(len(verts), dtype=bool)
    loops = np.empty(len(obj.data.loops), dtype=np.int64)
    obj.data.loops.foreach_get("vertex_index", loops)
    used[loops] = True
    lo, hi = verts[used].min(0), verts[used].max(0)
    try:
        scale, offset = normalization_from_bounds(lo, hi)
    except ValueError:
        raise WorkerError("degenerate", f"bounding box {lo.tolist()} .. {hi.tolist()} is degenerate") from None
    obj.data.transform(Matrix.Translation(offset.tolist()) @ Matrix.Scale(scale, 4))
    obj.data.update()
    return scale, offset


def drop_missing_textures() -> list[str]:
    """Unlink image nodes whose image cannot be loaded; returns one warning per image.

    Cycles renders a missing image as magenta; without the node the material falls back to
    its own base colour, which is the better guess.
    """
    warnings = []
    for mat in bpy.data.materials:
        if not mat.use_nodes:
            continue
        for node in list(mat.node_tree.nodes):
            if node.type != "TEX_IMAGE" or node.image is None:
                continue
            image = node.image
            if image.packed_file is None and image.source == "FILE":
                path = bpy.path.abspath(image.filepath)
                missing = not os.path.isfile(path)
            else:
                path = image.name
                missing = False
            if not missing:
                missing = not image.has_data and image.size[0] == 0
            if missing:
                warnings.append(f"missing texture: {path}")
                mat.node_tree.nodes.remove(node)
    return sorted(set(warnings))


def mesh_statistics(obj) -> dict:
    return {"vertices": len(obj.data.vertices), "faces": len(obj.data.polygons),
            "materials": len(obj.data.materials)}


# ----------------------------------------------------------------------------- rendering
def add_cameras(c2w_opencv: np.ndarray) -> None:
    """Register one camera pose per frame (converted from OpenCV to Blender axes once)."""
    for i, pose in enumerate(opencv_to_blender_c2w(c2w_opencv)):
        CameraUtility.add_camera_pose(pose, frame=i)


def set_denoiser(denoise: bool, device: str) -> None:
    """Cycles' own denoiser (guided by albedo and normal): OptiX's on an OptiX device, else
    Open Image Denoise, on the GPU when rendering there.

    Not BlenderProc's "INTEL" compositor node, which always runs Open Image Denoise on the CPU.
    """
    RendererUtility.set_denoiser(None)  # removes BlenderProc's compositor denoiser, if any
    cycles = bpy.context.scene.cycles
    cycles.use_denoising = denoise
    bpy.context.view_layer.cycles.use_denoising = denoise
    if denoise:
        cycles.denoiser = "OPTIX" if device == "OPTIX" else "OPENIMAGEDENOISE"
        cycles.denoising_use_gpu = device != "CPU"


def render_pass(samples: int, filter_width: float, denoise: bool, device: str) -> dict:
    """Render every registered frame with the given sampling; BlenderProc's outputs dict."""
    RendererUtility.set_max_amount_of_samples(samples)
    set_denoiser(denoise, device)
    bpy.context.scene.cycles.filter_width = filter_width
    return RendererUtility.render(verbose=False)


def render_job(job: dict) -> tuple[dict, dict]:
    """Run one job. Returns (arrays for render.npz, metadata for result.json)."""
    mesh_path = Path(job["mesh_path"])
    init_blenderproc(Path(job["output_dir"]) / "blender_tmp")
    device = select_device(job["device"])
    setup_scene(job["resolution"], job["fov_deg"], job["samples"])

    axes, importer_kwargs = import_convention(mesh_path.suffix.lower(), job["obj_up_axis"])
    mesh_objects = import_mesh(mesh_path, importer_kwargs)
    if not mesh_objects:
        raise WorkerError("no_mesh", "the file holds no mesh")
    flatten_to_world(mesh_objects)
    wire_vertex_colours(mesh_objects)
    obj = join_meshes(mesh_objects)
    if len(obj.data.polygons) == 0:
        raise WorkerError("no_faces", "the mesh has no faces")
    scale, offset = normalize_object(obj)
    warnings = drop_missing_textures()

    c2w = np.asarray(job["c2w"], dtype=np.float64)
    add_cameras(c2w)
    RendererUtility.enable_depth_output(activate_antialiasing=False)
    # Geometry pass: one sample at the pixel centre -> exact z-depth of the centre ray.
    bpy.context.scene.cycles.max_bounces = 0
    geometry = render_pass(samples=1, filter_width=GEOMETRY_FILTER_WIDTH, denoise=False, device=device)
    bpy.context.scene.cycles.max_bounces = LIGHT_BOUNCES["max_bounces"]
    beauty = render_pass(job["samples"], BEAUTY_FILTER_WIDTH, job["denoise"], device)

    depth = np.stack([d[..., 0] if d.ndim == 3 else d for d in geometry["depth"]]).astype(np.float32)
    depth[~np.isfinite(depth) | (depth >= CLIP_END)] = np.inf
    rgba = np.stack(beauty["colors"]).astype(np.uint8)

    source_to_world = np.eye(4)
    source_to_world[:3, :3] = scale * np.asarray(axes)
    source_to_world[:3, 3] = offset
    meta = {
        "normalization": {"scale": scale, "offset": offset.tolist(),
                          "source_to_world": source_to_world.tolist()},
        "mesh": mesh_statistics(obj),
        "warnings": warnings,
        "blender_version": bpy.app.version_string,
        "device": device,
    }
    return {"rgba": rgba, "depth": depth}, meta


def run(job_path: str) -> int:
    """Render one job file; returns 0 (render.npz + result.json written) or 2/3 (error.json)."""
    job = json.loads(Path(job_path).read_text())
    out = Path(job["output_dir"])
    try:
        arrays, meta = render_job(job)
    except WorkerError as exc:
        atomic_write_json(out / "error.json", {"reason": exc.reason, "message": str(exc)})
        return 2
    except Exception as exc:  # anything else: report it with its traceback
        atomic_write_json(out / "error.json", {
            "reason": "worker_exception",
            "message": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}",
        })
        return 3
    with atomic_path(out / "render.npz", suffix=".npz") as tmp:
        np.savez(tmp, **arrays)
    atomic_write_json(out / "result.json", meta)
    return 0


def serve(reply_fd: int) -> None:
    """Run the jobs named on stdin until end of input, one reply line per job on ``reply_fd``.

    Blender is reset after every reply: each job starts from the state of a fresh process
    (factory settings), and the reset overlaps with the parent's work on the output it was
    just told of.
    """
    with os.fdopen(reply_fd, "w", buffering=1) as reply:
        for line in sys.stdin:
            code = run(line.strip())
            sys.stdout.flush()
            sys.stderr.flush()
            reply.write(json.dumps({"code": code}) + "\n")
            reset_blender()


def die_with_parent() -> None:
    """Linux: receive SIGKILL when the parent dies, so a killed job leaves no orphan render.

    (The worker runs in its own session so that the parent can kill it on timeout; that also
    detaches it from the signals the parent's process group gets.)
    """
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the call above
        os._exit(1)


if __name__ == "__main__":
    die_with_parent()
    serve(int(sys.argv[1]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
