"""Where the render job's objects are rendered, on Ray: two worker modes.

``persistent`` (default): a pool of Ray actors (:class:`RenderActor`), each keeping one Blender
process alive across the objects it renders (:class:`data_pipeline.blender_process.BlenderProcess`:
reset between objects, recycled after ``objects_per_worker`` objects or when its memory grows
past ``recycle_rss_gb``). Each actor holds its CPU (or GPU share) for the whole job, up to the
moment no object is left for it.

``per-object``: one Ray task per object, one Blender process per task (Blender, BlenderProc
and the worker start again for every object).

Both return a :class:`TaskResult` per object; the driver (:mod:`data_pipeline.job`) writes it.
Failures keep the same meaning in both modes: a timeout, the memory cap or a crash kill that
Blender process and fail the object with a reason (a reused process is first replaced by a
fresh one and the object tried once more, :func:`data_pipeline.render.run_worker`); a Ray
worker or actor that dies is restarted by Ray and its object retried (``RAY_RETRIES`` times).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from data_pipeline.blender_process import BlenderProcess
from data_pipeline.render import FRESH_RETRY_WARNING, RenderError, RenderSettings, render_object
from data_pipeline.shards import encode_object
from data_pipeline.sources import ObjectRecord, file_sha256, resolve_path

WORKER_MODES = ("persistent", "per-object")
RAY_RETRIES = 2  # retries of an object whose Ray worker (task) or actor died
PER_ACTOR_IN_FLIGHT = 2  # one rendering and one waiting: an actor never waits for the driver


@dataclass
class TaskResult:
    """What a render task sends back to the driver: encoded samples or a failure reason.
    ``note``: for a rendered object, what went wrong on the way (e.g. a retry on a fresh
    Blender worker), for the manifest."""

    uid: str
    ok: bool
    seconds: float
    samples: list[dict] | None = None
    reason: str | None = None
    size: int | None = None
    sha256: str | None = None
    note: str | None = None


def render_task(record: ObjectRecord, settings: RenderSettings,
                worker: BlenderProcess | None = None) -> TaskResult:
    """Render one object and encode its samples (runs inside a Ray worker or actor).

    Render failures (RenderError) and errors fetching or reading the object become a failed
    result with a reason, so one bad object never stops the job.
    """
    start = time.perf_counter()
    try:
        path = resolve_path(record)
        renders = render_object(path, record.uid, settings, source=record.source, worker=worker)
        samples = encode_object(renders, record.uid)
        size = record.size if record.sha256 else os.path.getsize(path)
        sha = record.sha256 or file_sha256(path)
    except RenderError as error:
        return TaskResult(record.uid, False, time.perf_counter() - start,
                          reason=f"{error.reason}: {error}")
    except Exception as error:  # noqa: BLE001 - any other failure is recorded, the job goes on
        return TaskResult(record.uid, False, time.perf_counter() - start,
                          reason=f"error: {type(error).__name__}: {error}")
    note = next((w for w in renders[0].meta["warnings"] if w.startswith(FRESH_RETRY_WARNING)), None)
    return TaskResult(record.uid, True, time.perf_counter() - start, samples=samples,
                      size=size, sha256=sha, note=note)


class RenderActor:
    """A Ray actor that renders objects one after another in one persistent Blender process."""

    def __init__(self, settings: RenderSettings, objects_per_worker: int, recycle_rss_gb: float | None):
        self.settings = settings
        self.worker = BlenderProcess(settings.memory_limit_gb, objects_per_worker, recycle_rss_gb)

    def render(self, record: ObjectRecord) -> TaskResult:
        return render_task(record, self.settings, self.worker)

    def close(self) -> None:
        """End the Blender process (and remove its folder)."""
        self.worker.close()


class TaskPool:
    """``per-object``: Ray tasks in a bounded window."""

    def __init__(self, ray, settings: RenderSettings, window: int, gpus_per_task: float):
        self._task = ray.remote(render_task).options(max_retries=RAY_RETRIES, num_gpus=gpus_per_task)
        self._settings = ray.put(settings)
        self._window = window
        self._in_flight = 0

    def has_room(self) -> bool:
        return self._in_flight < self._window

    def submit(self, record: ObjectRecord):
        self._in_flight += 1
        return self._task.remote(record, self._settings)

    def finished(self, ref, queue_empty: bool) -> None:
        self._in_flight -= 1

    def close(self) -> None:
        pass


class ActorPool:
    """``persistent``: ``actors`` RenderActors, up to PER_ACTOR_IN_FLIGHT objects each (and
    ``window`` in all); an actor with nothing left to do is closed at once, which frees its
    resources (on a cluster the autoscaler can then remove its node)."""

    def __init__(self, ray, settings: RenderSettings, actors: int, window: int, gpus_per_task: float,
                 objects_per_worker: int, recycle_rss_gb: float | None):
        self._ray = ray
        cls = ray.remote(RenderActor).options(num_cpus=1, num_gpus=gpus_per_task, max_restarts=-1,
                                              max_task_retries=RAY_RETRIES)
        self._load = {cls.remote(settings, objects_per_worker, recycle_rss_gb): 0 for _ in range(actors)}
        self._actor_of = {}
        self._window = min(window, PER_ACTOR_IN_FLIGHT * actors)
        self._closing = []

    def has_room(self) -> bool:
        least = min(self._load.values(), default=PER_ACTOR_IN_FLIGHT)
        return sum(self._load.values()) < self._window and least < PER_ACTOR_IN_FLIGHT

    def submit(self, record: ObjectRecord):
        actor = min(self._load, key=self._load.get)
        self._load[actor] += 1
        ref = actor.render.remote(record)
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
