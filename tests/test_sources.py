"""Object sources: local folders, procedural demo objects, GSO-layout export, Objaverse paths."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import trimesh
from trimesh.resolvers import FilePathResolver
from data_paths import ASSETS

from common.conventions import sample_key
from data_pipeline.sources import (
    GLTF_TO_ZUP,
    ObjectRecord,
    demo_objects,
    export_gso_layout,
    local_objects,
    resolve_path,
)


def test_local_objects_on_the_shared_assets():
    records = {r.uid: r for r in local_objects(ASSETS)}
    assert set(records) == {"BoxTextured", "Duck", "monkey", "fuze_fuze", "spot", "teapot"}
    duck = records["Duck"]
    assert duck.source == "local" and Path(duck.path_or_url) == (ASSETS / "Duck.glb").resolve()
    assert duck.size == (ASSETS / "Duck.glb").stat().st_size
    assert duck.sha256 == hashlib.sha256((ASSETS / "Duck.glb").read_bytes()).hexdigest()


def test_local_uids_are_sanitised_and_unique(tmp_path):
    for name in ("a.obj", "a.glb", "sub dir/x.y.ply", "notes.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x")
    uids = [r.uid for r in local_objects(tmp_path)]
    assert len(uids) == 3 and len(set(uids)) == 3
    assert "sub_dir_x_y" in uids
    assert all(u.startswith("a_glb_") or u.startswith("a_obj_") for u in uids if u.startswith("a_"))
    for u in uids:
        sample_key(u, 0)  # usable as shard keys
    with pytest.raises(FileNotFoundError, match="not a folder"):
        local_objects(tmp_path / "missing")


def test_demo_objects_are_deterministic_and_varied(tmp_path):
    first = demo_objects(8, tmp_path / "a", seed=3)
    again = demo_objects(8, tmp_path / "b", seed=3)
    other = demo_objects(2, tmp_path / "c", seed=4)
    assert [r.sha256 for r in first] == [r.sha256 for r in again]
    assert [r.uid for r in first] == [r.uid for r in again]
    assert first[0].sha256 != other[0].sha256
    assert len({r.sha256 for r in first}) == 8
    looks = {"vertex_colors": 0, "texture": 0, "material": 0}
    for record in first:
        scene = trimesh.load(record.path_or_url)
        assert record.source == "demo" and record.path_or_url.endswith(".glb")
        for mesh in scene.geometry.values():
            assert len(mesh.faces) > 0 and np.ptp(mesh.bounds, axis=0).min() > 0.05
            if isinstance(mesh.visual, trimesh.visual.ColorVisuals):
                assert len(np.unique(mesh.visual.vertex_colors, axis=0)) > 1
                looks["vertex_colors"] += 1
            elif mesh.visual.material.baseColorTexture is not None:
                image = np.asarray(mesh.visual.material.baseColorTexture)
                assert mesh.visual.uv is not None and len(np.unique(image.reshape(-1, 3), axis=0)) > 1
                looks["texture"] += 1
            else:
                looks["material"] += 1
    assert all(n > 0 for n in looks.values()), looks


def _load_obj(path: Path) -> trimesh.Trimesh:
    return trimesh.load(path, resolver=FilePathResolver(path, allow_anywhere=True), process=False)


@pytest.mark.parametrize("source", ["demo_checker", "demo_vertex_colors", "Duck.glb", "fuze/fuze.obj"])
def test_export_gso_layout(tmp_path, source):
    if source.startswith("demo"):
        records = demo_objects(4, tmp_path / "demo", seed=0)
        path = next(r.path_or_url for r in records if r.uid.endswith(source[5:]))
    else:
        path = ASSETS / source
    folder = export_gso_layout(path, tmp_path / "gso", "object_1")
    obj = folder / "meshes" / "model.obj"
    texture = folder / "materials" / "textures" / "texture.png"
    assert obj.is_file() and (folder / "meshes" / "model.mtl").is_file() and texture.is_file()
    exported = _load_obj(obj)
    reference = trimesh.load(path, force="mesh")
    if Path(path).suffix == ".glb":  # GSO files are +Z up, glTF +Y up
        reference.apply_transform(GLTF_TO_ZUP)
    np.testing.assert_allclose(exported.bounds, reference.bounds, atol=1e-5)
    np.testing.assert_allclose(exported.area, reference.area, rtol=1e-4)
    image = exported.visual.material.image
    assert image is not None, "the MTL must lead to materials/textures/texture.png"
    colors = exported.visual.to_color().vertex_colors[:, :3].astype(float)
    assert colors.std(0).max() > 1.0  # the object's colours survived, not a flat default


def test_resolve_path_of_objaverse_and_local_records(objaverse_cache):
    uid = "4c032833c7118276e83ee90998ba47cf"
    record = ObjectRecord(uid, "objaverse", f"https://example/glbs/000-000/{uid}.glb")
    assert Path(resolve_path(record)) == objaverse_cache / "glbs" / "000-000" / f"{uid}.glb"
    with pytest.raises(FileNotFoundError, match="no object"), pytest.warns(UserWarning):
        resolve_path(ObjectRecord("f" * 32, "objaverse", "https://example/x.glb"))
    local = ObjectRecord("x", "local", "/some/file.glb")
    assert resolve_path(local) == "/some/file.glb"


def test_demo_colours_are_stored_linearly_as_gltf_says(tmp_path):
    from data_pipeline.sources import linear_to_srgb, srgb_to_linear

    np.testing.assert_allclose(srgb_to_linear([0.0, 0.04045, 0.5, 1.0]), [0.0, 0.04045 / 12.92, 0.21404, 1.0], atol=1e-5)
    grid = np.linspace(0, 1, 101)
    np.testing.assert_allclose(linear_to_srgb(srgb_to_linear(grid)), grid, atol=1e-9)
    # a vertex-coloured demo object, baked into a GSO texture, gets back its sRGB colours
    (record,) = demo_objects(1, tmp_path / "demo", seed=0)  # index 0: box with vertex colours
    stored = list(trimesh.load(record.path_or_url).geometry.values())[0].visual.vertex_colors[:, :3]
    exported = _load_obj(export_gso_layout(record.path_or_url, tmp_path / "gso", "o") / "meshes" / "model.obj")
    baked = exported.visual.to_color().vertex_colors[:, :3].astype(float)
    expected = np.round(linear_to_srgb(stored / 255.0) * 255)
    np.testing.assert_allclose(np.unique(baked, axis=0), np.unique(expected, axis=0), atol=2)
    assert (expected >= stored).all() and (expected > stored).any()  # sRGB encoding brightens
