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

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlsd.serving.recommender import Recommender, RecommendResult

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
