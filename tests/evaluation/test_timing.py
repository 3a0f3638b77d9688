"""latencies: the variants take turns, and the summary reads the timed calls."""

from __future__ import annotations

import time

import pytest

from mlsd.evaluation.timing import latencies


def test_the_calls_take_turns_after_their_warm_up() -> None:
    order: list[str] = []
    calls = {name: (lambda n=name: order.append(n)) for name in ("a", "b", "c")}
    out = latencies(calls, 4, warm_up=2)
    assert order[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up: each in a row
    assert order[6:] == ["a", "b", "c"] * 4  # timed: one of each per round
    assert set(out) == {"a", "b", "c"}
    assert set(out["a"]) == {"p50_ms", "p99_ms", "cpu_p50_ms"}


def test_the_summary_reads_the_wall_clock_and_the_threads_cpu() -> None:
    def spin() -> None:  # ~2 ms of CPU
        end = time.thread_time() + 0.002
        while time.thread_time() < end:
            pass

    out = latencies({"sleep": lambda: time.sleep(0.003), "spin": spin}, 15, warm_up=1)
    assert out["sleep"]["p50_ms"] >= 3.0
    assert out["sleep"]["cpu_p50_ms"] < 1.0  # asleep: wall time, no CPU
    assert out["spin"]["cpu_p50_ms"] >= 1.9
    assert out["spin"]["p99_ms"] >= out["spin"]["p50_ms"]
    with pytest.raises(ValueError, match="repeats"):
        latencies({"x": spin}, 0)
