"""Prometheus metrics of the service: one registry per app, so several apps share a process.

Importing Feast (the online feature store) sets ``PROMETHEUS_MULTIPROC_DIR``, which switches
prometheus_client to multiprocess values: every metric of a given name then shares one mmap'd
value per process, across registries, so two apps in one process (tests, a reload) would count
into each other. The service keeps its values in memory (each replica exports its own
``/metrics``); :class:`ServiceMetrics` switches prometheus_client back when it is created.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlsd.serving.recommender import Recommender, RecommendResult

if TYPE_CHECKING:
    from mlsd.monitoring.alerts import AlertRule
    from mlsd.monitoring.logs import LogWriter
    from mlsd.monitoring.monitor import MonitorResult

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
"""Histogram buckets in seconds: 0.5 ms to 1 s, where a recommendation's stages live."""


class ServiceMetrics:
    """The service's Prometheus metrics, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        values.ValueClass = values.MutexValue  # see the module docstring
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "mlsd_http_requests", "HTTP requests", ["endpoint", "method", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "mlsd_http_request_duration_seconds", "HTTP request latency", ["endpoint"],
            buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.stage_seconds = Histogram(
            "mlsd_recommend_stage_duration_seconds", "Latency per request-path stage ('total')",
            ["stage"], buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.responses = Counter(
            "mlsd_recommend_responses", "Recommendation answers by path", ["path"], registry=r
        )
        self.fallbacks = Counter(
            "mlsd_recommend_fallbacks", "Failed dependencies answers fell back from", ["kind"],
            registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "mlsd_model_errors", "Unexpected model exceptions", ["operation"], registry=r
        )
        self.model_info = Gauge(
            "mlsd_model_info", "The serving model (1 for its version)", ["version"], registry=r
        )
        self.reloads = Counter("mlsd_model_reloads", "Reloads", ["outcome"], registry=r)
        self.events = Counter("mlsd_events_accepted", "Feedback events accepted", registry=r)
        self._monitor: MonitorGauges | None = None

    def observe(self, result: RecommendResult) -> None:
        self.responses.labels(result.path).inc()
        for kind in result.fallbacks:
            self.fallbacks.labels(kind).inc()
        for stage, ms in result.stage_ms.items():
            if math.isfinite(ms) and ms >= 0:
                self.stage_seconds.labels(stage).observe(ms / 1000.0)

    def swapped(self, old: Recommender | None, new: Recommender) -> None:
        if old is not None and old.version != new.version:
            self.model_info.remove(old.version)
        self.model_info.labels(new.version).set(1)

    def watch_log(self, log: LogWriter) -> None:
        """Export the service log's counters (rows written and dropped, write errors)."""
        self.registry.register(_LogCollector(log))

    def monitor_gauges(self, rules: Sequence[AlertRule]) -> MonitorGauges:
        """The in-service monitor's gauges on this registry (created on the first call)."""
        if self._monitor is None:
            self._monitor = MonitorGauges(self.registry, rules)
        return self._monitor


class MonitorGauges:
    """The latest monitoring pass as gauges: ``mlsd_monitor_<metric>`` for every metric of
    :data:`mlsd.monitoring.alerts.METRICS` (NaN when the window had no data for it) and
    ``mlsd_monitor_alert_firing{rule=...}`` (1 fired, 0 ok or no data) for every rule."""

    def __init__(self, registry: CollectorRegistry, rules: Sequence[AlertRule]) -> None:
        from mlsd.monitoring.alerts import METRICS

        self.metrics = {
            name: Gauge(f"mlsd_monitor_{name}", f"Monitoring window: {meaning}", registry=registry)
            for name, meaning in METRICS.items()
        }
        self.alert_firing = Gauge(
            "mlsd_monitor_alert_firing", "1 when the alert rule fired on the last monitoring pass",
            ["rule"], registry=registry,
        )  # fmt: skip
        self.last_run = Gauge(
            "mlsd_monitor_last_run_timestamp_seconds", "End of the last monitored window (Unix s)",
            registry=registry,
        )  # fmt: skip
        self.run_seconds = Gauge(
            "mlsd_monitor_run_seconds", "Wall time of the last monitoring pass", registry=registry
        )
        for gauge in self.metrics.values():
            gauge.set(math.nan)
        for rule in rules:
            self.alert_firing.labels(rule.name).set(0)

    def update(self, result: MonitorResult) -> None:
        """Publish one pass (:func:`mlsd.monitoring.monitor.run_monitor`'s result)."""
        for name, gauge in self.metrics.items():
            gauge.set(result.metrics.get(name, math.nan))
        for outcome in result.outcomes:
            self.alert_firing.labels(outcome.rule.name).set(1.0 if outcome.fired else 0.0)
        self.last_run.set(result.end.timestamp())
        self.run_seconds.set(result.seconds)


class _LogCollector(Collector):
    """The service log's own counters, read when ``/metrics`` is scraped."""

    def __init__(self, log: LogWriter) -> None:
        self.log = log

    def collect(self) -> Iterator[Metric]:
        log = self.log
        yield CounterMetricFamily(
            "mlsd_log_written_rows", "Rows the service log wrote", value=log.written_rows
        )
        yield CounterMetricFamily(
            "mlsd_log_dropped_rows",
            "Rows the service log lost (buffer full, failed write, closed)",
            value=log.dropped_rows,
        )
        yield CounterMetricFamily(
            "mlsd_log_write_errors", "Failed writes of the service log", value=log.write_errors
        )


class RequestMetricsMiddleware:
    """Counts every HTTP request by route template (``unmatched`` for 404s) and status."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # unless a response starts: an exception escaped
        start = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(endpoint, scope["method"], str(status)).inc()
            elapsed = time.perf_counter() - start
            self.metrics.request_seconds.labels(endpoint).observe(elapsed)


# ---------------------------------------------------------------- the service
