"""Exponential backoff, shared by the service's periodic tasks (the champion follower, the
monitor) and its log writer's restarts: a thing that keeps failing is retried ever less often,
up to a cap, and never faster than its base."""

from __future__ import annotations

MAX_DOUBLINGS = 32
"""``2.0 ** n`` overflows past n = 1023, after days of failures; the cap is reached long before."""


def backoff_s(failures: int, *, base_s: float, cap_s: float) -> float:
    """``base_s`` doubled once per failure after the first ``failures`` = 0, at most
    ``cap_s`` (or ``base_s`` when that is larger): 0 failures → ``base_s``."""
    if failures < 0:
        raise ValueError(f"failures must be >= 0, got {failures}")
    return min(base_s * 2.0 ** min(failures, MAX_DOUBLINGS), max(cap_s, base_s))
