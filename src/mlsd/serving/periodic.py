"""The service's background threads: its own monitor (:class:`ServiceMonitor`) and the
champion follower (:class:`ModelFollower`), both periodic tasks (:class:`PeriodicTask`)."""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

from mlsd.backoff import backoff_s
from mlsd.monitoring.alerts import DEFAULT_LABEL_DELAY_S, MIN_DRIFT_REQUESTS

if TYPE_CHECKING:
    from mlsd.monitoring.alerts import AlertRule
    from mlsd.monitoring.monitor import MonitorResult
    from mlsd.serving.app import RecommendService

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MonitorSettings:
    """The service's own monitor: every ``interval_s`` it runs
    :func:`~mlsd.monitoring.monitor.run_monitor` over the last ``window`` of its service log and
    publishes the result as ``mlsd_monitor_*`` gauges on ``/metrics``
    (:class:`~mlsd.serving.metrics.MonitorGauges`).

    Attributes:
        rules: the alert rules (``[[monitoring.alerts]]``); one firing gauge each.
        window: the span each pass looks back over (``[monitoring].window``).
        interval_s: seconds between passes (``[service_log].monitor_interval_s``), > 0.
        profile_path: the reference profile; ``None``: the serving model's own
            (``reference_profile_path``, which a feed model has), looked up on every pass so a
            reload brings its profile along.
        psi_threshold: PSI above which a feature counts as drifted.
        min_drift_requests: the fewest sampled requests whose drift is judged
            (``[monitoring].min_drift_requests``).
        label_delay_s: exposures younger than this are left out of the label metrics
            (``[monitoring].label_delay_s``).
        reference_ctr: the served CTR ``ctr_drop`` compares with (``[monitoring]``).
        pass_timeout_s: a pass still running after this long (e.g. reading a log folder on a
            stalled network mount) is abandoned: its child process is killed, the pass
            counts as failed, and the next one starts a new child.
    """

    rules: tuple[AlertRule, ...]
    window: timedelta = timedelta(hours=1)
    interval_s: float = 60.0
    profile_path: Path | None = None
    psi_threshold: float = 0.25
    min_drift_requests: int = MIN_DRIFT_REQUESTS
    reference_ctr: float | None = None
    pass_timeout_s: float = 600.0
    label_delay_s: float = DEFAULT_LABEL_DELAY_S

    def __post_init__(self) -> None:
        if not self.interval_s > 0:
            raise ValueError(f"monitor interval_s must be > 0, got {self.interval_s}")
        if not self.pass_timeout_s > 0:
            raise ValueError(f"monitor pass_timeout_s must be > 0, got {self.pass_timeout_s}")
        if not self.window > timedelta(0):
            raise ValueError(f"monitor window must be positive, got {self.window}")


@runtime_checkable
class ProfiledRecommender(Protocol):
    """A model that knows the reference profile of its training data (a feed model does)."""

    @property
    def reference_profile_path(self) -> Path | None: ...


MAX_BACKOFF_S = 300.0
"""The longest wait of a :class:`PeriodicTask` after calls that keep failing."""


class PeriodicTask:
    """A daemon thread calling :meth:`run_once` every ``interval_s`` (the first call one
    interval after :meth:`start`) until :meth:`stop`. A call that raises is logged and counted
    (``mlsd_model_errors_total{operation=<operation>}``), and the wait before the next one
    doubles with each failure in a row, up to :data:`MAX_BACKOFF_S` (or ``interval_s`` if
    longer): a follower does not download and compile a broken champion every few seconds
    in the serving process. A call that succeeds restores ``interval_s``."""

    operation: ClassVar[str]
    """The thread's name (``mlsd-<operation>``) and its errors' label."""

    def __init__(self, service: RecommendService, interval_s: float) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.service, self.interval_s = service, interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> object:
        raise NotImplementedError

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"mlsd-{self.operation}", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread (waits for a call in progress)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def delay_s(self, failures: int) -> float:
        """The wait before the next call after ``failures`` failed calls in a row."""
        return backoff_s(failures, base_s=self.interval_s, cap_s=MAX_BACKOFF_S)

    def _run(self) -> None:
        failures = 0
        while not self._stop.wait(self.delay_s(failures)):
            try:
                self.run_once()
                failures = 0
            except Exception:
                if self._stop.is_set():
                    return  # stopped during the call (a pass abandoned): not a failure
                failures += 1
                logger.exception(
                    "%s failed (%d in a row); again in %g s",
                    self.operation, failures, self.delay_s(failures),
                )  # fmt: skip
                self.service.metrics.errors.labels(self.operation).inc()


class ServiceMonitor(PeriodicTask):
    """Monitoring passes over the service log, started from a daemon thread and run in a
    spawned child process (:mod:`mlsd.serving.monitor_pass` says why); each sets the gauges.

    A pass without a known reference profile does nothing. A failing pass (or a child that
    died: the next pass starts a new one) is logged and counted
    (``mlsd_model_errors_total{operation="monitor"}``); the next one runs as planned.
    """

    operation = "monitor"

    def __init__(self, service: RecommendService, log_dir: Path, settings: MonitorSettings) -> None:
        super().__init__(service, settings.interval_s)
        self.log_dir = Path(log_dir)
        self.settings = settings
        self.gauges = service.metrics.monitor_gauges(settings.rules)
        self.last_result: MonitorResult | None = None
        self._pool: ProcessPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def profile_path(self) -> Path | None:
        """The settings' profile, else the serving model's, else ``None``."""
        if self.settings.profile_path is not None:
            return self.settings.profile_path
        model = self.service.current()
        return model.reference_profile_path if isinstance(model, ProfiledRecommender) else None

    def run_once(self, *, now: datetime | None = None) -> MonitorResult | None:
        """One pass over ``[now - window, now)`` (``now``: the wall clock), published on the
        gauges; ``None`` (and the gauges unchanged) when no reference profile is known."""
        from mlsd.serving.monitor_pass import monitor_pass

        path = self.profile_path()
        if path is None:
            logger.debug("no reference profile known; monitoring pass skipped")
            return None
        end = now if now is not None else datetime.now(UTC)
        pool = self._child()
        try:
            result = pool.submit(
                monitor_pass,
                self.log_dir,
                Path(path),
                start=end - self.settings.window,
                end=end,
                rules=self.settings.rules,
                psi_threshold=self.settings.psi_threshold,
                min_drift_requests=self.settings.min_drift_requests,
                reference_ctr=self.settings.reference_ctr,
                label_delay_s=self.settings.label_delay_s,
            ).result(timeout=self.settings.pass_timeout_s)
        except BrokenProcessPool:
            self._drop_child(pool)  # the child died: the next pass starts another
            raise
        except TimeoutError:
            self._drop_child(pool, kill=True)
            raise TimeoutError(
                f"monitoring pass over {self.log_dir} still running after "
                f"{self.settings.pass_timeout_s:g} s; its child process was killed"
            ) from None
        self.gauges.update(result)
        self.last_result = result
        for alert in result.fired:
            logger.warning("monitoring alert fired: %s", alert.describe())
        return result

    def start(self) -> None:
        """Start the child process now, with the monitor's modules imported (~1.5 s of CPU
        a first pass would otherwise spend while the service answers), then the thread."""
        from mlsd.serving.monitor_pass import ready

        self._child().submit(ready)
        super().start()

    def _drop_child(
        self, pool: ProcessPoolExecutor, *, kill: bool = False, wait: bool = False
    ) -> None:
        """Forget ``pool`` (the next pass starts another); ``kill`` its process first; ``wait``
        until its process is gone (reaped).

        ``ProcessPoolExecutor`` can cancel only a task that has not started, so a running one
        is ended by killing its process, found in the pool's ``_processes`` (no public API
        names it)."""
        with self._pool_lock:
            if self._pool is pool:
                self._pool = None
        if kill:
            for process in list(getattr(pool, "_processes", {}).values()):
                process.kill()
        pool.shutdown(wait=wait, cancel_futures=True)

    def _child(self) -> ProcessPoolExecutor:
        from mlsd.serving.monitor_pass import lower_priority

        with self._pool_lock:
            if self._stop.is_set():  # stop() has dropped the child: start no other
                raise RuntimeError("the monitor is stopped")
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    1, mp_context=mp.get_context("spawn"), initializer=lower_priority
                )
            return self._pool

    def stop(self) -> None:
        """Stop the thread and the child process; a pass in progress is abandoned, its child
        killed: a stopping service must not wait up to ``pass_timeout_s`` for it (an
        orchestrator's grace period, 30 s on Kubernetes, would end the process first)."""
        self._stop.set()
        with self._pool_lock:
            pool = self._pool
        if pool is not None:  # a pass waiting on the child raises, and the loop ends
            self._drop_child(pool, kill=True, wait=True)
        super().stop()


class ModelFollower(PeriodicTask):
    """Reloads the service's model whenever ``changed()`` says the model it would load is no
    longer the one serving (e.g. the registry's champion moved), checking every ``interval_s``
    in a thread: how a replica that shares its port with others (which ``POST /admin/reload``
    cannot address one by one) takes a promotion or a rollback. A failed check or reload is
    logged and counted (``mlsd_model_errors_total{operation="follow"}``); the old model keeps
    serving and the next check, later each time it fails again (:class:`PeriodicTask`), tries
    again."""

    operation = "follow"

    def __init__(
        self, service: RecommendService, changed: Callable[[], bool], interval_s: float
    ) -> None:
        super().__init__(service, interval_s)
        self.changed = changed

    def run_once(self) -> bool:
        """Reload if the model changed; whether it did."""
        if not self.changed():
            return False
        old, new = self.service.reload()
        logger.info("the model to serve changed: %s -> %s", old, new)
        return True
