"""The persistent Blender worker (data_pipeline.blender_process) with real Blender at 32 px:
no state leaks between objects (frames compared with a fresh process's), recycling, and faults
(a hung or killed reused process is replaced and the object rendered again on a fresh one; a
fault in a fresh process fails the object as it always did)."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from data_paths import ASSETS

from data_pipeline.blender_process import BlenderProcess
from data_pipeline.render import FRESH_RETRY_WARNING, RenderError, RenderSettings, render_object

pytestmark = pytest.mark.blender

DUCK, FUZE = ASSETS / "Duck.glb", ASSETS / "fuze" / "fuze.obj"
TINY = RenderSettings(resolution=32, samples=4, frames=(0, 7), denoise=True, timeout_s=300)
ONE_FRAME = RenderSettings(resolution=32, samples=1, frames=(0,), num_orbits=1, denoise=False, timeout_s=300)


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_an_object_after_another_renders_as_in_a_fresh_process():
    """Measured here: bit-identical RGBA and CCM (Cycles on CPU with a fixed seed, and OIDN,
    are deterministic), so the test asks for identity."""
    alone = render_object(DUCK, "duck", TINY)  # a process for this object alone
    with BlenderProcess(TINY.memory_limit_gb, max_objects=2) as worker:
        render_object(FUZE, "fuze", TINY, worker=worker)  # another importer, textures, materials
        pid = worker.pid
        after = render_object(DUCK, "duck", TINY, worker=worker)
        assert worker.processes_started == 1 and pid is not None
        assert worker.pid is None and _gone(pid)  # recycled after max_objects = 2
    for a, b in zip(alone, after):
        np.testing.assert_array_equal(a.rgba, b.rgba)
        np.testing.assert_array_equal(a.ccm, b.ccm)
        assert a.meta == b.meta


def test_recycled_when_memory_grows_past_the_bound():
    with BlenderProcess(ONE_FRAME.memory_limit_gb, max_objects=100, recycle_rss_gb=0.01) as worker:
        render_object(DUCK, "duck", ONE_FRAME, worker=worker)
        assert worker.pid is None and worker.processes_started == 1
    with BlenderProcess(ONE_FRAME.memory_limit_gb, max_objects=100, recycle_rss_gb=50) as worker:
        render_object(DUCK, "duck", ONE_FRAME, worker=worker)
        assert worker.pid is not None and worker.warm


def test_a_hung_reused_worker_is_killed_and_the_object_rendered_on_a_fresh_one():
    settings = dataclasses.replace(ONE_FRAME, timeout_s=12)
    with BlenderProcess(settings.memory_limit_gb, max_objects=100) as worker:
        render_object(DUCK, "duck", settings, worker=worker)
        hung = worker.pid
        os.kill(hung, signal.SIGSTOP)  # it hangs: never reads the next job
        try:
            (orbit,) = render_object(FUZE, "fuze", settings, worker=worker)
        finally:
            if not _gone(hung):
                os.kill(hung, signal.SIGKILL)
        assert _gone(hung) and worker.pid not in (None, hung) and worker.processes_started == 2
        (note,) = [w for w in orbit.meta["warnings"] if w.startswith(FRESH_RETRY_WARNING)]
        assert "timeout" in note
        assert (orbit.rgba[..., 3] > 0).mean() > 0.02  # a real render of the object


def test_a_reused_worker_killed_during_an_object_is_replaced_and_the_object_rendered():
    slow = RenderSettings(resolution=32, samples=4, timeout_s=300)  # 2 x 16 frames: seconds of work
    with BlenderProcess(slow.memory_limit_gb, max_objects=100) as worker:
        render_object(DUCK, "duck", ONE_FRAME, worker=worker)
        victim = worker.pid
        killer = threading.Timer(0.8, os.kill, (victim, signal.SIGKILL))
        killer.start()
        started = time.monotonic()
        orbits = render_object(FUZE, "fuze", slow, worker=worker)
        killer.join()
        assert time.monotonic() - started > 0.8  # the kill came while the object rendered
        assert _gone(victim) and worker.pid != victim and worker.processes_started == 2
    notes = [w for w in orbits[0].meta["warnings"] if w.startswith(FRESH_RETRY_WARNING)]
    assert len(notes) == 1 and "worker_crashed" in notes[0]
    assert [o.rgba.shape for o in orbits] == [(16, 32, 32, 4)] * 2


def test_a_fault_in_a_fresh_worker_fails_the_object_without_a_retry():
    settings = dataclasses.replace(ONE_FRAME, timeout_s=0.5)
    with BlenderProcess(settings.memory_limit_gb, max_objects=100) as worker:
        with pytest.raises(RenderError) as info:
            render_object(DUCK, "duck", settings, worker=worker)
        assert info.value.reason == "timeout" and worker.processes_started == 1 and worker.pid is None
