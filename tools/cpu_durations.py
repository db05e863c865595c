"""pytest plugin: CPU seconds per test, for honest ``slow`` markers on a shared machine.

Wall-clock ``--durations`` on a loaded machine measure the other jobs as much as the tests. The
CPU time of the test process (user + system, children included once they have been waited for)
is what a test would take alone on one core with ``OMP_NUM_THREADS=1``; it is what decides
whether a test is ``slow`` (pyproject: more than ~30 s on 2 cores).

    OMP_NUM_THREADS=1 python -m pytest -p tools.cpu_durations tests/test_x.py

prints, after the run, every test phase (setup / call / teardown) over 0.5 CPU seconds, with
its wall time beside it, and flags tests marked ``slow`` under 10 CPU seconds and unmarked
tests over 30.
"""

from __future__ import annotations

import os
import time

import pytest

_rows: list[tuple[float, float, str, str, bool]] = []


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _wrap(phase):
    @pytest.hookimpl(hookwrapper=True)
    def hook(item, *args, **kwargs):
        cpu, wall = _cpu(), time.monotonic()
        yield
        _rows.append((_cpu() - cpu, time.monotonic() - wall, phase, item.nodeid, item.get_closest_marker("slow") is not None))

    return hook


pytest_runtest_setup = _wrap("setup")
pytest_runtest_call = _wrap("call")
pytest_runtest_teardown = _wrap("teardown")


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    tr.section("CPU seconds per test phase (tools/cpu_durations.py)")
    for cpu, wall, phase, nodeid, _ in sorted(_rows, reverse=True):
        if cpu >= 0.5:
            tr.write_line(f"{cpu:8.1f} cpu s {wall:8.1f} wall s  {phase:8s} {nodeid}")
    per_test: dict[str, list] = {}
    for cpu, _, _, nodeid, slow in _rows:
        per_test.setdefault(nodeid, [0.0, slow])[0] += cpu
    for nodeid, (cpu, slow) in sorted(per_test.items()):
        if slow and cpu < 10:
            tr.write_line(f"marked slow but {cpu:.1f} cpu s: {nodeid}")
        elif not slow and cpu > 30:
            tr.write_line(f"not marked slow but {cpu:.1f} cpu s: {nodeid}")
