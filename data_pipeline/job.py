"""The render job: objects -> Ray (persistent Blender actors, or one task and Blender process
per object: :mod:`data_pipeline.render_workers`) -> shards written by the driver as results
arrive -> manifest.

Durability: a shard is renamed to its final name only when complete, and only then does the
manifest mark its objects ``done`` (the manifest file is rewritten soon after, see
MANIFEST_FLUSH_S). A kill in between leaves a finished shard that no row names: the next run
adopts it (its objects become ``done``) instead of rendering them again, so samples are never
duplicated; samples of a shard that was still open were never committed and their objects
are simply rendered again.
"""

from __future__ import annotations

import json
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from data_pipeline.atomic import atomic_write_text, remove_stale_temporaries
from data_pipeline.contact_sheet import write_contact_sheet
from data_pipeline.conventions import key_uid
from data_pipeline.manifest import (
    ManifestRow,
    merge_records,
    read_manifest,
    status_counts,
    write_manifest,
)
from data_pipeline.render import RenderSettings
from data_pipeline.render_workers import WORKER_MODES, ActorPool, TaskPool, TaskResult
from data_pipeline.shards import ShardWriter, list_shards
from data_pipeline.sources import ObjectRecord

MANIFEST_NAME = "manifest.parquet"
CONTACT_SHEET_NAME = "contact_sheet.png"
SUMMARY_NAME = "job_summary.json"
# The manifest is rewritten whole while rendering at most every MANIFEST_FLUSH_S seconds, or
# every MANIFEST_WRITE_RATIO times as long as a write took (large manifests: Objaverse's 800K
# rows take seconds), and at the end. A shard finished in between and not yet recorded is
# adopted by the next run (reconcile_shards).
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

    output: Path
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
def shard_uids(path: Path) -> set[str]:
    """uids whose samples a finished shard holds (from member names ``<uid>_o<k>.*``)."""
    with tarfile.open(path) as tar:
        keys = {name.split(".", 1)[0] for name in tar.getnames()}
    return {key_uid(key) for key in keys}


def reconcile_shards(rows: dict[str, ManifestRow], output: Path) -> None:
    """Make the manifest agree with the shards on disk.

    A finished shard that no ``done`` row names (killed between the rename and the manifest
    write) is adopted: its objects become ``done`` in it. A ``done`` row whose shard is gone
    goes back to ``pending``.
    """
    named = {row.shard for row in rows.values() if row.status == "done"}
    for shard in list_shards(output):
        if shard.name in named:
            continue
        for uid in shard_uids(shard):
            row = rows.get(uid) or ManifestRow(uid=uid, source="unknown", path="")
            row.update(status="done", shard=shard.name, reason="adopted from an orphan shard")
            rows[uid] = row
    present = {shard.name for shard in list_shards(output)}
    for row in rows.values():
        if row.status == "done" and row.shard not in present:
            row.update(status="pending", shard=None, reason=f"shard {row.shard} missing")


def objects_to_render(rows: dict[str, ManifestRow], records: list[ObjectRecord],
                      max_retries: int) -> list[ObjectRecord]:
    """This run's records that are pending, or failed with retries left (in record order)."""
    todo = []
    for record in records:
        row = rows[record.uid]
        if row.status == "pending" or (row.status == "failed" and row.attempts <= max_retries):
            todo.append(record)
    return todo


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


def make_pool(ray, config: JobConfig, objects: int):
    """The worker pool of ``config.worker_mode``, never larger than the work (``objects``).
    Persistent actors: ``config.actors``, else one per local CPU (or GPU share), on a cluster
    CLUSTER_ACTORS (pending actors, like pending tasks, make the autoscaler add nodes);
    ``max_in_flight`` caps them too."""
    window = config.max_in_flight or in_flight_window(ray, config)
    if config.worker_mode == "per-object":
        return TaskPool(ray, config.settings, window, config.gpus_per_task)
    if config.actors:
        actors = config.actors
    elif config.ray_address:
        actors = CLUSTER_ACTORS
    else:
        resources = ray.cluster_resources()
        share = config.gpus_per_task or 1.0
        actors = max(1, int(resources.get("GPU" if config.gpus_per_task else "CPU", 1) / share))
    actors = min(actors, objects, window)
    return ActorPool(ray, config.settings, actors, window, config.gpus_per_task,
                     config.objects_per_worker, config.recycle_rss_gb)


def run_job(records: list[ObjectRecord], config: JobConfig,
            filtered: list[tuple[ObjectRecord, str]] = ()) -> JobSummary:
    """Render every object of ``records`` not yet done into ``config.output``.

    Writes ``shard-*.tar``, ``manifest.parquet``, ``contact_sheet.png`` and ``job_summary.json``.
    Re-running skips ``done`` objects and retries ``failed`` ones up to ``max_retries`` times.
    """
    started = time.perf_counter()
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    manifest_path = output / MANIFEST_NAME
    duplicates = len(records) - len({r.uid for r in records})
    if duplicates:
        raise ValueError(f"{duplicates} objects share a uid: uids must be unique")

    remove_stale_temporaries(manifest_path)  # a manifest write cut short by a kill
    rows = read_manifest(manifest_path)
    merge_records(rows, records, filtered)
    reconcile_shards(rows, output)
    write_manifest(manifest_path, rows.values())
    todo = objects_to_render(rows, records, config.max_retries)

    rendered, failed, seconds = 0, 0, []
    if todo:
        ray = _init_ray(config)
        try:
            rendered, failed, seconds = _render_all(ray, todo, rows, config, manifest_path)
        finally:
            ray.shutdown()

    counts = status_counts(rows.values())
    wall = time.perf_counter() - started
    summary = JobSummary(
        done=counts["done"], failed=counts["failed"], filtered=counts["filtered"],
        pending=counts["pending"], rendered_this_run=rendered, failed_this_run=failed,
        wall_seconds=wall, objects_per_hour=rendered / wall * 3600 if rendered else 0.0,
        mean_render_seconds=sum(seconds) / len(seconds) if seconds else None,
        shards=len(list_shards(output)),
    )
    atomic_write_text(output / SUMMARY_NAME,
                      json.dumps({**asdict(summary), "settings": asdict(config.settings),
                                  "worker_mode": config.worker_mode}, indent=2))
    if config.contact_sheet:
        done_shards = sorted({row.shard for row in rows.values() if row.status == "done"})
        write_contact_sheet([output / s for s in done_shards], output / CONTACT_SHEET_NAME)
    return summary


def _render_all(ray, todo, rows, config, manifest_path):
    """Submit objects to the worker pool in a bounded window, write shards as results arrive,
    keep the manifest in step. Returns (rendered, failed, [render seconds])."""
    pool = make_pool(ray, config, len(todo))
    queue, in_flight = list(reversed(todo)), {}
    unrecorded: dict[str, TaskResult] = {}  # rendered, in the open shard, not yet in the manifest
    rendered, failed, seconds = 0, 0, []
    last_write, write_cost, dirty = time.monotonic(), 0.0, False

    def flush(force: bool = False) -> None:
        nonlocal last_write, write_cost, dirty
        wait = max(MANIFEST_FLUSH_S, MANIFEST_WRITE_RATIO * write_cost)
        if dirty and (force or time.monotonic() - last_write >= wait):
            start = time.monotonic()
            write_manifest(manifest_path, rows.values())
            last_write, write_cost, dirty = time.monotonic(), time.monotonic() - start, False

    def commit(closed) -> None:
        """Objects of a shard that is complete under its final name become done."""
        nonlocal dirty
        for uid in closed.uids:
            result = unrecorded.pop(uid)
            rows[uid].update(status="done", reason=result.note, shard=closed.path.name,
                             attempts=rows[uid].attempts + 1, render_seconds=result.seconds,
                             size=result.size, sha256=result.sha256)
        dirty = True

    progress = tqdm(total=len(todo), desc="render", unit="obj", dynamic_ncols=True)
    with ShardWriter(config.output, config.per_shard) as writer:
        while queue or in_flight:
            while queue and pool.has_room():
                record = queue.pop()
                in_flight[pool.submit(record)] = record
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            record = in_flight.pop(ready[0])
            pool.finished(ready[0], queue_empty=not queue)
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayError as error:  # the worker died max_retries + 1 times
                result = TaskResult(record.uid, False, 0.0, reason=f"worker died: {error}")
            if result.ok:
                rendered += 1
                seconds.append(result.seconds)
                unrecorded[record.uid] = result
                closed = writer.add_object(record.uid, result.samples)
                result.samples = None
                if closed:
                    commit(closed)
            else:
                failed += 1
                row = rows[record.uid]
                row.update(status="failed", reason=result.reason, attempts=row.attempts + 1,
                           render_seconds=result.seconds)
                dirty = True
                tqdm.write(f"failed {record.uid}: {result.reason}")
            flush()
            progress.update(1)
            progress.set_postfix(done=rendered, failed=failed)
        closed = writer.close()
    progress.close()
    pool.close()
    if closed:
        commit(closed)
    dirty = True
    flush(force=True)
    return rendered, failed, seconds
