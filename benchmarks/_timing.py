"""Timing helpers shared by the benchmark scripts (imported as ``benchmarks._timing``: the scripts put the
repository root first on ``sys.path`` and keep this folder off it, so ``attacks`` stays the package)."""
from __future__ import annotations

import time
from typing import Callable


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """Wall and CPU seconds of one call (CPU seconds are what a shared machine distorts least), and its result."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """The best wall seconds of ``repeats`` calls (damps a shared machine), and the last call's result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        wall, _, out = timed(fn)
        best = min(best, wall)
    return best, out
