"""Manifest: Parquet round trip, atomic writes, merge for resume, reconciling with the shards a
store holds, planning work units."""

import dataclasses
import datetime as dt
import json
import tarfile

import pyarrow.parquet as pq
import pytest
from test_shards import fake_render

from data_pipeline.job import drop_changed_objects, objects_to_render, plan_units, reconcile_shards
from data_pipeline.manifest import (
    SCHEMA,
    ManifestRow,
    merge_records,
    read_manifest,
    status_counts,
    write_manifest,
)
from data_pipeline.shards import encode_object, index_name, write_shard
from data_pipeline.sources import ObjectRecord
from data_pipeline.storage import Store


def rec(uid, sha="s1"):
    return ObjectRecord(uid, "local", f"/objects/{uid}.glb", 123, sha)


def test_round_trip_keeps_every_field(tmp_path):
    path = tmp_path / "manifest.parquet"
    stamp = dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=dt.timezone.utc)
    rows = [
        ManifestRow("b", "demo", "/b.glb", 10, "abc", "done", None, 1, "shard-000003.tar", 4.5, stamp, stamp),
        ManifestRow("a", "objaverse", "https://x/a.glb", None, None, "failed", "not_gltf: bad magic", 2),
        ManifestRow("c", "objaverse", "https://x/c.glb", status="filtered", reason="no texture"),
    ]
    write_manifest(path, rows)
    assert pq.read_schema(path).remove_metadata() == SCHEMA
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.parquet"]  # no temporary left
    back = read_manifest(path)
    assert list(back) == ["a", "b", "c"]  # sorted by uid
    assert back["b"] == rows[0]
    assert back["a"].reason == "not_gltf: bad magic" and back["a"].size is None and back["a"].attempts == 2
    assert status_counts(back.values()) == {"filtered": 1, "pending": 0, "done": 1, "failed": 1}
    assert [f.name for f in dataclasses.fields(ManifestRow)] == SCHEMA.names  # read relies on it


def test_bad_manifests_are_named(tmp_path):
    assert read_manifest(tmp_path / "absent.parquet") == {}
    garbage = tmp_path / "garbage.parquet"
    garbage.write_text("not parquet")
    with pytest.raises(ValueError, match="garbage.parquet: not a readable Parquet"):
        read_manifest(garbage)
    older = tmp_path / "older.parquet"  # written before the selection column existed
    write_manifest(older, [ManifestRow("x", "local", "/x", status="done", shard="shard-000000.tar")])
    pq.write_table(pq.read_table(older).drop_columns(["selection"]), older)
    (row,) = read_manifest(older).values()
    assert (row.uid, row.status, row.selection) == ("x", "done", None)
    partial = tmp_path / "partial.parquet"
    pq.write_table(SCHEMA.empty_table().drop_columns(["shard"]), partial)
    with pytest.raises(ValueError, match=r"partial.parquet: manifest lacks columns \['shard'\]"):
        read_manifest(partial)
    with pytest.raises(ValueError, match="unknown status"):
        ManifestRow("x", "local", "/x", status="finished")


def test_merge_for_resume():
    rows = {
        "done": ManifestRow("done", "local", "/done.glb", 1, "s1", "done", shard="shard-000000.tar", attempts=1),
        "failed": ManifestRow("failed", "local", "/failed.glb", 1, "s1", "failed", "timeout", attempts=1),
        "changed": ManifestRow("changed", "local", "/changed.glb", 1, "old", "done", shard="shard-000000.tar", attempts=1),
        "was_filtered": ManifestRow("was_filtered", "objaverse", "u", status="filtered", reason="no texture"),
    }
    merge_records(rows, [rec("done"), rec("failed"), rec("changed", "new"), rec("new"), rec("was_filtered")],
                  filtered=[(rec("rejected"), "too many faces"), (rec("done"), "no texture")])
    assert rows["done"].status == "done" and rows["done"].shard == "shard-000000.tar"
    assert rows["failed"].status == "failed" and rows["failed"].attempts == 1
    assert rows["changed"].status == "pending" and rows["changed"].attempts == 0
    assert rows["changed"].sha256 == "new" and rows["changed"].shard is None
    assert rows["new"].status == "pending" and rows["was_filtered"].status == "pending"
    assert rows["rejected"].status == "filtered" and rows["rejected"].reason == "too many faces"


def test_objects_to_render_respects_max_retries():
    rows = {u: ManifestRow(u, "local", "/x", status=s, attempts=n)
            for u, s, n in [("p", "pending", 0), ("d", "done", 1), ("f1", "failed", 1),
                            ("f3", "failed", 3), ("x", "filtered", 0)]}
    records = [rec(u) for u in ("f3", "x", "p", "d", "f1")]
    assert [r.uid for r in objects_to_render(rows, records, max_retries=2)] == ["p", "f1"]
    assert [r.uid for r in objects_to_render(rows, records, max_retries=0)] == ["p"]


def _commit_shard(store: Store, name: str, uids, with_index: bool = True) -> None:
    objects = [(uid, encode_object([fake_render(uid, 0), fake_render(uid, 1)])) for uid in uids]
    with store.staged(name) as local:
        info = write_shard(local, name, objects)
        store.commit_file(local, name)
    if with_index:
        store.write_bytes(index_name(name), info.to_json())


def test_reconcile_adopts_orphan_shards_and_resets_missing_ones(tmp_path):
    store = Store(tmp_path)
    _commit_shard(store, "shard-000000.tar", ["a"])
    _commit_shard(store, "shard-000001.tar", ["b"], with_index=False)  # killed between the two writes
    rows = {
        "a": ManifestRow("a", "local", "/a", status="done", shard="shard-000000.tar"),
        "b": ManifestRow("b", "local", "/b", status="pending"),  # killed before the manifest write
        "c": ManifestRow("c", "local", "/c", status="done", shard="shard-000009.tar"),  # deleted shard
    }
    present = reconcile_shards(rows, store)
    assert present == ["shard-000000.tar", "shard-000001.tar"]
    assert rows["a"].status == "done" and rows["a"].shard == "shard-000000.tar"
    assert rows["b"].status == "done" and rows["b"].shard == "shard-000001.tar"
    assert rows["c"].status == "pending" and "shard-000009.tar missing" in rows["c"].reason
    # the missing index was rebuilt from the shard's members
    assert json.loads((tmp_path / "shard-000001.index.json").read_text())["keys"] == ["b_o0", "b_o1"]


def test_plan_keeps_a_killed_units_name_and_numbers_new_units_after_every_known_name():
    rows = {u: ManifestRow(u, "local", f"/{u}") for u in "abcdefg"}
    rows["a"].update(status="done", shard="shard-000000.tar")
    rows["b"].update(shard="shard-000004.tar")  # planned by a killed run, never committed
    rows["c"].update(shard="shard-000004.tar")
    rows["d"].update(status="failed", attempts=1)
    todo = [rec(u) for u in "bcdefg"]
    units = plan_units(rows, todo, present=["shard-000000.tar", "shard-000002.tar"], objects_per_unit=2)
    assert [(u.shard, [r.uid for r in u.records]) for u in units] == [
        ("shard-000004.tar", ["b", "c"]),  # the same unit, under the same name
        ("shard-000005.tar", ["d", "e"]),
        ("shard-000006.tar", ["f", "g"]),
    ]
    assert {u: rows[u].shard for u in "defg"} == {"d": "shard-000005.tar", "e": "shard-000005.tar",
                                                  "f": "shard-000006.tar", "g": "shard-000006.tar"}
    assert plan_units(rows, [], present=[], objects_per_unit=2) == []


def test_unfinished_local_writes_are_removed_and_nothing_else(tmp_path):
    store = Store(tmp_path)
    for name in (".shard-000003.tar.123.tmp", "shard-000001.tar.tmp", ".manifest.parquet.x.tmp"):
        (tmp_path / name).write_bytes(b"half")
    _commit_shard(store, "shard-000000.tar", ["a"])
    assert sorted(store.remove_unfinished_writes()) == [".manifest.parquet.x.tmp", ".shard-000003.tar.123.tmp",
                                                         "shard-000001.tar.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.index.json", "shard-000000.tar"]

def test_stale_temporaries_of_a_killed_write_are_removed_and_nothing_else(tmp_path):
    """What ``atomic_path`` leaves when its process is killed mid-write is found by its naming
    (``.<name>.<random>.tmp``) and removed; the file itself and others' temporaries stay."""
    from common.atomic import atomic_path, remove_stale_temporaries

    manifest = tmp_path / "manifest.parquet"
    manifest.write_bytes(b"kept")
    with atomic_path(manifest) as tmp:  # a write cut short: the temporary exists, as after SIGKILL
        leftover = tmp.with_name(tmp.name.replace(".tmp", "x.tmp"))
        tmp.rename(leftover)
        tmp.write_bytes(b"new")
    others = [tmp_path / "shard-000000.tar.tmp", tmp_path / ".summary.json.abc.tmp"]
    for other in others:
        other.write_bytes(b"")
    assert remove_stale_temporaries(manifest) == [leftover]
    assert not leftover.exists() and manifest.read_bytes() == b"new" and all(o.exists() for o in others)


def test_an_object_whose_file_changed_leaves_its_shard_so_it_is_never_in_two(tmp_path):
    """Rendered, then its file changes: it is rendered again, and its old samples leave the shard
    they were in (the shard is rewritten without them; emptied, it is removed)."""
    store = Store(tmp_path)
    _commit_shard(store, "shard-000000.tar", ["a", "b"])
    rows = {u: ManifestRow(u, "local", f"/{u}", sha256="s1", status="done", shard="shard-000000.tar")
            for u in ("a", "b")}

    def rerun(records):
        rendered_in = {uid: row.shard for uid, row in rows.items() if row.status == "done"}
        merge_records(rows, records)
        drop_changed_objects(store, rows, rendered_in)
        reconcile_shards(rows, store)

    rerun([rec("a", sha="s2"), rec("b")])  # a's file changed
    assert rows["a"].status == "pending" and rows["b"].status == "done"
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        assert sorted({n.split(".")[0] for n in tar.getnames()}) == ["b_o0", "b_o1"]
    index = json.loads((tmp_path / "shard-000000.index.json").read_text())
    assert index["uids"] == ["b"] and index["num_bytes"] == (tmp_path / "shard-000000.tar").stat().st_size
    rerun([rec("a", sha="s2"), rec("b", sha="s3")])  # b's too: the shard is left with nothing
    assert rows["b"].status == "pending" and not list(tmp_path.glob("shard-*"))
