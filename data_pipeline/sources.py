"""Where objects come from: a local folder, procedural demo objects, or Objaverse.

Each source yields :class:`ObjectRecord` s. Objaverse objects are fetched through the
``objaverse`` package's own API (cached under ``objaverse.BASE_PATH``), never at import time;
render workers resolve them with :func:`resolve_path` on their own node.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

from common.atomic import atomic_write_bytes

MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".ply")
OBJAVERSE_URL = "https://huggingface.co/datasets/allenai/objaverse/resolve/main/"
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")
# glTF is +Y up, our world (and Google Scanned Objects' OBJ files) +Z up: (x, y, z)_zup = (x, -z, y)_gltf
ZUP_TO_GLTF = trimesh.transformations.rotation_matrix(-np.pi / 2, [1, 0, 0])
GLTF_TO_ZUP = trimesh.transformations.rotation_matrix(np.pi / 2, [1, 0, 0])


@dataclass(frozen=True)
class ObjectRecord:
    """One object to render. ``size`` (bytes) and ``sha256`` are None until known;
    ``selection``: how the object was chosen (for Objaverse: the keep list, with its hash, and/or
    the annotation rules), recorded in the manifest."""

    uid: str
    source: str  # local | demo | objaverse
    path_or_url: str
    size: int | None = None
    sha256: str | None = None
    selection: str | None = None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sanitize_uid(text: str) -> str:
    """A sample-key-safe uid: runs of characters outside ``[A-Za-z0-9_-]`` become ``_``."""
    uid = _UNSAFE.sub("_", text).strip("_")
    if not uid:
        raise ValueError(f"cannot make a uid from {text!r}")
    return uid


def _local_record(path: Path, uid: str, source: str) -> ObjectRecord:
    return ObjectRecord(uid, source, str(path.resolve()), path.stat().st_size, file_sha256(path))


# ----------------------------------------------------------------------------- local
def local_objects(folder: str | Path) -> list[ObjectRecord]:
    """All meshes (.glb .gltf .obj .ply) under a folder, recursively, sorted by path.

    The uid is the path relative to ``folder`` without its suffix, sanitised
    (``fuze/fuze.obj`` -> ``fuze_fuze``); files whose uids would collide get the suffix and
    a short hash of their relative path appended.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder of meshes")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in MESH_SUFFIXES)
    rels = [p.relative_to(folder).as_posix() for p in paths]
    stems = [sanitize_uid(rel.rsplit(".", 1)[0]) for rel in rels]
    records = []
    for path, rel, stem in zip(paths, rels, stems):
        uid = stem
        if stems.count(stem) > 1:
            uid = sanitize_uid(rel) + "_" + hashlib.sha1(rel.encode()).hexdigest()[:6]
        records.append(_local_record(path, uid, "local"))
    return records


# ----------------------------------------------------------------------------- demo
def srgb_to_linear(c):
    """sRGB-encoded values in [0, 1] -> linear (IEC 61966-2-1)."""
    c = np.asarray(c, dtype=np.float64)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(c):
    """Linear values in [0, 1] -> sRGB-encoded (inverse of :func:`srgb_to_linear`)."""
    c = np.asarray(c, dtype=np.float64)
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * np.clip(c, 0, None) ** (1 / 2.4) - 0.055)


def _to_uint8(c) -> np.ndarray:
    return np.round(np.clip(c, 0.0, 1.0) * 255).astype(np.uint8)


SHAPES = ("box", "sphere", "cylinder", "cone", "torus", "capsule", "composition")
LOOKS = ("vertex_colors", "stripes", "checker", "material")


def _texture(kind: str, colors: np.ndarray, rng: np.random.Generator, size: int = 128) -> Image.Image:
    """A UV texture made with numpy: ``stripes`` (diagonal bands) or ``checker``. RGB uint8."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    period = int(rng.integers(4, 9))
    if kind == "stripes":
        index = np.floor((xx + yy) * period).astype(int) % len(colors)
    else:
        index = (np.floor(xx * period) + np.floor(yy * period)).astype(int) % 2
    return Image.fromarray(colors[index].astype(np.uint8), "RGB")


def _box_uv(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """Planar UVs per face along its dominant normal axis (faces get their own vertices)."""
    mesh = mesh.copy()
    mesh.unmerge_vertices()
    axis = np.abs(mesh.face_normals).argmax(1)
    uv = np.zeros((len(mesh.vertices), 2))
    lo, hi = mesh.bounds
    span = np.maximum(hi - lo, 1e-9).max()
    for face, a in zip(mesh.faces, axis):
        others = [i for i in range(3) if i != a]
        uv[face] = (mesh.vertices[face][:, others] - lo[others]) / span
    mesh.visual = trimesh.visual.TextureVisuals(uv=uv)
    return mesh


def _primitive(shape: str, rng: np.random.Generator) -> trimesh.Trimesh:
    """One primitive with random proportions, resting upright around the origin."""
    r = float(rng.uniform(0.3, 0.6))
    h = float(rng.uniform(0.6, 1.6))
    if shape == "box":
        return trimesh.creation.box(extents=rng.uniform(0.4, 1.2, 3))
    if shape == "sphere":
        mesh = trimesh.creation.icosphere(subdivisions=3, radius=r)
        mesh.apply_scale(rng.uniform(0.7, 1.3, 3))  # an ellipsoid
        return mesh
    if shape == "cylinder":
        return trimesh.creation.cylinder(radius=r, height=h, sections=48)
    if shape == "cone":
        return trimesh.creation.cone(radius=r, height=h, sections=48)
    if shape == "torus":
        return trimesh.creation.torus(major_radius=r, minor_radius=r * float(rng.uniform(0.2, 0.45)))
    if shape == "capsule":
        return trimesh.creation.capsule(height=h, radius=r * 0.6, count=[24, 24])
    raise ValueError(f"unknown primitive {shape!r}")


def _paint(mesh: trimesh.Trimesh, look: str, rng: np.random.Generator) -> trimesh.Trimesh:
    """Give a mesh its appearance: vertex colours, a UV texture, or a plain PBR material.

    Colours are chosen in sRGB. glTF stores vertex colours and base colour factors as linear
    values (textures as sRGB), so those two are linearised: a renderer then shows the chosen colour.
    """
    colors = rng.integers(30, 256, (3, 3))
    if look == "vertex_colors":
        z = mesh.vertices[:, 2]
        t = ((z - z.min()) / max(np.ptp(z), 1e-9))[:, None]
        rgb = _to_uint8(srgb_to_linear(((1 - t) * colors[0] + t * colors[1]) / 255))
        mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=np.c_[rgb, np.full(len(rgb), 255)])
        return mesh
    if look in ("stripes", "checker"):
        mesh = _box_uv(mesh)
        material = trimesh.visual.material.PBRMaterial(baseColorTexture=_texture(look, colors, rng))
        mesh.visual = trimesh.visual.TextureVisuals(uv=mesh.visual.uv, material=material)
        return mesh
    factor = np.r_[_to_uint8(srgb_to_linear(colors[0] / 255)), 255].astype(np.uint8)
    material = trimesh.visual.material.PBRMaterial(baseColorFactor=factor)
    mesh.visual = trimesh.visual.TextureVisuals(material=material)
    return mesh


def _composition(rng: np.random.Generator) -> list[trimesh.Trimesh]:
    """A few painted primitives stacked along +Z (a snowman/lamp-like figure)."""
    parts, z = [], 0.0
    for _ in range(int(rng.integers(2, 4))):
        part = _paint(_primitive(str(rng.choice(SHAPES[:-1])), rng), str(rng.choice(LOOKS)), rng)
        lo, hi = part.bounds
        part.apply_translation([-(lo[0] + hi[0]) / 2, -(lo[1] + hi[1]) / 2, z - lo[2]])
        z += float(hi[2] - lo[2]) * 0.9
        parts.append(part)
    return parts


def make_demo_object(index: int, seed: int) -> tuple[str, trimesh.Scene]:
    """The ``index``-th procedural object of a seed: (a name like ``torus_checker``, its scene)."""
    rng = np.random.default_rng([seed, index])
    shape = SHAPES[index % len(SHAPES)]
    look = LOOKS[(index + 2 * (index // len(SHAPES))) % len(LOOKS)]
    if shape == "composition":
        parts, look = _composition(rng), "mixed"
    else:
        parts = [_paint(_primitive(shape, rng), look, rng)]
    tilt = trimesh.transformations.rotation_matrix(float(rng.uniform(-0.4, 0.4)), [1, 0, 0])
    spin = trimesh.transformations.rotation_matrix(float(rng.uniform(0, 2 * np.pi)), [0, 0, 1])
    scene = trimesh.Scene()
    for k, part in enumerate(parts):
        # built +Z up, stored as glTF (+Y up) so that importers stand it upright
        part.apply_transform(ZUP_TO_GLTF @ spin @ tilt)
        scene.add_geometry(part, geom_name=f"part{k}")
    return f"{shape}_{look}", scene


def demo_objects(count: int, out_dir: str | Path, seed: int = 0) -> list[ObjectRecord]:
    """Write ``count`` procedural objects as .glb into ``out_dir`` (deterministic in ``seed``).

    Shapes cycle through boxes, ellipsoids, cylinders, cones, tori, capsules and stacked
    compositions; looks through vertex colours, striped and checkered UV textures (made with
    numpy/PIL) and plain PBR colours. uids are ``demo<seed>_<index>_<shape>_<look>``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(count):
        name, scene = make_demo_object(index, seed)
        uid = sanitize_uid(f"demo{seed}_{index:04d}_{name}")
        path = out_dir / f"{uid}.glb"
        data = scene.export(file_type="glb")
        if not path.exists() or path.read_bytes() != data:
            atomic_write_bytes(path, data)
        records.append(_local_record(path, uid, "demo"))
    return records


# ----------------------------------------------------------------------------- GSO layout
def _as_textured(mesh: trimesh.Trimesh, linear_colors: bool) -> trimesh.Trimesh:
    """The mesh with a UV texture image: vertex colours and plain materials are baked into one.

    ``linear_colors``: the file stores vertex colours and colour factors linearly (glTF); the
    baked texture is sRGB, so they are encoded on the way.
    """
    encode = (lambda c: _to_uint8(linear_to_srgb(np.asarray(c) / 255))) if linear_colors else np.asarray
    visual = mesh.visual
    if isinstance(visual, trimesh.visual.ColorVisuals):
        colors = np.array(visual.vertex_colors)
        colors[:, :3] = encode(colors[:, :3])
        mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=colors).to_texture()
        visual = mesh.visual
    material = visual.material
    image = getattr(material, "baseColorTexture", None) or getattr(material, "image", None)
    if image is None or visual.uv is None:
        color = encode(np.asarray(material.main_color, dtype=np.uint8)[:3])
        image = Image.new("RGB", (4, 4), tuple(int(c) for c in color))
        mesh.visual = trimesh.visual.TextureVisuals(uv=np.full((len(mesh.vertices), 2), 0.5), image=image)
    elif not isinstance(material, trimesh.visual.material.SimpleMaterial):
        mesh.visual = trimesh.visual.TextureVisuals(uv=visual.uv, image=image)
    return mesh


def export_gso_layout(mesh_path: str | Path, out_root: str | Path, name: str) -> Path:
    """Write a mesh in Google Scanned Objects' layout and return the object folder.

    ``<out_root>/<name>/meshes/model.obj`` (+ ``model.mtl``) and
    ``<out_root>/<name>/materials/textures/texture.png``; the MTL references the texture by
    the relative path ``../materials/textures/texture.png`` so that loaders find it.
    Multi-part meshes are merged (their textures packed into one atlas). The OBJ is +Z up like
    GSO's own files: glTF sources (+Y up) are rotated accordingly; other formats keep their axes.
    """
    mesh = trimesh.load(str(mesh_path), force="mesh")
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise ValueError(f"{mesh_path}: no faces to export")
    if Path(mesh_path).suffix.lower() in (".glb", ".gltf"):
        mesh.apply_transform(GLTF_TO_ZUP)
    mesh = _as_textured(mesh, linear_colors=Path(mesh_path).suffix.lower() in (".glb", ".gltf"))
    image = mesh.visual.material.image.convert("RGB")
    obj_text, _ = trimesh.exchange.obj.export_obj(
        mesh, include_normals=True, include_texture=True, return_texture=True, mtl_name="model.mtl"
    )
    mtl = (
        "newmtl material_0\nKa 1.0 1.0 1.0\nKd 1.0 1.0 1.0\nKs 0.0 0.0 0.0\nNs 1.0\nillum 1\n"
        "map_Kd ../materials/textures/texture.png\n"
    )
    obj_text = re.sub(r"^usemtl .*$", "usemtl material_0", obj_text, flags=re.M)
    folder = Path(out_root) / name
    (folder / "meshes").mkdir(parents=True, exist_ok=True)
    (folder / "materials" / "textures").mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    for path, data in (
        (folder / "materials" / "textures" / "texture.png", buf.getvalue()),
        (folder / "meshes" / "model.mtl", mtl.encode()),
        (folder / "meshes" / "model.obj", obj_text.encode()),
    ):
        atomic_write_bytes(path, data)
    return folder


# ----------------------------------------------------------------------------- objaverse
def objaverse_url(object_path: str) -> str:
    """Hub URL of an Objaverse object path ``glbs/<group>/<uid>.glb``."""
    return OBJAVERSE_URL + object_path


def objaverse_objects(
    uids: list[str] | None = None,
    lvis_categories: list[str] | None = None,
    keep_list: str | Path | None = None,
    rules=None,
    captions: str | Path | None = None,
    limit: int | None = None,
    apply_rules: bool = True,
):
    """Objaverse objects through the objaverse API, filtered (see :mod:`objaverse_filter`).

    Args:
        uids: restrict to these uids (default: the keep list's when the rules are off, else all
            of ``objaverse.load_uids()``).
        lvis_categories: restrict to objects of these LVIS categories.
        keep_list: a published filter list (CSV of ``glb-group,uid`` rows), e.g.
            ``objaverse_filter.LGM_LIST``.
        rules: ``objaverse_filter.FilterRules`` (defaults when None).
        captions: optional CSV ``uid,caption`` (e.g. Cap3D) checked for bad words.
        limit: keep at most this many objects (after filtering, in uid order).
        apply_rules: filter by the rules on the annotations; off, the annotations are not
            loaded at all (the keep list alone decides) and records carry no size.
    Returns:
        (kept records, [(filtered record, reason)], objaverse_filter.FilterSummary). Records
        carry the hub URL and ``selection`` (the list and/or rules that chose them); files are
        downloaded by the render worker (:func:`resolve_path`).
    """
    import objaverse

    from data_pipeline import objaverse_filter

    keep = objaverse_filter.read_keep_list(keep_list) if keep_list else None
    object_paths = objaverse._load_object_paths()
    if uids is not None:
        candidates = list(uids)
    elif keep is not None and not apply_rules:
        candidates = sorted(keep)
    else:
        candidates = objaverse.load_uids()
    unknown = [uid for uid in candidates if uid not in object_paths]
    candidates = [uid for uid in candidates if uid in object_paths]
    if lvis_categories:
        lvis = objaverse.load_lvis_annotations()
        missing = sorted(set(lvis_categories) - set(lvis))
        if missing:
            raise ValueError(f"unknown LVIS categories {missing}")
        wanted = {uid for category in lvis_categories for uid in lvis[category]}
        candidates = [uid for uid in candidates if uid in wanted]
    annotations = objaverse.load_annotations(candidates) if apply_rules else None
    caption_map = objaverse_filter.read_captions(captions) if captions else None
    decisions, summary = objaverse_filter.filter_objects(
        candidates, annotations, rules=rules, keep_list=keep, captions=caption_map,
        apply_rules=apply_rules,
    )
    summary.total += len(unknown)
    summary.count("unknown uid", len(unknown))
    parts = [f"keep list {objaverse_filter.list_label(keep_list)}"] if keep_list else []
    parts += ["annotation rules"] if apply_rules else []
    parts += ["given uids"] if uids is not None else []
    parts += [f"LVIS {','.join(lvis_categories)}"] if lvis_categories else []
    selection = " + ".join(parts) or "all of objaverse"
    kept, filtered = [], []
    for uid in sorted(candidates):
        archive = ((annotations or {}).get(uid) or {}).get("archives", {}).get("glb", {})
        record = ObjectRecord(uid, "objaverse", objaverse_url(object_paths[uid]), archive.get("size"),
                              selection=selection)
        if decisions[uid] is None:
            kept.append(record)
        else:
            filtered.append((record, decisions[uid]))
    if limit is not None:
        kept = kept[:limit]
    return kept, filtered, summary


def resolve_path(record: ObjectRecord) -> str:
    """Local file of a record; Objaverse objects are fetched into this node's objaverse cache."""
    if record.source != "objaverse":
        return record.path_or_url
    import objaverse

    paths = objaverse.load_objects([record.uid])
    if record.uid not in paths:
        raise FileNotFoundError(f"objaverse has no object {record.uid}")
    return paths[record.uid]
