"""backoff_s: the waits of the service's periodic tasks and of its log writer's restarts."""

from __future__ import annotations

import pytest

from mlsd.backoff import backoff_s


def test_the_wait_doubles_per_failure_up_to_the_cap() -> None:
    waits = [backoff_s(n, base_s=1.0, cap_s=30.0) for n in range(7)]
    assert waits == [1, 2, 4, 8, 16, 30, 30]


def test_a_base_above_the_cap_is_the_wait() -> None:
    assert backoff_s(3, base_s=900.0, cap_s=300.0) == 900.0


def test_years_of_failures_do_not_overflow() -> None:
    assert backoff_s(10**6, base_s=0.05, cap_s=300.0) == 300.0


def test_negative_failures_are_refused() -> None:
    with pytest.raises(ValueError, match="failures must be >= 0, got -1"):
        backoff_s(-1, base_s=1.0, cap_s=2.0)
