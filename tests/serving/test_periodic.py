"""PeriodicTask (the follower and the monitor of the service): a task that keeps failing
backs off, and one success restores its interval."""

from __future__ import annotations

import threading
import time

import pytest

from mlsd.serving.app import RecommendService
from mlsd.serving.periodic import MAX_BACKOFF_S, PeriodicTask
from mlsd.serving.recommender import Recommender
from mlsd.serving.settings import ServiceSettings


class Flaky(PeriodicTask):
    """Fails its first ``failures`` calls, then succeeds; records when each call ran."""

    operation = "flaky"

    def __init__(self, service: RecommendService, interval_s: float, failures: int) -> None:
        super().__init__(service, interval_s)
        self.failures, self.calls = failures, [time.monotonic()]
        self.done = threading.Event()

    def run_once(self) -> None:
        self.calls.append(time.monotonic())
        if len(self.calls) - 1 <= self.failures:
            raise RuntimeError("the registry is down")
        self.done.set()


def no_model() -> Recommender:
    raise RuntimeError("not used")


def test_the_wait_doubles_with_each_failure_up_to_the_cap() -> None:
    task = Flaky(RecommendService(no_model, settings=ServiceSettings()), 10.0, 0)
    assert [task.delay_s(n) for n in range(7)] == [10, 20, 40, 80, 160, MAX_BACKOFF_S, 300]
    assert task.delay_s(5000) == MAX_BACKOFF_S  # days of failures do not overflow
    slow = Flaky(RecommendService(no_model, settings=ServiceSettings()), 900.0, 0)
    assert slow.delay_s(3) == 900.0  # never shorter than the interval


def test_a_failing_task_backs_off_counts_its_failures_and_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = RecommendService(no_model, settings=ServiceSettings())
    task = Flaky(service, 0.05, failures=4)
    task.start()
    try:
        assert task.done.wait(10)
    finally:
        task.stop()
    gaps = [b - a for a, b in zip(task.calls, task.calls[1:], strict=False)]
    # Waits of 0.05, 0.1, 0.2, 0.4 and 0.8 s: at least 1.55 s in all, where a fixed interval
    # would have called 5 times in 0.25 s.
    assert sum(gaps) >= 1.5
    assert gaps[4] > 2 * gaps[1]
    errors = service.metrics.registry.get_sample_value(
        "mlsd_model_errors_total", {"operation": "flaky"}
    )
    assert errors == 4
    assert "flaky failed (4 in a row); again in 0.8 s" in caplog.text
