"""The render job: objects -> work units on Ray (persistent Blender actors, or one task and a
Blender process per object: :mod:`data_pipeline.render_workers`) -> each unit's shard written
to the output store by the worker that rendered it -> manifest, written by the driver.

The output is a local folder or an object store (``s3://bucket/prefix``, any fsspec URL:
:class:`data_pipeline.storage.Store`). The driver hands out units and records small results; it
never receives pixels.

Exactly once: a unit's shard name is fixed when the unit is planned, and the plan is in the
manifest (a pending object's ``shard``) before any unit starts. A shard appears under its final
name only when complete (a rename, or one upload), its index after it, the manifest last. A
re-run lists the store: a finished shard that no ``done`` row names (a kill after its commit) is
adopted, its objects ``done``; a planned unit whose shard is not there is rendered again into the
same name; unfinished writes (temporaries, multipart uploads) are removed. So every object ends
in exactly one shard, however often the job is killed and started again.
"""

from __future__ import annotations

import json
import math
import os
import tarfile
import time
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

from common.conventions import NUM_ORBITS
from data_pipeline.contact_sheet import contact_sheet
from data_pipeline.manifest import (
    ManifestRow,
    manifest_bytes,
    merge_records,
    parse_manifest,
    status_counts,
)
from data_pipeline.render import RenderSettings
from data_pipeline.render_workers import WORKER_MODES, ActorPool, ObjectResult, TaskPool, Unit, UnitResult
from data_pipeline.shards import (
    SHARD_GLOB,
    SHARD_PATTERN,
    ShardInfo,
    copy_shard_without,
    index_name,
    is_shard_name,
    shard_index,
)
from data_pipeline.sources import ObjectRecord
from data_pipeline.storage import Store

MANIFEST_NAME = "manifest.parquet"
CONTACT_SHEET_NAME = "contact_sheet.png"
SUMMARY_NAME = "job_summary.json"
CONTACT_SHEET_OBJECTS = 16
# The manifest is rewritten whole while rendering at most every MANIFEST_FLUSH_S seconds, or
# every MANIFEST_WRITE_RATIO times as long as a write took (large manifests: Objaverse's 800K
# rows take seconds; an object store adds the upload), and at the end. A shard committed in
# between and not yet recorded is adopted by the next run (reconcile_shards).
MANIFEST_FLUSH_S = 10.0
MANIFEST_WRITE_RATIO = 10.0
CLUSTER_IN_FLIGHT = 1024
# Persistent actors on a cluster when --actors is not given: infra/render.yaml's 32 GPU nodes,
# two actors per GPU (--gpus-per-task 0.5), so that one imports while the other renders.
CLUSTER_ACTORS = 64


@dataclass
class JobConfig:
    """How to run a job. ``ray_address=None`` starts a local Ray with ``workers`` CPUs;
    ``"auto"`` joins the cluster this process runs on (``ray submit``). ``worker_mode``:
    ``persistent`` (``actors`` Ray actors, each one Blender process kept alive for up to
    ``objects_per_worker`` objects or until it holds more than ``recycle_rss_gb`` of memory)
    or ``per-object`` (a Ray task and a Blender process per object)."""

    output: str  # a local folder or an fsspec URL (s3://bucket/prefix)
    settings: RenderSettings = field(default_factory=RenderSettings)
    workers: int | None = None
    ray_address: str | None = None
    per_shard: int = 64
    max_retries: int = 2
    gpus_per_task: float = 0.0
    max_in_flight: int | None = None
    contact_sheet: bool = True
    worker_mode: str = "persistent"
    actors: int | None = None
    objects_per_worker: int = 100
    recycle_rss_gb: float | None = 4.0

    def __post_init__(self):
        if self.worker_mode not in WORKER_MODES:
            raise ValueError(f"worker_mode {self.worker_mode!r} not in {WORKER_MODES}")


@dataclass
class JobSummary:
    """Counts over the whole manifest plus what this run did."""

    done: int
    failed: int
    filtered: int
    pending: int
    rendered_this_run: int
    failed_this_run: int
    wall_seconds: float
    objects_per_hour: float
    mean_render_seconds: float | None
    shards: int

    def __str__(self) -> str:
        mean = "n/a" if self.mean_render_seconds is None else f"{self.mean_render_seconds:.1f} s"
        return (
            f"manifest: {self.done} done, {self.failed} failed, {self.filtered} filtered, "
            f"{self.pending} pending; {self.shards} shards\n"
            f"this run: {self.rendered_this_run} rendered, {self.failed_this_run} failed in "
            f"{self.wall_seconds:.1f} s = {self.objects_per_hour:.0f} objects/hour "
            f"(mean render time per object {mean})"
        )


# ----------------------------------------------------------------------------- resume
def read_index(store: Store, shard: str) -> ShardInfo:
    """A finished shard's index. A shard committed without one (a kill between the two writes)
    gets it now, from its member names (read in one pass)."""
    try:
        return ShardInfo.from_json(store.read_bytes(index_name(shard)), store.url_of(index_name(shard)))
    except FileNotFoundError:
        pass
    info = ShardInfo(name=shard)
    with store.open(shard) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            info.add_member(member.name)
    store.write_bytes(index_name(shard), info.to_json())
    return info


def drop_changed_objects(store: Store, rows: dict[str, ManifestRow], rendered_in: dict[str, str]) -> None:
    """Objects that were ``done`` in a shard (``rendered_in``: uid -> shard) and are ``pending``
    again (their file changed, :func:`merge_records`) leave that shard, so that their new render
    is the only one: the shard is rewritten without their samples and committed under its name
    (a kill leaves the old or the new version, whole), then its index; a shard left with no
    object is removed (index first)."""
    stale: dict[str, set[str]] = {}
    for uid, shard in rendered_in.items():
        if rows[uid].status == "pending":
            stale.setdefault(shard, set()).add(uid)
    present = set(store.list(SHARD_GLOB))
    for shard, uids in sorted(stale.items()):
        if shard not in present or not uids & set(read_index(store, shard).uids):
            continue
        with store.staged(shard) as local:
            with store.open(shard) as stream:
                info = copy_shard_without(stream, local, shard, uids)
            if info.uids:
                store.commit_file(local, shard)
                store.write_bytes(index_name(shard), info.to_json())
            else:
                store.remove(index_name(shard))
                store.remove(shard)


def reconcile_shards(rows: dict[str, ManifestRow], store: Store) -> list[str]:
    """Make the manifest agree with the shards the store holds (a fresh listing).

    A finished shard that no ``done`` row names (killed between its commit and the manifest
    write) is adopted: its objects become ``done`` in it. A ``done`` row whose shard is gone goes
    back to ``pending``.

    Returns:
        the names of the shards in the store.
    """
    present = [name for name in store.list(SHARD_GLOB) if is_shard_name(name)]
    named = {row.shard for row in rows.values() if row.status == "done"}
    for shard in present:
        if shard in named:
            continue
        for uid in read_index(store, shard).uids:
            row = rows.get(uid) or ManifestRow(uid=uid, source="unknown", path="")
            row.update(status="done", shard=shard, reason="adopted from an orphan shard")
            rows[uid] = row
    for row in rows.values():
        if row.status == "done" and row.shard not in present:
            row.update(status="pending", shard=None, reason=f"shard {row.shard} missing")
    return present


def objects_to_render(rows: dict[str, ManifestRow], records: list[ObjectRecord],
                      max_retries: int) -> list[ObjectRecord]:
    """This run's records that are pending, or failed with retries left (in record order)."""
    todo = []
    for record in records:
        row = rows[record.uid]
        if row.status == "pending" or (row.status == "failed" and row.attempts <= max_retries):
            todo.append(record)
    return todo


def plan_units(rows: dict[str, ManifestRow], todo: list[ObjectRecord], present: list[str],
               objects_per_unit: int) -> list[Unit]:
    """Work units for ``todo``, their shard names recorded in the rows (``shard`` of a row not
    yet done is its planned shard).

    An object planned into a shard that the store does not hold (a run killed before that unit
    was committed) goes into the same unit again, under the same name: a late write of the killed
    run and this one land on one name. The others go into new units of ``objects_per_unit``
    objects, numbered after every shard name the store or the manifest holds.
    """
    planned: dict[str, list[ObjectRecord]] = {}
    fresh = []
    for record in todo:
        shard = rows[record.uid].shard
        if shard and rows[record.uid].status == "pending" and shard not in present:
            planned.setdefault(shard, []).append(record)
        else:
            fresh.append(record)
    used = set(present) | {row.shard for row in rows.values() if row.shard}
    number = max((shard_index(name) for name in used), default=-1) + 1
    units = [Unit(name, records) for name, records in sorted(planned.items())]
    for start in range(0, len(fresh), objects_per_unit):
        units.append(Unit(SHARD_PATTERN % number, fresh[start:start + objects_per_unit]))
        number += 1
    for unit in units:
        for record in unit.records:
            rows[record.uid].update(shard=unit.shard)
    return units


def ask_for_previews(units: list[Unit], objects: int) -> None:
    """The first units draw the contact sheet's ``objects`` rows (fixed-size PNGs in their
    results); the others send none."""
    for unit in units:
        unit.previews = min(len(unit.records), objects)
        objects -= unit.previews


def objects_per_unit(config: JobConfig, objects: int) -> int:
    """Objects in a unit: a shard's worth (``per_shard`` samples), but no more than what gives
    every worker a unit, so that a small job still renders in parallel."""
    if config.ray_address:
        slots = config.actors or CLUSTER_ACTORS
    else:
        slots = config.actors or config.workers or os.cpu_count() or 1
    return max(1, min(config.per_shard // NUM_ORBITS, math.ceil(objects / slots)))


# ----------------------------------------------------------------------------- the manifest in the store
def read_job_manifest(store: Store) -> dict[str, ManifestRow]:
    """The manifest the store holds (empty when there is none); errors name its URL."""
    try:
        data = store.read_bytes(MANIFEST_NAME)
    except FileNotFoundError:
        return {}
    return parse_manifest(data, store.url_of(MANIFEST_NAME))


def write_job_manifest(store: Store, rows) -> None:
    """Write the manifest whole and atomically into the store."""
    store.write_bytes(MANIFEST_NAME, manifest_bytes(rows))


# ----------------------------------------------------------------------------- driver
def _init_ray(config: JobConfig):
    import ray

    if config.ray_address:
        ray.init(address=config.ray_address)
    else:
        ray.init(num_cpus=config.workers, include_dashboard=False,
                 object_store_memory=512 * 2**20)
    return ray


def in_flight_window(ray, config: JobConfig) -> int:
    """Tasks submitted at once. Locally twice the CPUs (or GPUs); on a cluster enough pending
    tasks for the autoscaler to see the demand and add workers (pending tasks hold only their
    arguments; results are fetched one by one as they finish)."""
    if config.ray_address:
        return CLUSTER_IN_FLIGHT
    resources = ray.cluster_resources()
    return max(2, 2 * int(resources.get("GPU" if config.gpus_per_task else "CPU", 1)))


def make_pool(ray, config: JobConfig, units: int):
    """The worker pool of ``config.worker_mode``, never larger than the work (``units``).
    Persistent actors: ``config.actors``, else one per local CPU (or GPU share), on a cluster
    CLUSTER_ACTORS (pending actors, like pending tasks, make the autoscaler add nodes);
    ``max_in_flight`` caps them too."""
    window = config.max_in_flight or in_flight_window(ray, config)
    if config.worker_mode == "per-object":
        return TaskPool(ray, config.settings, config.output, window, config.gpus_per_task)
    if config.actors:
        actors = config.actors
    elif config.ray_address:
        actors = CLUSTER_ACTORS
    else:
        resources = ray.cluster_resources()
        share = config.gpus_per_task or 1.0
        actors = max(1, int(resources.get("GPU" if config.gpus_per_task else "CPU", 1) / share))
    actors = min(actors, units, window)
    return ActorPool(ray, config.settings, config.output, actors, window, config.gpus_per_task,
                     config.objects_per_worker, config.recycle_rss_gb)


def run_job(records: list[ObjectRecord], config: JobConfig,
            filtered: list[tuple[ObjectRecord, str]] = ()) -> JobSummary:
    """Render every object of ``records`` not yet done into ``config.output``.

    Writes ``shard-*.tar`` with their ``shard-*.index.json``, ``manifest.parquet``,
    ``contact_sheet.png`` and ``job_summary.json``. Re-running skips ``done`` objects and retries
    ``failed`` ones up to ``max_retries`` times.
    """
    started = time.perf_counter()
    store = Store(config.output)
    duplicates = len(records) - len({r.uid for r in records})
    if duplicates:
        raise ValueError(f"{duplicates} objects share a uid: uids must be unique")

    store.remove_unfinished_writes()  # writes cut short by a kill: temporaries, multipart uploads
    rows = read_job_manifest(store)
    rendered_in = {uid: row.shard for uid, row in rows.items() if row.status == "done"}
    merge_records(rows, records, filtered)
    drop_changed_objects(store, rows, rendered_in)
    present = reconcile_shards(rows, store)
    todo = objects_to_render(rows, records, config.max_retries)
    units = plan_units(rows, todo, present, objects_per_unit(config, len(todo)))
    if config.contact_sheet:
        ask_for_previews(units, CONTACT_SHEET_OBJECTS)
    write_job_manifest(store, rows.values())  # the plan, before any unit starts

    rendered, failed, seconds, previews = 0, 0, [], []
    if units:
        ray = _init_ray(config)
        try:
            rendered, failed, seconds, previews = _render_all(ray, units, rows, config, store)
        finally:
            ray.shutdown()
        store.remove_unfinished_writes()  # what workers killed mid-unit left; their units were redone

    counts = status_counts(rows.values())
    wall = time.perf_counter() - started
    summary = JobSummary(
        done=counts["done"], failed=counts["failed"], filtered=counts["filtered"],
        pending=counts["pending"], rendered_this_run=rendered, failed_this_run=failed,
        wall_seconds=wall, objects_per_hour=rendered / wall * 3600 if rendered else 0.0,
        mean_render_seconds=sum(seconds) / len(seconds) if seconds else None,
        shards=sum(is_shard_name(name) for name in store.list(SHARD_GLOB)),
    )
    store.write_bytes(SUMMARY_NAME, json.dumps({**asdict(summary), "settings": asdict(config.settings),
                                                "worker_mode": config.worker_mode}, indent=2).encode())
    sheet = contact_sheet(previews, CONTACT_SHEET_OBJECTS) if previews else None
    if sheet:
        store.write_bytes(CONTACT_SHEET_NAME, sheet)
    return summary


def _render_all(ray, units: list[Unit], rows, config: JobConfig, store: Store):
    """Submit units to the worker pool in a bounded window, record their results as they
    arrive, keep the manifest in step. Returns (rendered, failed, [render seconds], [previews])."""
    pool = make_pool(ray, config, len(units))
    queue, in_flight = list(reversed(units)), {}
    rendered, failed, seconds, previews = 0, 0, [], []
    last_write, write_cost, dirty = time.monotonic(), 0.0, False

    def flush(force: bool = False) -> None:
        nonlocal last_write, write_cost, dirty
        wait = max(MANIFEST_FLUSH_S, MANIFEST_WRITE_RATIO * write_cost)
        if dirty and (force or time.monotonic() - last_write >= wait):
            start = time.monotonic()
            write_job_manifest(store, rows.values())
            last_write, write_cost, dirty = time.monotonic(), time.monotonic() - start, False

    progress = tqdm(total=sum(len(u.records) for u in units), desc="render", unit="obj", dynamic_ncols=True)
    while queue or in_flight:
        while queue and pool.has_room():
            unit = queue.pop()
            in_flight[pool.submit(unit)] = unit
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        unit = in_flight.pop(ready[0])
        pool.finished(ready[0], queue_empty=not queue)
        try:
            result = ray.get(ready[0])
        except ray.exceptions.RayError as error:  # the worker died max_retries + 1 times
            result = UnitResult(unit.shard, [ObjectResult(r.uid, False, 0.0, reason=f"worker died: {error}")
                                             for r in unit.records])
        record_unit(rows, result)
        for obj in result.objects:
            if obj.ok:
                rendered += 1
                seconds.append(obj.seconds)
            else:
                failed += 1
                tqdm.write(f"failed {obj.uid}: {obj.reason}")
        previews += result.previews
        dirty = True
        flush()
        progress.update(len(unit.records))
        progress.set_postfix(done=rendered, failed=failed)
    progress.close()
    pool.close()
    flush(force=True)
    return rendered, failed, seconds, previews


def record_unit(rows: dict[str, ManifestRow], result: UnitResult) -> None:
    """A unit's outcome in the manifest rows: its rendered objects ``done`` in its shard (which is
    committed, with its index, before the result is sent), the others ``failed`` with a reason."""
    for obj in result.objects:
        row = rows[obj.uid]
        if obj.ok:
            row.update(status="done", reason=obj.note, shard=result.shard, attempts=row.attempts + 1,
                       render_seconds=obj.seconds, size=obj.size, sha256=obj.sha256)
        else:
            row.update(status="failed", reason=obj.reason, shard=None, attempts=row.attempts + 1,
                       render_seconds=obj.seconds)
