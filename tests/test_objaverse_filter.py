"""The Objaverse filter on a realistic annotation fixture, through the objaverse package's own
loaders (tests/fixtures/objaverse, see its README for the expected decision per object)."""

import hashlib
import json

import pytest
from data_paths import FIXTURES

from data_pipeline import objaverse_filter as F
from data_pipeline.__main__ import main
from data_pipeline.sources import objaverse_objects

FIXTURE = FIXTURES / "objaverse"
uid = lambda name: hashlib.md5(name.encode()).hexdigest()  # noqa: E731 (fixture uids)

EXPECTED = {
    "mug": None, "chair": None, "helmet": None, "shoe": None,
    "grey_bust": "no texture", "tiny_cube": "too few faces",
    "scan_city": "bad words in name/tags", "dense": "too many faces",
    "huge_file": "file too large", "terrain": "bad words in name/tags",
    "walker": "animated", "no_metadata": "no annotation",
}


def test_rules_decide_each_object_and_count_it(objaverse_cache):
    kept, filtered, summary = objaverse_objects()
    decided = {r.uid: None for r in kept} | {r.uid: reason for r, reason in filtered}
    assert decided == {uid(name): reason for name, reason in EXPECTED.items()}
    assert summary.total == 12 and summary.kept == 4
    assert summary.removed == {"no texture": 1, "too few faces": 1, "too many faces": 1,
                               "file too large": 1, "bad words in name/tags": 2,
                               "animated": 1, "no annotation": 1}
    mug = next(r for r in kept if r.uid == uid("mug"))
    assert mug.source == "objaverse" and mug.size == 850_000 and mug.sha256 is None
    assert mug.path_or_url.endswith(f"glbs/000-000/{uid('mug')}.glb")


def test_keep_list_lvis_and_limit(objaverse_cache):
    kept, filtered, summary = objaverse_objects(keep_list=f"{FIXTURE}/lgm_keep.csv")
    assert {r.uid for r in kept} == {uid("mug"), uid("chair"), uid("helmet")}
    assert dict((r.uid, why) for r, why in filtered)[uid("shoe")] == "not in the keep list"
    assert dict((r.uid, why) for r, why in filtered)[uid("terrain")] == "bad words in name/tags"
    assert summary.removed["not in the keep list"] == 8
    kept, _, _ = objaverse_objects(lvis_categories=["mug", "shoe", "helmet"], limit=2)
    assert [r.uid for r in kept] == sorted([uid("mug"), uid("shoe"), uid("helmet")])[:2]
    with pytest.raises(ValueError, match="unknown LVIS"):
        objaverse_objects(lvis_categories=["spaceship"])


def test_rules_are_configurable_and_captions_checked():
    annotation = {"name": "Vase", "faceCount": 50, "archives": {"glb": {"textureCount": 0, "size": 5000}},
                  "tags": [], "categories": []}
    assert F.reject_reason(annotation, F.FilterRules()) == "no texture"
    loose = F.FilterRules(require_texture=False, min_faces=None, min_bytes=None)
    assert F.reject_reason(annotation, loose) is None
    assert F.reject_reason(annotation, loose, caption="a 3D model of a living room scene") == "bad words in caption"
    # whole words only: "mapping" is not "map", "Testament" is not "test"
    assert F.reject_reason({**annotation, "name": "Testament mapping tool"}, loose) is None


def test_keep_list_rejects_malformed_rows(tmp_path):
    path = tmp_path / "list.csv"
    path.write_text("glb-group,uid\n000-001,0123456789abcdef0123456789abcdef\n000-130,kiDgUIcaC7c4YaIcLCJeq4kS7rK\n"
                    "000-002,not-a-uid\n")
    with pytest.raises(ValueError, match=r"list.csv:4: 'not-a-uid'"):
        F.read_keep_list(path)
    path.write_text("000-001,0123456789abcdef0123456789abcdef\n000-130,kiDgUIcaC7c4YaIcLCJeq4kS7rK\n")
    assert F.read_keep_list(path) == {"0123456789abcdef0123456789abcdef", "kiDgUIcaC7c4YaIcLCJeq4kS7rK"}


def test_filter_reports_its_agreement_with_a_keep_list(objaverse_cache, tmp_path):
    """Rules keep mug, chair, helmet, shoe; the list mug, chair, helmet, terrain."""
    assert main(["filter", "--output", str(tmp_path / "out"), "--objaverse-list", f"{FIXTURE}/lgm_keep.csv"]) == 0
    summary = json.loads((tmp_path / "out" / "filter_summary.json").read_text())
    assert summary["agreement"] == {"kept by both": 3, "kept by the list only": 1,
                                    "kept by the rules only": 1, "kept by neither": 7}
    assert summary["kept"] == 3  # the filter command applies both
    # the render selection: the list decides, the rules only when asked
    kept, filtered, summary = objaverse_objects(keep_list=f"{FIXTURE}/lgm_keep.csv", apply_rules=False)
    assert {r.uid for r in kept} == {uid(n) for n in ("mug", "chair", "helmet", "terrain")}
    assert filtered == [] and summary.agreement is None  # no annotations loaded
    assert all(r.selection.startswith("keep list lgm_keep.csv (sha256 ") for r in kept)
    kept, _, _ = objaverse_objects(keep_list=f"{FIXTURE}/lgm_keep.csv")
    assert {r.uid for r in kept} == {uid(n) for n in ("mug", "chair", "helmet")}
    assert kept[0].selection.endswith(" + annotation rules")


def test_filter_command_writes_keep_list_and_summary(objaverse_cache, tmp_path, capsys):
    assert main(["filter", "--output", str(tmp_path / "out"), "--max-mb", "10"]) == 0
    summary = json.loads((tmp_path / "out" / "filter_summary.json").read_text())
    # 10 MB also removes the helmet (12 MB); the 60 MB city now fails on size before its words
    assert summary["kept"] == 3 and summary["removed"]["file too large"] == 3
    rows = (tmp_path / "out" / "objaverse_keep.csv").read_text().split()
    assert sorted(rows) == sorted(f"000-00{g},{uid(n)}" for g, n in ((0, "mug"), (0, "chair"), (1, "shoe")))
    assert F.read_keep_list(tmp_path / "out" / "objaverse_keep.csv") == {uid("mug"), uid("chair"), uid("shoe")}
    assert "kept: 3" in capsys.readouterr().out
