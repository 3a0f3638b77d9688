"""A monitoring pass, as the service's child process runs it.

:class:`~mlsd.serving.periodic.ServiceMonitor` starts the process and asks it for each pass.

Why a process: a pass is DuckDB over the service log plus drift statistics in numpy and Python,
and the Python parts hold the GIL. In the service's own process every request waits out those
stretches (a 0.22 s pass over one minute's log at 200 requests/s stalled another thread up to
4.6 ms at a time, the whole switch interval; at a 10M-exposure window a pass is seconds), so
the pass runs in a spawned child and only its result (a :class:`MonitorResult`, pickled) comes
back; serving then shares the CPU with it, not the interpreter. This module is what the child
imports: the monitor and the profile, not the web service.

The child also runs at a lower priority (:data:`NICE`): a pass takes a core for a second or
two, and two replicas started together pass at the same moments. At full priority, on 2 cores
with 1M items at 200 requests/s, both replicas' passes stalled requests for up to 280 ms (the
online p99 of a 30 s run went from 11 to 190 ms); niced, the pass runs in the gaps the
service leaves and still finishes within its interval. (``SCHED_IDLE`` was tried: a busy
service starved the pass.)

The child keeps the profile it last loaded (:func:`load_profile`), and only that one: each
registry reload gives the model, and its profile, a new path, and a cache of every path ever
seen grew a long-lived child by megabytes per reload.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from mlsd.monitoring.alerts import DEFAULT_LABEL_DELAY_S, MIN_DRIFT_REQUESTS, AlertRule
from mlsd.monitoring.monitor import MonitorResult, profile_model_version, run_monitor
from mlsd.monitoring.profile import ReferenceProfile


def load_profile(profile_path: Path) -> ReferenceProfile:
    """The profile at ``profile_path``, read again only when the path or the file's mtime
    changed since the last call (a pass every interval would otherwise re-parse it)."""
    return _read_profile(profile_path, profile_path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=1)  # the child monitors one model at a time
def _read_profile(profile_path: Path, mtime_ns: int) -> ReferenceProfile:
    return ReferenceProfile.load(profile_path)


def monitor_pass(
    log_dir: Path,
    profile_path: Path,
    *,
    start: datetime,
    end: datetime,
    rules: Sequence[AlertRule],
    psi_threshold: float,
    min_drift_requests: int = MIN_DRIFT_REQUESTS,
    reference_ctr: float | None,
    label_delay_s: float = DEFAULT_LABEL_DELAY_S,
) -> MonitorResult:
    """:func:`~mlsd.monitoring.monitor.run_monitor` over ``[start, end)`` of ``log_dir``
    against the profile at ``profile_path``, on one DuckDB thread (the service has the other
    core). Only the candidate rows of the profile's model version (``model.json`` next to
    the profile) are compared: not a previous model's, nor another experiment arm's."""
    return run_monitor(
        log_dir,
        load_profile(profile_path),
        start=start,
        end=end,
        rules=tuple(rules),
        psi_threshold=psi_threshold,
        min_drift_requests=min_drift_requests,
        reference_ctr=reference_ctr,
        label_delay_s=label_delay_s,
        now=end,
        threads=1,
        model_version=profile_model_version(profile_path),
    )


NICE = 10
"""How much lower than the service the child's priority is (CFS weight 110 against 1024)."""


def lower_priority() -> None:
    """The child's initializer: :data:`NICE` more than its parent."""
    os.nice(NICE)


def niceness() -> int:
    """This process's nice value (what a test asks the child)."""
    return os.nice(0)


def ready() -> None:
    """Nothing: a call that makes a fresh child import this module (and the monitor's)."""
