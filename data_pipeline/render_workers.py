"""Where the render job's objects are rendered, on Ray, and where their shards are written.

The job hands out **work units** (:class:`Unit`): a shard name and the objects that go into it.
The worker that renders a unit writes its shard on its own node's local disk, commits it whole to
the output store under that name (:class:`data_pipeline.storage.Store`: a rename, or one upload),
then writes the shard's index, and sends the driver only a small :class:`UnitResult` (per object:
uid, status, reason, sizes, checksum; the job's first units add a few fixed-size preview rows
for the contact sheet, 16 objects in all). The driver never receives the renders.

Two worker modes. ``persistent`` (default): a pool of Ray actors (:class:`RenderActor`), each
keeping one Blender process alive across the objects it renders
(:class:`data_pipeline.blender_process.BlenderProcess`: reset between objects, recycled after
``objects_per_worker`` objects or when its memory grows past ``recycle_rss_gb``). ``per-object``:
one Ray task per unit, a new Blender process for every object.

Failures keep the same meaning in both modes: a timeout, the memory cap or a crash kill that
Blender process and fail the object with a reason (a reused process is first replaced by a fresh
one and the object tried once more, :func:`data_pipeline.render.run_worker`); a Ray worker or
actor that dies is restarted by Ray and its unit rendered again (``RAY_RETRIES`` times), into the
same shard name; a shard that cannot be written after the store's retries fails its objects with
a reason naming the URL (a re-run retries them).
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from data_pipeline.blender_process import BlenderProcess
from data_pipeline.contact_sheet import labelled_row
from data_pipeline.render import FRESH_RETRY_WARNING, RenderError, RenderSettings, render_object
from data_pipeline.shards import ShardInfo, decode_sample, encode_object, index_name, write_shard
from data_pipeline.sources import ObjectRecord, file_sha256, resolve_path
from data_pipeline.storage import Store, StorageError

WORKER_MODES = ("persistent", "per-object")
RAY_RETRIES = 2  # retries of a unit whose Ray worker (task) or actor died
PER_ACTOR_IN_FLIGHT = 2  # one rendering and one waiting: an actor never waits for the driver


@dataclass
class Unit:
    """One work unit: the objects whose samples go into the shard ``shard`` (a file name), and how
    many of its first objects to draw for the job's contact sheet."""

    shard: str
    records: list[ObjectRecord]
    previews: int = 0


@dataclass
class ObjectResult:
    """One object's outcome, for the manifest. ``note``: for a rendered object, what went wrong on
    the way (e.g. a retry on a fresh Blender worker)."""

    uid: str
    ok: bool
    seconds: float
    reason: str | None = None
    size: int | None = None
    sha256: str | None = None
    note: str | None = None


@dataclass
class UnitResult:
    """What a worker sends back for a unit: no pixels but one fixed-size preview row (PNG)."""

    shard: str
    objects: list[ObjectResult]
    index: ShardInfo | None = None  # None when no object rendered (no shard written)
    previews: list[bytes] = field(default_factory=list)  # contact-sheet rows (unit.previews at most)


def render_one(record: ObjectRecord, settings: RenderSettings,
               worker: BlenderProcess | None = None) -> tuple[ObjectResult, list[dict] | None]:
    """Render one object and encode its samples (runs inside a Ray worker or actor).

    Render failures (RenderError) and errors fetching or reading the object become a failed
    result with a reason, so one bad object never stops the job.

    Returns:
        (its result, its samples or None when it failed)
    """
    start = time.perf_counter()
    try:
        path = resolve_path(record)
        renders = render_object(path, record.uid, settings, source=record.source, worker=worker)
        samples = encode_object(renders)
        size = record.size if record.sha256 else os.path.getsize(path)
        sha = record.sha256 or file_sha256(path)
    except RenderError as error:
        return ObjectResult(record.uid, False, time.perf_counter() - start,
                            reason=f"{error.reason}: {error}"), None
    except Exception as error:  # noqa: BLE001 - any other failure is recorded, the job goes on
        return ObjectResult(record.uid, False, time.perf_counter() - start,
                            reason=f"error: {type(error).__name__}: {error}"), None
    note = next((w for w in renders[0].meta["warnings"] if w.startswith(FRESH_RETRY_WARNING)), None)
    return ObjectResult(record.uid, True, time.perf_counter() - start, size=size, sha256=sha,
                        note=note), samples


def _preview(samples: list[dict]) -> bytes:
    """The contact-sheet row of an object's first orbit, as PNG bytes (fixed size)."""
    row = labelled_row(decode_sample(samples[0]))
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(row)).save(buffer, format="PNG")
    return buffer.getvalue()


def render_unit(unit: Unit, settings: RenderSettings, output: str,
                worker: BlenderProcess | None = None) -> UnitResult:
    """Render a unit's objects into one shard on this node's disk, commit it to the output
    store under ``unit.shard``, then write its index. Objects are rendered one at a time and
    their samples appended to the local file as they come (memory holds one object).

    A shard that cannot be committed (the store's retries exhausted) fails the unit's rendered
    objects with the store's error; nothing is left under the shard's name then.
    """
    store = Store(output)
    results: list[ObjectResult] = []
    previews: list[bytes] = []

    def rendered():
        for record in unit.records:
            result, samples = render_one(record, settings, worker)
            results.append(result)
            if samples:
                if len(previews) < unit.previews:
                    previews.append(_preview(samples))
                yield record.uid, samples

    with store.staged(unit.shard) as path:
        try:
            index = write_shard(path, unit.shard, rendered())
            if not index.uids:
                return UnitResult(unit.shard, results)
            store.commit_file(path, unit.shard)
            store.write_bytes(index_name(unit.shard), index.to_json())
        except StorageError as error:
            for result in results:
                if result.ok:
                    result.ok, result.reason = False, f"storage: {error}"
            return UnitResult(unit.shard, results)
    return UnitResult(unit.shard, results, index=index, previews=previews)


class RenderActor:
    """A Ray actor that renders units one after another in one persistent Blender process."""

    def __init__(self, settings: RenderSettings, output: str, objects_per_worker: int,
                 recycle_rss_gb: float | None):
        self.settings, self.output = settings, output
        self.worker = BlenderProcess(settings.memory_limit_gb, objects_per_worker, recycle_rss_gb)

    def render(self, unit: Unit) -> UnitResult:
        return render_unit(unit, self.settings, self.output, self.worker)

    def close(self) -> None:
        """End the Blender process (and remove its folder)."""
        self.worker.close()


class TaskPool:
    """``per-object``: a Ray task per unit (a Blender process per object), in a bounded window."""

    def __init__(self, ray, settings: RenderSettings, output: str, window: int, gpus_per_task: float):
        self._task = ray.remote(render_unit).options(max_retries=RAY_RETRIES, num_gpus=gpus_per_task)
        self._settings = ray.put(settings)
        self._output = output
        self._window = window
        self._in_flight = 0

    def has_room(self) -> bool:
        return self._in_flight < self._window

    def submit(self, unit: Unit):
        self._in_flight += 1
        return self._task.remote(unit, self._settings, self._output)

    def finished(self, ref, queue_empty: bool) -> None:
        self._in_flight -= 1

    def close(self) -> None:
        pass


class ActorPool:
    """``persistent``: ``actors`` RenderActors, up to PER_ACTOR_IN_FLIGHT units each (and
    ``window`` in all); an actor with nothing left to do is closed at once, which frees its
    resources (on a cluster the autoscaler can then remove its node)."""

    def __init__(self, ray, settings: RenderSettings, output: str, actors: int, window: int,
                 gpus_per_task: float, objects_per_worker: int, recycle_rss_gb: float | None):
        self._ray = ray
        cls = ray.remote(RenderActor).options(num_cpus=1, num_gpus=gpus_per_task, max_restarts=-1,
                                              max_task_retries=RAY_RETRIES)
        self._load = {cls.remote(settings, output, objects_per_worker, recycle_rss_gb): 0
                      for _ in range(actors)}
        self._actor_of = {}
        self._window = min(window, PER_ACTOR_IN_FLIGHT * actors)
        self._closing = []

    def has_room(self) -> bool:
        least = min(self._load.values(), default=PER_ACTOR_IN_FLIGHT)
        return sum(self._load.values()) < self._window and least < PER_ACTOR_IN_FLIGHT

    def submit(self, unit: Unit):
        actor = min(self._load, key=self._load.get)
        self._load[actor] += 1
        ref = actor.render.remote(unit)
        self._actor_of[ref] = actor
        return ref

    def finished(self, ref, queue_empty: bool) -> None:
        actor = self._actor_of.pop(ref)
        self._load[actor] -= 1
        if queue_empty and self._load[actor] == 0:
            self._release(actor)

    def _release(self, actor) -> None:
        del self._load[actor]
        self._closing.append(actor.close.remote())

    def close(self) -> None:
        """Close every actor's Blender process (waits for them, at most a minute)."""
        for actor in list(self._load):
            self._release(actor)
        if self._closing:
            self._ray.wait(self._closing, num_returns=len(self._closing), timeout=60)
        self._closing.clear()
