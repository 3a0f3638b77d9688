"""Latency of callables timed in turns: what the benchmarks quote their speed-ups from.

A shared machine's load comes in bursts. Timing one variant's repeats and then the other's lets a
burst land on one of them and shows up in their ratio; taking turns (one call of each per round)
spreads it over all of them alike, so the ratio of their medians holds even when the absolute
times move.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np

WARM_UP_CALLS = 20
"""Calls of each variant before timing: lazy imports, first-call allocations, caches."""


def latencies(
    calls: Mapping[str, Callable[[], object]], repeats: int, *, warm_up: int = WARM_UP_CALLS
) -> dict[str, dict[str, float]]:
    """p50/p99 wall clock and p50 thread CPU time of each call, in ms, after ``warm_up``
    calls of each.

    The calls take turns (one of each per round, ``repeats`` rounds), so a burst of load from
    other processes on the machine hits every variant alike instead of whichever was being
    timed. The thread's CPU time is inflated less by other processes than the wall clock.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for call in calls.values():
        for _ in range(warm_up):
            call()
    wall, cpu = np.empty((len(calls), repeats)), np.empty((len(calls), repeats))
    for i in range(repeats):
        for j, call in enumerate(calls.values()):
            start, start_cpu = time.perf_counter(), time.thread_time()
            call()
            wall[j, i], cpu[j, i] = time.perf_counter() - start, time.thread_time() - start_cpu
    return {
        name: {
            "p50_ms": round(float(np.median(wall[j])) * 1e3, 4),
            "p99_ms": round(float(np.quantile(wall[j], 0.99)) * 1e3, 4),
            "cpu_p50_ms": round(float(np.median(cpu[j])) * 1e3, 4),
        }
        for j, name in enumerate(calls)
    }
