"""One Blender worker process (:mod:`data_pipeline.blender_worker`) kept alive across objects.

:class:`BlenderProcess` starts the worker when a job comes and none is running, hands it job
files one at a time, and waits for each reply under a timeout. The process runs in its own
session, with a cap on its data memory (``RLIMIT_DATA``: heap, anonymous and private writable
mappings; not ``RLIMIT_AS``, because CUDA/OptiX reserve large inaccessible address ranges that
an address-space cap refuses). It is

* killed (its whole process group) when a job runs past its timeout;
* found dead when it exits during a job (a crash, or the memory cap);
* recycled (closed; the next job starts a fresh one) after ``max_objects`` jobs, or when its
  resident memory after a job exceeds ``recycle_rss_gb``: one process rendering many scenes
  is known to grow (BlenderProc's maintainers report it).

``max_objects=1`` is a process per object. Judging a job's output is the caller's business
(:func:`data_pipeline.render.run_worker`); this module knows only processes.
"""

from __future__ import annotations

import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

LOG_TAIL_CHARS = 2000


@dataclass
class JobOutcome:
    """How one job ended: ``code`` is the worker's reply (0 = output written, else error.json),
    None when the process died (``exit_code``) or ran past the timeout (``timed_out``)."""

    code: int | None
    exit_code: int | None = None
    timed_out: bool = False
    log_tail: str = ""


class BlenderProcess:
    """A Blender worker process reused for up to ``max_objects`` jobs.

    Not thread-safe: one job at a time. :meth:`close` ends the process (also on ``with`` exit).
    """

    def __init__(self, memory_limit_gb: float, max_objects: int = 1,
                 recycle_rss_gb: float | None = None):
        if max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {max_objects}")
        self.memory_limit_gb = memory_limit_gb
        self.max_objects = max_objects
        self.recycle_rss_gb = recycle_rss_gb
        self.jobs_done = 0  # by the current process
        self.processes_started = 0
        self._proc: subprocess.Popen | None = None
        self._reply = None
        self._dir: Path | None = None
        self._log = None

    # ------------------------------------------------------------------ state
    @property
    def pid(self) -> int | None:
        """Process id of the running worker, or None."""
        return self._proc.pid if self._proc is not None else None

    @property
    def warm(self) -> bool:
        """True when the running process has already rendered objects (its state could leak)."""
        return self._proc is not None and self._proc.poll() is None and self.jobs_done > 0

    def rss_bytes(self) -> int | None:
        """Resident memory of the running worker (Linux ``/proc``), or None."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except (OSError, TypeError):
            return None
        kb = next((line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")), None)
        return int(kb) * 1024 if kb else None

    # ------------------------------------------------------------------ life cycle
    def _start(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="blender_worker_"))
        self._log = open(self._dir / "worker.log", "wb")
        read_fd, write_fd = os.pipe()
        try:
            # Own session: a timeout kills the whole process group. No preexec_fn (unsafe in
            # threaded callers such as Ray workers): the cap is set on the child right after it
            # starts, long before Blender loads. Blender's temp folder is the process's own,
            # removed with it (the worker leaves with os._exit and never cleans up itself).
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "data_pipeline.blender_worker", str(write_fd)],
                stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT,
                pass_fds=(write_fd,), cwd=self._dir, start_new_session=True,
                env={**os.environ, "TMPDIR": str(self._dir)},
            )
        finally:
            os.close(write_fd)
        self._reply = os.fdopen(read_fd, "r")
        limit = int(self.memory_limit_gb * 2**30)
        try:
            resource.prlimit(self._proc.pid, resource.RLIMIT_DATA, (limit, limit))
        except ProcessLookupError:
            pass  # already gone: the job's outcome says so
        self.jobs_done = 0
        self.processes_started += 1

    def _log_tail(self, offset: int) -> str:
        self._log.flush()
        with open(self._dir / "worker.log", "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")[-LOG_TAIL_CHARS:]

    def _end(self) -> int | None:
        """Kill the worker's process group (SIGKILL: its outputs are complete and atomically
        written once it has replied, and a graceful exit would first reset Blender for nothing),
        release its pipes, log and folder. Returns its exit code (None if none was running)."""
        proc, self._proc = self._proc, None
        code = None
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            code = proc.wait()
            for handle in (proc.stdin, self._reply, self._log):
                try:
                    handle.close()
                except OSError:
                    pass
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = self._reply = self._log = None
        return code

    def close(self) -> None:
        """End the running worker, if any."""
        self._end()

    def __enter__(self) -> "BlenderProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ jobs
    def run(self, job_path: Path, timeout_s: float) -> JobOutcome:
        """Run one job file (a fresh process if none is running, or the last one died or was
        recycled) and wait at most ``timeout_s`` seconds (process start included)."""
        if self._proc is not None and self._proc.poll() is not None:
            self._end()  # died while idle: not this job's doing
        if self._proc is None:
            self._start()
        self._log.flush()
        offset = os.path.getsize(self._dir / "worker.log")
        deadline = time.monotonic() + timeout_s
        try:
            self._proc.stdin.write(f"{job_path}\n".encode())
            self._proc.stdin.flush()
            line = ""
            while not line:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([self._reply], [], [], remaining)[0]:
                    tail = self._log_tail(offset)
                    self._end()
                    return JobOutcome(None, timed_out=True, log_tail=tail)
                line = self._reply.readline()
                if not line:  # end of file: the process is gone
                    break
        except BrokenPipeError:
            line = ""
        if not line:
            tail = self._log_tail(offset)
            exit_code = self._end()
            return JobOutcome(None, exit_code=exit_code, log_tail=tail)
        self.jobs_done += 1
        outcome = JobOutcome(json.loads(line)["code"])
        rss = self.rss_bytes()
        too_big = self.recycle_rss_gb is not None and rss is not None and rss > self.recycle_rss_gb * 2**30
        if self.jobs_done >= self.max_objects or too_big:
            self.close()
        return outcome
