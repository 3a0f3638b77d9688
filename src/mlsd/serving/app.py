"""The online service: a FastAPI app in front of any :class:`~mlsd.serving.recommender.Recommender`.

=====================================  =========================================================
``GET  /v1/recommendations/{user_id}``  ``?k=&explain=&precomputed=`` → :class:`RecommendationsOut`
``POST /v1/recommendations``            :class:`RecommendIn` (``user_id`` null: anonymous visitor)
``POST /v1/events``                     ``[EventIn, ...]`` → ``{"accepted": n}``
``GET  /v1/users/{user_id}/history``    ``?n=`` → the user's recent items, newest first (UI)
``GET  /v1/users/sample``               ``?n=`` → a few user ids with history (UI)
``GET  /healthz``                       the process is alive
``GET  /readyz``                        200 when a model is loaded and ``ready()``, else 503
``GET  /metrics``                       Prometheus text format (one registry per app)
``POST /admin/reload``                  ``Authorization: Bearer $MLSD_ADMIN_TOKEN``; reload, swap
``GET  /ui``                            the demo page (HTML, no external assets) (UI)
=====================================  =========================================================

(UI): served only with ``MLSD_UI`` (:attr:`ServiceSettings.ui`), else a 404 that says why.

Errors: invalid input (``k`` outside [1, ``MLSD_MAX_K``], malformed JSON, unknown fields, a ``NaN``
or ``Infinity`` where a number goes, a ``BadRequestError`` from the model) is a 422 naming the
field; each error echoes at most a short repr of its ``input``
(:func:`~mlsd.serving.errors.validation_error_response`). A body FastAPI cannot parse at all (not
UTF-8, an integer of over 4,300 digits, arrays nested too deep) is a 400 ``There was an error
parsing the body``, and a body over ``MLSD_MAX_BODY_BYTES`` a 413, before it is read
(:class:`~mlsd.serving.errors.BodyLimit`). An unknown user gets the model's cold-start answer (for
:class:`~mlsd.serving.popular.PopularRecommender`, the most popular items), never a 5xx. When the
model raises anything else, or no model is loaded, the ``fallback`` answers with path
``fallback:popular`` and ``"model"`` in ``fallbacks``; only without a fallback is it a 503.

Log: with a :class:`~mlsd.monitoring.logs.LogWriter`, each recommendation request is a
``requests`` row (its ``request_id``, as in the response; status, latency, path, model version,
fallbacks; a 503, or a 422 the model raised, that answered instead too; a request refused by
validation, before any model saw it, is counted on ``/metrics`` only) and each item shown an
``exposures`` row (position from 0, score, candidate source); each accepted feedback event is a
``feedback`` row at the time the service received it, with the ``request_id`` the client names
(``EventIn.request_id``), which attributes a click to its exposure. Logging packs one chunk per
call (a child process writes the files by default, :mod:`mlsd.monitoring.log_process`) and
never fails a request; the app closes the log at
shutdown. A sampled share of online answers also logs the ranker's inputs of every scored
candidate (``candidates``), what the drift monitor compares with the model's reference profile.
Answers routed by an experiment (:mod:`mlsd.serving.experiment`) carry its name and arm, in the
response and in every log row.

Monitoring: with ``monitor`` settings, a :class:`~mlsd.serving.periodic.ServiceMonitor` thread has
a child process run :func:`mlsd.monitoring.monitor.run_monitor` over the last window of the log
every ``interval_s`` (:mod:`mlsd.serving.monitor_pass`: not holding the service's GIL) and
publishes the results as ``mlsd_monitor_*`` gauges and ``mlsd_monitor_alert_firing{rule}`` on
``/metrics``.

Reload: ``load_model()`` runs under a lock (two reloads never interleave) while requests keep
using the current model; the new model then replaces the reference in one assignment. Each
request reads the reference once, so in-flight requests finish on the model they started with.
A loader that raises leaves the old model serving (the reload answers 500 with the error).
After the start-up load, and shortly after each reload, the heap is frozen (:func:`freeze_heap`),
so the garbage collector's full passes no longer walk the model while requests wait.

Threads: a model may block on I/O, so ``recommend`` runs in the thread pool, at most
``MLSD_MODEL_THREADS`` (default 2) requests at once
(:class:`~mlsd.serving.settings.ServiceSettings` says why). A model that is a
:class:`~mlsd.serving.recommender.FastRecommender` is first asked on the event loop (the popularity
model always answers there; a thread hand-off costs more than its whole answer), and only a request
it declines goes to the pool. The dependencies are ``async`` for the same reason: a plain ``def``
dependency is one more round trip through the pool per request. The hottest route, ``GET
/v1/recommendations/{user_id}``, is answered by :class:`HotRoute` before FastAPI's routing whenever
its parameters are plain (FastAPI's per-request machinery cost as much CPU as a precomputed answer
itself); anything else goes to FastAPI.
"""

from __future__ import annotations

import gc
import hmac
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime
from importlib import resources
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
    ClassVar,
    Protocol,
    cast,
    runtime_checkable,
)
from urllib.parse import parse_qsl

import anyio
import anyio.to_thread
from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    generate_latest,
)
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from mlsd.features.definitions import EVENT_TS_ALLOWANCE_S
from mlsd.serving.errors import (
    BodyLimit,
    error_response,
    status_handler,
    validation_error_response,
)
from mlsd.serving.metrics import RequestMetricsMiddleware, ServiceMetrics
from mlsd.serving.periodic import ModelFollower, MonitorSettings, ServiceMonitor
from mlsd.serving.recommender import (
    BadRequestError,
    FastRecommender,
    Recommender,
    RecommendRequest,
    RecommendResult,
    Routed,
)
from mlsd.serving.schemas import (
    INT64_MAX,
    INT64_MIN,
    NOW_MAX,
    AcceptedOut,
    ErrorOut,
    EventIn,
    HistoryOut,
    ItemOut,
    RecommendationsOut,
    RecommendIn,
    ReloadOut,
    StatusOut,
    UserSampleOut,
)
from mlsd.serving.settings import BOOLEAN_WORDS, ServiceSettings

if TYPE_CHECKING:
    from mlsd.monitoring.logs import LogWriter

logger = logging.getLogger(__name__)


class ServiceUnavailableError(RuntimeError):
    """No model and no fallback could answer; a 503."""


@runtime_checkable
class UserSampler(Protocol):
    """A model that can name a few users with history (for the UI's examples)."""

    def sample_users(self, n: int = 5) -> list[int]: ...


FREEZE_AFTER_RELOAD_S = 2.0
"""Seconds after a reload before the heap is frozen again: requests still on the replaced model
(a deadline of 150 ms on the feed's path) have ended, so it is not frozen with them."""


def freeze_heap() -> None:
    """Take what is alive now (the model, its caches, the imported modules) out of the cyclic
    garbage collector's scans: ``gc.collect(); gc.freeze()``, after unfreezing what an earlier
    call froze (so a replaced model's cycles are still collected, once).

    Why: CPython's full collection visits every tracked object, and it runs while every
    request waits; with a 1M-item feed model loaded (430k tracked objects) one took 223 ms,
    which at 200 requests/s stalls ~45 requests, 1% of them: the p99 itself. Frozen objects
    are still freed by reference counting; only collections skip them. The service calls this
    after the start-up load and :data:`FREEZE_AFTER_RELOAD_S` after each reload (which pays
    one full collection)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class RecommendService:
    """The model reference, its reload, and the fallback policy; no HTTP in here."""

    def __init__(
        self,
        load_model: Callable[[], Recommender],
        *,
        settings: ServiceSettings,
        fallback: Recommender | None = None,
        log: LogWriter | None = None,
    ) -> None:
        self.settings = settings
        self.fallback = fallback
        self.log = log
        self.metrics = ServiceMetrics()
        if log is not None:
            self.metrics.watch_log(log)
        self.last_load_error: str | None = None
        self._load_model = load_model
        self._model: Recommender | None = None
        self._load_lock = threading.Lock()
        self._attempted = False
        self._freeze_lock = threading.Lock()
        self._freeze: threading.Timer | None = None
        self._model_slots: anyio.CapacityLimiter | None = None

    def model_slots(self) -> anyio.CapacityLimiter:
        """The thread-pool slots of :meth:`answer` (``settings.model_threads``); made on the
        event loop's first call, as anyio wants."""
        if self._model_slots is None:
            self._model_slots = anyio.CapacityLimiter(self.settings.model_threads)
        return self._model_slots

    def current(self) -> Recommender | None:
        """The serving model; the first call loads it if the app's startup did not."""
        if not self._attempted:
            self.ensure_loaded()
        return self._model

    def ensure_loaded(self) -> None:
        """Load the model once (at startup); a failure is logged and leaves no model."""
        with self._load_lock:
            if self._attempted:
                return
            try:
                self._reload_locked()
            except Exception:
                logger.exception("loading the model failed; serving from the fallback only")
            finally:
                self._attempted = True  # set last: requests meanwhile wait on the lock
            freeze_heap()

    def reload(self) -> tuple[str | None, str]:
        """Load a new model and swap it in; returns (old, new) versions. Raises what the
        loader raised, with the old model still serving."""
        with self._load_lock:
            self._attempted = True
            old, new = self._reload_locked()
        # The replaced model is garbage once its requests end: collectable again now, and the
        # heap frozen anew a little later (not now: those requests still hold the old model).
        gc.unfreeze()
        with self._freeze_lock:
            if self._freeze is not None:
                self._freeze.cancel()
            self._freeze = threading.Timer(FREEZE_AFTER_RELOAD_S, freeze_heap)
            self._freeze.daemon = True
            self._freeze.start()
        return (old.version if old else None), new.version

    def close(self) -> None:
        """At shutdown: no more freezing, and the heap unfrozen, so the interpreter's exit
        finalizes every object as usual."""
        with self._freeze_lock:
            if self._freeze is not None:
                self._freeze.cancel()
                self._freeze = None
        gc.unfreeze()

    def _reload_locked(self) -> tuple[Recommender | None, Recommender]:
        try:
            new = self._load_model()
            if not isinstance(new, Recommender):
                raise TypeError(f"load_model returned a {type(new).__name__}, not a Recommender")
        except Exception as exc:
            self.last_load_error = f"{type(exc).__name__}: {exc}"
            self.metrics.reloads.labels("error").inc()
            raise
        old, self._model = self._model, new  # the swap: one reference assignment
        self.last_load_error = None
        self.metrics.reloads.labels("ok").inc()
        self.metrics.swapped(old, new)
        return old, new

    def ready(self) -> tuple[bool, str | None]:
        """Whether the model is loaded and ready, and why not."""
        model = self._model
        if model is None:
            return False, f"no model loaded (last error: {self.last_load_error})"
        try:
            return (True, None) if model.ready() else (False, "the model is not ready")
        except Exception as exc:
            return False, f"model.ready() raised {type(exc).__name__}: {exc}"

    def recommend(self, request: RecommendRequest) -> RecommendResult:
        """Ask the model, or the fallback when it fails; ``stage_ms["total"]`` is added."""
        start = time.perf_counter()
        return self._observed(self._recommend(request), start)

    def _recommend(self, request: RecommendRequest) -> RecommendResult:
        model = self.current()  # read once: a reload meanwhile does not touch this request
        result = None
        if model is not None:
            try:
                result = model.recommend(request)
            except BadRequestError:
                raise
            except Exception:
                logger.exception("model %s failed; answering from the fallback", model.version)
                self.metrics.errors.labels("recommend").inc()
        if result is None:
            result = self._from_fallback(request, model_loaded=model is not None)
            experiment, arm = _arm_of(model, request)  # the request stays in its arm
            if experiment:
                result = replace(result, experiment=experiment, arm=arm)
        return result

    def _observed(self, result: RecommendResult, start: float) -> RecommendResult:
        total_ms = (time.perf_counter() - start) * 1000.0
        result = replace(result, stage_ms={**result.stage_ms, "total": total_ms})
        self.metrics.observe(result)
        return result

    @staticmethod
    def identify(request: RecommendRequest) -> RecommendRequest:
        """The request under a new request id (what the response and the log call it)."""
        return replace(request, request_id=uuid.uuid4().hex)

    async def answer_fast(self, request: RecommendRequest) -> tuple[str, RecommendResult] | None:
        """The model's answer on the event loop when it has one for this request
        (:class:`~mlsd.serving.recommender.FastRecommender`), logged; ``None`` sends the
        request to :meth:`answer` (so does a fast path that fails: it is counted and logged).
        ``request`` carries its id (:meth:`identify`)."""
        model = self.current()
        if not isinstance(model, FastRecommender):
            return None
        ts, start = _arrival(request)
        try:
            result = await model.recommend_fast(request)
        except BadRequestError as exc:
            self._log_failed(request, ts, start, exc)
            raise
        except Exception:
            logger.exception("the fast path of %s failed; answering in a thread", model.version)
            self.metrics.errors.labels("recommend_fast").inc()
            return None
        if result is None:
            return None
        return self._logged(request, ts, self._observed(result, start))

    def answer(self, request: RecommendRequest) -> tuple[str, RecommendResult]:
        """:meth:`recommend`, logged (a 422 or 503 too, then raised); a request without an
        id gets one (:meth:`identify`)."""
        if request.request_id is None:
            request = self.identify(request)
        ts, start = _arrival(request)
        try:
            result = self._observed(self._recommend(request), start)
        except (BadRequestError, ServiceUnavailableError) as exc:
            self._log_failed(request, ts, start, exc)
            raise
        return self._logged(request, ts, result)

    def _logged(
        self, request: RecommendRequest, ts: float, result: RecommendResult
    ) -> tuple[str, RecommendResult]:
        request_id = cast(str, request.request_id)
        self._log(_log_answer, request_id, ts, request, result)
        return request_id, result

    def _log_failed(
        self, request: RecommendRequest, ts: float, start: float, error: Exception
    ) -> None:
        status = 422 if isinstance(error, BadRequestError) else 503
        latency_ms = (time.perf_counter() - start) * 1000.0
        arm = _arm_of(self.current(), request)  # the request stays in its arm
        self._log(_log_failure, cast(str, request.request_id), ts, request, status, latency_ms, arm)

    def _log(self, write: Callable[..., None], *args: Any) -> None:
        """``write(log, *args)`` when there is a log; a failure there never fails the request."""
        if self.log is None:
            return
        try:
            write(self.log, *args)
        except Exception:
            logger.exception("the service log refused a row")
            self.metrics.errors.labels("log").inc()

    def _from_fallback(self, request: RecommendRequest, *, model_loaded: bool) -> RecommendResult:
        why = "the model failed" if model_loaded else "no model is loaded"
        if self.fallback is None:
            raise ServiceUnavailableError(f"{why} and no fallback is configured; retry later")
        try:
            result = self.fallback.recommend(request)
        except BadRequestError:
            raise
        except Exception as exc:
            self.metrics.errors.labels("fallback").inc()
            logger.exception("the fallback failed too (request %s)", request.request_id)
            raise ServiceUnavailableError(
                f"{why} and the fallback failed too ({type(exc).__name__}; details in the "
                f"service's error output, request {request.request_id}); retry later"
            ) from exc
        path = result.path if result.path.startswith("fallback:") else "fallback:popular"
        return replace(result, path=path, fallbacks=("model", *result.fallbacks))

    def history(self, user_id: int, n: int) -> tuple[str, list[int]]:
        """(version that answered, the user's recent items newest first)."""
        for source in (self.current(), self.fallback):
            if source is None:
                continue
            try:
                return source.version, source.history(user_id, n)
            except Exception:
                logger.exception("history failed on %s", source.version)
                self.metrics.errors.labels("history").inc()
        raise ServiceUnavailableError("no model or fallback could read the history; retry later")

    def record_events(self, events: list[dict[str, object]]) -> int:
        """Send feedback to the model (also to the fallback, best effort) and to the log;
        returns the events the model accepted. ``request_id`` goes to the log only.

        Without a model (its load failed) nothing is recorded and the call is refused: the
        model is what writes the online feature store, and the fallback's in-memory history
        would have answered "accepted" for events that no store kept."""
        target = self.current()
        if target is None:
            self.metrics.errors.labels("record_events").inc()
            raise ServiceUnavailableError(
                "no model is loaded, so the events cannot be stored; retry later"
            )
        logged = events
        events = [{k: v for k, v in e.items() if k != "request_id"} for e in events]
        try:
            accepted = target.record_events(events)
        except BadRequestError:
            raise
        except Exception as exc:
            self.metrics.errors.labels("record_events").inc()
            logger.exception("recording events failed")
            raise ServiceUnavailableError(
                f"recording events failed ({type(exc).__name__}; details in the service's "
                "error output); retry"
            ) from exc
        if self.fallback is not None and self.fallback is not target:
            try:
                self.fallback.record_events(events)
            except Exception:
                logger.exception("the fallback could not record events")
        self._log(_log_feedback, logged, time.time())
        self.metrics.events.inc(accepted)
        return accepted

    def sample_users(self, n: int) -> list[int]:
        for source in (self.current(), self.fallback):
            if isinstance(source, UserSampler):
                try:
                    return source.sample_users(n)[:n]
                except Exception:
                    logger.exception("sample_users failed on %s", type(source).__name__)
        return []


def _log_answer(
    log: LogWriter, request_id: str, ts: float, request: RecommendRequest, result: RecommendResult
) -> None:
    version = result.model_version
    log.log_request(
        request_id, ts, request.user_id, version, path=result.path,
        latency_ms=result.stage_ms.get("total", float("nan")), status=200, k=request.k,
        fallbacks=result.fallbacks, experiment=result.experiment, arm=result.arm,
    )  # fmt: skip
    if result.items:
        log.log_exposures(
            request_id, ts, request.user_id, version,
            [i.item_id for i in result.items], [i.score for i in result.items],
            sources=[i.source for i in result.items], path=result.path,
            experiment=result.experiment, arm=result.arm,
        )  # fmt: skip
    # The ranker's rows, for drift monitoring: the model attaches them to a sampled share of
    # its online answers (FeedRecommender's candidates_sample_rate, [service_log] in the TOML).
    rows = result.candidates
    if rows is not None and result.path == "online":
        numeric, categorical = rows.feature_columns()
        log.log_candidates(
            request_id, ts, request.user_id, version, rows.item_ids, rows.scores, numeric,
            categorical,
        )  # fmt: skip


def _log_failure(
    log: LogWriter,
    request_id: str,
    ts: float,
    request: RecommendRequest,
    status: int,
    latency_ms: float,
    arm: tuple[str, str] = ("", ""),
) -> None:
    log.log_request(
        request_id, ts, request.user_id, "", path="", latency_ms=latency_ms, status=status,
        k=request.k, experiment=arm[0], arm=arm[1],
    )  # fmt: skip


def _arm_of(model: Recommender | None, request: RecommendRequest) -> tuple[str, str]:
    """(experiment, arm) of ``request`` when ``model`` is made of experiment arms
    (:class:`~mlsd.serving.recommender.Routed`), for what the service answers or refuses
    itself; ``("", "")`` for any other model, or when even the assignment fails."""
    if isinstance(model, Routed):
        try:
            return model.assignment(request)
        except Exception:
            logger.exception("no experiment arm for request %s", request.request_id)
    return "", ""


def _log_feedback(log: LogWriter, events: list[dict[str, object]], received: float) -> None:
    """One ``feedback`` row per event at ``received``, the service's clock (like requests and
    exposures, so one time window cuts all tables alike; the event's own ``ts`` goes to the
    model)."""
    for event in events:
        request_id = event.get("request_id")
        log.log_feedback(
            received,
            cast(int, event["user_id"]),
            cast(int, event["item_id"]),
            str(event["event"]),
            value=cast(float, event.get("value", 1.0)),
            request_id=request_id if isinstance(request_id, str) else "",
        )


# ---------------------------------------------------------------- dependencies


# Async, so FastAPI does not run them in the thread pool (see the module docstring).


async def get_service(request: Request) -> RecommendService:
    return cast(RecommendService, request.app.state.service)


ServiceDep = Annotated[RecommendService, Depends(get_service)]
_bearer = HTTPBearer(auto_error=False, description="MLSD_ADMIN_TOKEN")


async def require_admin(
    service: ServiceDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """403 when the server has no admin token, 401 without a bearer token, 403 when wrong."""
    token = service.settings.admin_token
    if not token:
        raise HTTPException(403, "admin endpoints are disabled: MLSD_ADMIN_TOKEN is not set")
    if credentials is None:
        raise HTTPException(
            401, "send Authorization: Bearer <MLSD_ADMIN_TOKEN>", {"WWW-Authenticate": "Bearer"}
        )
    if not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
        raise HTTPException(403, "wrong admin token")


async def resolve_k(service: ServiceDep, k: Annotated[int | None, Query(ge=1)] = None) -> int:
    """``k`` or MLSD_DEFAULT_K; more than MLSD_MAX_K is a 422 like any validation error."""
    return _check_k(service.settings, k, ("query", "k"))


def _check_k(settings: ServiceSettings, k: int | None, loc: tuple[str, ...]) -> int:
    if k is None:
        return settings.default_k
    if k > settings.max_k:
        message = f"Input should be less than or equal to {settings.max_k} (MLSD_MAX_K)"
        raise RequestValidationError(
            [{"type": "less_than_equal", "loc": loc, "msg": message, "input": k}]
        )
    return k


K = Annotated[int, Depends(resolve_k)]
UserId = Annotated[int, PathParam(ge=INT64_MIN, le=INT64_MAX)]
Now = Annotated[
    float | None,
    Query(ge=0, le=NOW_MAX, description="request time, Unix seconds (default: the clock)"),
]


# ---------------------------------------------------------------- routes

router = APIRouter()

TOO_LARGE: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorOut, "description": "the body is over MLSD_MAX_BODY_BYTES"}
}
UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorOut, "description": "no model or fallback could answer; retry later"}
}
"""The error answers the schema documents besides FastAPI's 422."""


def _arrival(request: RecommendRequest) -> tuple[float, float]:
    """(wall-clock seconds, ``perf_counter``) of the request's arrival: now when it carries
    none (:attr:`~mlsd.serving.recommender.RecommendRequest.arrived`)."""
    now = time.perf_counter()
    start = request.arrival(now)
    return time.time() - (now - start), start


async def _respond(
    service: RecommendService, request: RecommendRequest, user_id: int | None
) -> RecommendationsOut:
    """The fast path on the event loop when the model has one, else the thread pool; the
    request's clock starts here, so the wait for a model thread is in its latency."""
    request = replace(service.identify(request), arrived=time.perf_counter())
    answered = await service.answer_fast(request)
    if answered is None:
        answered = await anyio.to_thread.run_sync(
            service.answer, request, limiter=service.model_slots()
        )
    return _answer(*answered, user_id)


HOT_PATH = "/v1/recommendations/{user_id}"
"""The route :class:`HotRoute` answers first."""


class HotRoute:
    """ASGI middleware: ``GET /v1/recommendations/{user_id}`` answered without FastAPI's
    per-request machinery, for the requests it can read at a glance.

    Why: on the precomputed path the answer (one Redis read) costs about 0.5 ms of CPU, and
    FastAPI's routing, dependency solving, parameter validation and response validation around
    it cost about as much again (profiled under load: FastAPI, Starlette and pydantic took 45%
    of the event loop's busy time). This answers the route's plain requests with the same
    service calls and the same JSON body; every other request, including any parameter value
    FastAPI would reject, goes on to FastAPI unchanged, so validation errors keep coming from
    the one declared route (which also stays in the OpenAPI schema). Read here: a decimal
    ``user_id`` in int64 range; at most one each of ``k`` (decimal, 1 to ``MLSD_MAX_K``),
    ``explain`` and ``precomputed`` (pydantic's boolean words) and ``now`` (a plain decimal
    number of seconds, 0 to ``NOW_MAX``); other query parameters are ignored, as FastAPI
    ignores them. Sits inside :class:`~mlsd.serving.metrics.RequestMetricsMiddleware`, and
    names the declared route in the scope, so its requests are counted under the same label.
    """

    PREFIX = HOT_PATH.removesuffix("{user_id}")
    _INT = re.compile(r"-?[0-9]{1,19}")
    _K = re.compile(r"[0-9]{1,9}")
    _DECIMAL = re.compile(r"[0-9]{1,11}(\.[0-9]{1,9})?")
    _BOOLS: ClassVar[Mapping[str, bool]] = BOOLEAN_WORDS

    def __init__(self, app: ASGIApp, service: RecommendService, route: object) -> None:
        self.app = app
        self.service = service
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = self._read(scope)
        if request is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route
        try:
            body = (await _respond(self.service, request, request.user_id)).model_dump_json()
        except (BadRequestError, ServiceUnavailableError) as exc:
            status = 422 if isinstance(exc, BadRequestError) else 503
            await error_response(status, exc)(scope, receive, send)
            return
        await Response(body, media_type="application/json")(scope, receive, send)

    def _read(self, scope: Scope) -> RecommendRequest | None:
        """The request, or ``None`` when it is not one this route reads (FastAPI's then)."""
        if scope["type"] != "http" or scope["method"] != "GET":
            return None
        path: str = scope["path"]
        if not path.startswith(self.PREFIX):
            return None
        user = path[len(self.PREFIX) :]
        if not self._INT.fullmatch(user) or not INT64_MIN <= int(user) <= INT64_MAX:
            return None
        settings = self.service.settings
        k, explain, precomputed, now = settings.default_k, False, True, None
        seen: set[str] = set()
        for name, value in parse_qsl(scope["query_string"].decode("latin-1"), True):
            if name in seen:
                return None
            seen.add(name)
            if name == "k":
                if not self._K.fullmatch(value):
                    return None
                k = int(value)
                if not 1 <= k <= settings.max_k:
                    return None
            elif name in ("explain", "precomputed"):
                flag = self._BOOLS.get(value.lower())
                if flag is None:
                    return None
                if name == "explain":
                    explain = flag
                else:
                    precomputed = flag
            elif name == "now":
                if not self._DECIMAL.fullmatch(value) or float(value) > NOW_MAX:
                    return None
                now = float(value)
        return RecommendRequest(
            int(user), k, explain=explain, allow_precomputed=precomputed, now=now
        )


@router.get(HOT_PATH, response_model=RecommendationsOut, responses=UNAVAILABLE)
async def recommend_for_user(
    service: ServiceDep,
    user_id: UserId,
    k: K,
    explain: bool = False,
    precomputed: bool = True,
    now: Now = None,
) -> RecommendationsOut:
    """Top-k items for a known user (an unknown one gets the model's cold-start answer)."""
    request = RecommendRequest(user_id, k, explain=explain, allow_precomputed=precomputed, now=now)
    return await _respond(service, request, user_id)


@router.post(
    "/v1/recommendations",
    response_model=RecommendationsOut,
    responses={**TOO_LARGE, **UNAVAILABLE},
)
async def recommend(service: ServiceDep, body: RecommendIn) -> RecommendationsOut:
    """Top-k items for a user, or for an anonymous visitor from ``recent_items``."""
    request = RecommendRequest(
        user_id=body.user_id,
        k=_check_k(service.settings, body.k, ("body", "k")),
        context=body.context,
        recent_items=tuple(body.recent_items),
        explain=body.explain,
        allow_precomputed=body.allow_precomputed,
        now=body.now,
    )
    return await _respond(service, request, body.user_id)


@router.post("/v1/events", response_model=AcceptedOut, responses={**TOO_LARGE, **UNAVAILABLE})
def record_events(
    service: ServiceDep, events: Annotated[list[EventIn], Body(max_length=10_000)]
) -> AcceptedOut:
    """Feedback; ``ts`` reaches the model as Unix seconds (the server's clock when omitted).

    An event more than ``EVENT_TS_ALLOWANCE_S`` after the server's clock is refused, and with
    it the whole batch (a 422 naming ``body[i].ts`` and the server's time)."""
    now = time.time()
    rows = [{**e.model_dump(), "ts": _unix_seconds(e.ts) if e.ts else now} for e in events]
    _check_event_times(rows, now)
    return AcceptedOut(accepted=service.record_events(rows))


def _check_event_times(rows: list[dict[str, Any]], now: float) -> None:
    """422 for events dated more than ``EVENT_TS_ALLOWANCE_S`` after ``now`` (Unix seconds)."""
    late = [i for i, row in enumerate(rows) if row["ts"] > now + EVENT_TS_ALLOWANCE_S]
    if not late:
        return
    server = datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds")
    errors = [
        {
            "type": "less_than_equal",
            "loc": ("body", i, "ts"),
            "msg": (
                f"Event time is more than {EVENT_TS_ALLOWANCE_S:.0f} s after the server's "
                f"clock ({server}); future events are refused"
            ),
            "input": datetime.fromtimestamp(rows[i]["ts"], UTC).isoformat(),
        }
        for i in late
    ]
    raise RequestValidationError(errors)


ui_router = APIRouter()
"""The demo page and the endpoints it reads, served with :attr:`ServiceSettings.ui` only."""
UI_OFF = (
    "the demo UI and its user endpoints (/ui, /v1/users/sample, /v1/users/{user_id}/history) "
    "are off: they show any user's recent items to anyone who asks. Where that is acceptable, "
    "start the service with --ui (MLSD_UI=1)"
)
ui_off_router = APIRouter(include_in_schema=False)
"""The same paths when the UI is off: a 404 that says why and how to turn it on."""


@ui_off_router.get("/ui")
@ui_off_router.get("/v1/users/sample")
@ui_off_router.get("/v1/users/{user_id}/history")
def ui_off() -> None:
    raise HTTPException(404, UI_OFF)


@ui_router.get("/v1/users/sample", response_model=UserSampleOut)
def sample_users(service: ServiceDep, n: Annotated[int, Query(ge=1, le=100)] = 8) -> UserSampleOut:
    """A few user ids with history, from the model (or the fallback)."""
    return UserSampleOut(user_ids=service.sample_users(n))


@ui_router.get("/v1/users/{user_id}/history", response_model=HistoryOut, responses=UNAVAILABLE)
def user_history(
    service: ServiceDep, user_id: UserId, n: Annotated[int, Query(ge=1, le=200)] = 20
) -> HistoryOut:
    """The user's most recent items, newest first (empty for an unknown user)."""
    version, items = service.history(user_id, n)
    return HistoryOut(user_id=user_id, model_version=version, items=items)


@router.get("/healthz", response_model=StatusOut)
async def healthz() -> StatusOut:
    """The process is alive (does not look at the model). On the event loop, not in the
    thread pool, where event pushes may hold every thread for up to their timeout and a
    liveness probe kept waiting would restart a healthy process."""
    return StatusOut(status="ok")


@router.get("/readyz", response_model=StatusOut, responses={503: {"model": StatusOut}})
def readyz(service: ServiceDep, response: Response) -> StatusOut:
    """200 when a model is loaded and ready, 503 otherwise."""
    ok, why = service.ready()
    model = service.current()
    response.status_code = 200 if ok else 503
    version = model.version if model else None
    return StatusOut(status="ready" if ok else "not ready", model_version=version, detail=why)


@router.get("/metrics", response_class=Response)
async def metrics(service: ServiceDep) -> Response:
    """Prometheus text format (on the event loop, as ``/healthz``: a scrape reads memory)."""
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/admin/reload", response_model=ReloadOut, dependencies=[Depends(require_admin)])
def reload_model(service: ServiceDep) -> ReloadOut:
    """Load the model again and swap it in; on failure the old model keeps serving (500)."""
    serving = service.current()
    still = serving.version if serving else "nothing"
    del serving  # not held through the reload: the replaced model must be free to go
    try:
        old, new = service.reload()
    except Exception as exc:
        raise HTTPException(
            500, f"reload failed ({type(exc).__name__}: {exc}); {still} still serving"
        ) from exc
    return ReloadOut(old_version=old, new_version=new)


@ui_router.get("/ui", response_class=HTMLResponse, include_in_schema=False)
def ui() -> HTMLResponse:
    """The demo page."""
    return HTMLResponse(UI_HTML)


UI_HTML = (resources.files("mlsd.serving") / "static" / "ui.html").read_text(encoding="utf-8")
"""The whole page (``static/ui.html``): inline CSS and JS, no external assets, no build step. It
marks its state on ``<main data-state="idle|loading|loaded|error" data-count data-user
data-path>``; recommendation rows are ``tr.rec``, history entries ``li.hist``, stage rows
``tr.stage``."""


def _answer(request_id: str, result: RecommendResult, user_id: int | None) -> RecommendationsOut:
    return RecommendationsOut(
        request_id=request_id,
        user_id=user_id,
        model_version=result.model_version,
        path=result.path,
        fallbacks=list(result.fallbacks),
        items=[
            ItemOut(item_id=i.item_id, score=i.score, source=i.source, reasons=list(i.reasons))
            for i in result.items
        ],
        stage_ms=result.stage_ms,
        experiment=result.experiment,
        arm=result.arm,
    )


def _unix_seconds(ts: datetime) -> float:
    return (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).timestamp()


def create_app(
    load_model: Callable[[], Recommender],
    *,
    settings: ServiceSettings,
    fallback: Recommender | None = None,
    log: LogWriter | None = None,
    monitor: MonitorSettings | None = None,
    follow: Callable[[], bool] | None = None,
    follow_interval_s: float = 10.0,
) -> FastAPI:
    """The service app; ``load_model()`` runs at startup (off the event loop) and on reload.

    Args:
        load_model: returns a ready-to-serve model; may raise (then the fallback serves).
        settings: e.g. ``ServiceSettings.from_env()``.
        fallback: answers when the model fails or is missing, e.g. a ``PopularRecommender``.
        log: where requests, exposures and feedback are logged (closed at shutdown).
        monitor: with a ``log``, monitor it in the background
            (:class:`~mlsd.serving.periodic.ServiceMonitor`, on ``app.state.monitor``; started
            after the model loads, stopped at shutdown).
        follow: whether the model to load changed (e.g. ``ModelLoader.changed``): checked
            every ``follow_interval_s`` by a :class:`~mlsd.serving.periodic.ModelFollower`
            (``app.state.follower``), which reloads when it did.
    """
    service = RecommendService(load_model, settings=settings, fallback=fallback, log=log)
    watcher = None
    if monitor is not None and log is not None:
        watcher = ServiceMonitor(service, log.log_dir, monitor)
    follower = None if follow is None else ModelFollower(service, follow, follow_interval_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(service.ensure_loaded)
        if watcher is not None:
            watcher.start()
        if follower is not None:
            follower.start()
        try:
            yield
        finally:
            if follower is not None:
                await run_in_threadpool(follower.stop)
            if watcher is not None:
                await run_in_threadpool(watcher.stop)
            if log is not None:
                await run_in_threadpool(log.close)
            service.close()

    app = FastAPI(title="mlsd recommendations", lifespan=lifespan)
    app.state.service = service
    app.state.monitor = watcher
    app.state.follower = follower
    app.include_router(router)
    app.include_router(ui_router if settings.ui else ui_off_router)
    hot = next(r for r in router.routes if getattr(r, "path", None) == HOT_PATH)
    app.add_middleware(HotRoute, service=service, route=hot)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetricsMiddleware, metrics=service.metrics)
    app.add_exception_handler(ServiceUnavailableError, status_handler(503))
    app.add_exception_handler(BadRequestError, status_handler(422))
    app.add_exception_handler(RequestValidationError, validation_error_response)
    _document_k(app, settings)
    return app


def _document_k(app: FastAPI, settings: ServiceSettings) -> None:
    """Put this service's ``MLSD_MAX_K`` into its OpenAPI schema as ``k``'s maximum (query and
    body), with ``MLSD_DEFAULT_K`` as the default: the routes are module-level, so their
    declarations cannot know the settings of the app that serves them."""
    generate = app.openapi

    def bound(schema: dict[str, Any]) -> None:
        for option in schema.get("anyOf", [schema]):
            if option.get("type") == "integer":
                option["maximum"] = settings.max_k
        schema["default"] = settings.default_k

    def openapi() -> dict[str, Any]:
        schema = app.openapi_schema
        if schema is None:
            schema = generate()  # FastAPI keeps it in app.openapi_schema
            for route in schema["paths"].values():
                for operation in route.values():
                    for parameter in operation.get("parameters", []):
                        if parameter["name"] == "k" and parameter["in"] == "query":
                            bound(parameter["schema"])
            bound(schema["components"]["schemas"]["RecommendIn"]["properties"]["k"])
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def listen_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A bound TCP socket for uvicorn; ``reuse_port``: ``SO_REUSEPORT``, so several service
    processes (replicas) bind the same address and the kernel spreads connections among them.

    Why replicas: the feed's online path is mostly Python, so one process uses one core at a
    time (the GIL); N replicas, each a whole service with its own model, log and ``/metrics``,
    use N cores. Each replica is reloaded or follows the champion on its own (``mlsd feed
    serve --follow-champion``), as pods behind a load balancer are."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def serve(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    log_level: str = "info",
    access_log: bool = False,
    reuse_port: bool = False,
) -> None:
    """Run the app under uvicorn until interrupted, one process (``reuse_port``: one of several
    replicas on the same port, see :func:`listen_socket`).

    uvicorn's access log is off by default: a formatted line per request cost about 13% of
    the service's CPU on the precomputed path, and the service log's ``requests`` table
    already records every request."""
    import uvicorn

    sock = listen_socket(host, port, reuse_port=reuse_port)
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
