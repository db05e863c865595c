"""LGM's Objaverse list (shipped in data_pipeline/objaverse_lists): every one of its 82,575 uids,
the 45 Sketchfab-style 26-27-character ones included, survives every step: the list reader, the
objaverse package's selection (a cache in the real layout that holds exactly those uids), the
render command's default, sample keys and member names as webdataset splits them, the
manifest (Parquet round trip, with the list recorded), and a real shard."""

import csv
import gzip
import json

import objaverse
import pytest
import webdataset.tariterators as wds_tar
from test_shards import fake_render

from common import conventions as C
from data_pipeline import objaverse_filter as F
from data_pipeline.__main__ import parse_args
from data_pipeline.manifest import merge_records, read_manifest, write_manifest
from data_pipeline.shards import decode_sample, encode_object, iter_shard, write_shard
from data_pipeline.sources import objaverse_objects

NUM_OBJECTS = 82_575


@pytest.fixture(scope="module")
def lgm_rows() -> list[tuple[str, str]]:
    with open(F.LGM_LIST, newline="") as handle:
        return [(group, uid) for group, uid in csv.reader(handle)]


@pytest.fixture
def lgm_cache(lgm_rows, tmp_path, monkeypatch):
    """The objaverse package pointed at a cache whose object paths are exactly LGM's objects
    (no files, no annotations: the keep list alone decides, nothing is downloaded)."""
    versioned = tmp_path / ".objaverse" / "hf-objaverse-v1"
    versioned.mkdir(parents=True)
    paths = {uid: f"glbs/{group}/{uid}.glb" for group, uid in lgm_rows}
    with gzip.open(versioned / "object-paths.json.gz", "wt") as handle:
        json.dump(paths, handle)
    monkeypatch.setattr(objaverse, "BASE_PATH", str(versioned.parent))
    monkeypatch.setattr(objaverse, "_VERSIONED_PATH", str(versioned))
    return versioned


def test_the_shipped_list_is_lgms_with_its_license(lgm_rows):
    uids = F.read_keep_list(F.LGM_LIST)
    assert len(lgm_rows) == len(uids) == NUM_OBJECTS
    odd = sorted(uid for uid in uids if len(uid) != 32)
    assert len(odd) == 45 and {len(u) for u in odd} == {26, 27} and "kiDgUIcaC7c4YaIcLCJeq4kS7rK" in odd
    assert len({group for group, _ in lgm_rows}) == 160
    license_text = (F.LGM_LIST.parent / "LICENSE").read_text()
    assert "MIT License" in license_text and "kiui" in license_text


def test_render_command_takes_the_list_by_default_and_filter_does_not():
    render = ["render", "--source", "objaverse", "--output", "out"]
    assert parse_args(render).objaverse_list == F.LGM_LIST
    assert parse_args(render + ["--objaverse-list", "none"]).objaverse_list is None
    assert parse_args(render + ["--uids", "a" * 32]).objaverse_list is None  # the uids choose
    assert parse_args(render + ["--uids", "a" * 32, "--objaverse-list", "lgm"]).objaverse_list == F.LGM_LIST
    assert parse_args(["filter", "--output", "out"]).objaverse_list is None
    with pytest.raises(SystemExit):
        parse_args(render + ["--objaverse-list", "/no/such/list.csv"])


def test_every_uid_survives_selection_keys_manifest_and_shards(lgm_cache, lgm_rows, tmp_path):
    kept, filtered, summary = objaverse_objects(keep_list=F.LGM_LIST, apply_rules=False)
    assert filtered == [] and summary.kept == NUM_OBJECTS and summary.removed == {}
    assert sorted(r.uid for r in kept) == sorted(uid for _, uid in lgm_rows)
    groups = dict((uid, group) for group, uid in lgm_rows)
    label = F.list_label(F.LGM_LIST)
    assert label.startswith("lgm_kiuisobj_v1_merged_80K.csv (sha256 ")
    for record in kept:
        assert record.path_or_url.endswith(f"/glbs/{groups[record.uid]}/{record.uid}.glb")
        assert record.selection == f"keep list {label}" and record.size is None

    # keys and member names, split back the way webdataset splits them
    for record in kept:
        for orbit in range(C.NUM_ORBITS):
            key = C.sample_key(record.uid, orbit)
            assert C.key_uid(key) == record.uid
            assert wds_tar.base_plus_ext(C.frame_member(key, 15, "ccm")) == (key, "15.ccm.png")
            assert wds_tar.base_plus_ext(f"{key}.cameras.npy") == (key, "cameras.npy")

    # the manifest: every uid, with the list it came from
    path = tmp_path / "manifest.parquet"
    write_manifest(path, merge_records({}, kept).values())
    rows = read_manifest(path)
    assert sorted(rows) == sorted(r.uid for r in kept)
    assert {row.selection for row in rows.values()} == {f"keep list {label}"}
    assert {row.status for row in rows.values()} == {"pending"}

    # a real shard holding the odd-length uids (and a few hex ones) reads back whole
    sample = sorted((r.uid for r in kept), key=lambda u: (len(u) == 32, u))[:50]
    shard = tmp_path / "shard-000000.tar"
    objects = [(uid, encode_object([fake_render(uid, k, size=4) for k in range(2)])) for uid in sample]
    assert write_shard(shard, shard.name, objects).uids == sample
    decoded = [decode_sample(raw) for raw in iter_shard(shard)]
    assert sorted((d.meta["uid"], d.meta["orbit"]) for d in decoded) == sorted((u, k) for u in sample for k in (0, 1))
