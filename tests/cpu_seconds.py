"""A pytest plugin that prints each test's CPU seconds (set-up and call), the slowest first.

On a shared machine wall seconds (`--durations`) depend on who else runs; the process's CPU
time on one thread does not, and is close to the wall time on an idle core:

    PYTHONPATH=tests OMP_NUM_THREADS=1 pytest -q -p cpu_seconds tests/test_x.py

(Subprocesses a test starts are not counted.)
"""

from __future__ import annotations

import time

import pytest

RESULTS: list[tuple[float, float, str, str]] = []


def _timed(phase: str):
    @pytest.hookimpl(hookwrapper=True)
    def hook(item):
        cpu, wall = time.process_time(), time.perf_counter()
        yield
        RESULTS.append((time.process_time() - cpu, time.perf_counter() - wall, phase,
                        item.nodeid))
    return hook


pytest_runtest_setup = _timed("setup")
pytest_runtest_call = _timed("call")


def pytest_terminal_summary(terminalreporter) -> None:
    """The 40 costliest phases: CPU seconds, wall seconds, phase, test."""
    terminalreporter.write_sep("=", "CPU seconds per phase (cpu, wall)")
    for cpu, wall, phase, nodeid in sorted(RESULTS, reverse=True)[:40]:
        terminalreporter.write_line(f"{cpu:8.1f} {wall:8.1f} {phase:5s} {nodeid}")
    terminalreporter.write_line(f"total CPU {sum(r[0] for r in RESULTS):.1f} s")
