"""The online service: a FastAPI app in front of any :class:`~mlsd.serving.recommender.Recommender`.

=====================================  =========================================================
``GET  /v1/recommendations/{user_id}``  ``?k=&explain=&precomputed=`` → :class:`RecommendationsOut`
``POST /v1/recommendations``            :class:`RecommendIn` (``user_id`` null: anonymous visitor)
``POST /v1/events``                     ``[EventIn, ...]`` → ``{"accepted": n}``
``GET  /v1/users/{user_id}/history``    ``?n=`` → the user's recent items, newest first
``GET  /v1/users/sample``               ``?n=`` → a few user ids with history (for the UI)
``GET  /healthz``                       the process is alive
``GET  /readyz``                        200 when a model is loaded and ``ready()``, else 503
``GET  /metrics``                       Prometheus text format (one registry per app)
``POST /admin/reload``                  ``Authorization: Bearer $MLSD_ADMIN_TOKEN``; reload, swap
``GET  /ui``                            the demo page (HTML, no external assets)
=====================================  =========================================================

Errors: invalid input (``k`` outside [1, ``MLSD_MAX_K``], malformed JSON, unknown fields, a
``ValueError`` from the model) is a 422. An unknown user gets the model's cold-start answer (for
:class:`~mlsd.serving.popular.PopularRecommender`, the most popular items), never a 5xx. When the
model raises anything else, or no model is loaded, the ``fallback`` answers with path
``fallback:popular`` and ``"model"`` in ``fallbacks``; only without a fallback is it a 503.

Reload: ``load_model()`` runs under a lock (two reloads never interleave) while requests keep
using the current model; the new model then replaces the reference in one assignment. Each
request reads the reference once, so in-flight requests finish on the model they started with.
A loader that raises leaves the old model serving (the reload answers 500 with the error).
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from importlib import resources
from typing import Annotated, Protocol, cast, runtime_checkable

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    generate_latest,
)
from starlette.concurrency import run_in_threadpool

from mlsd.serving.metrics import RequestMetricsMiddleware, ServiceMetrics
from mlsd.serving.recommender import Recommender, RecommendRequest, RecommendResult
from mlsd.serving.schemas import (
    INT64_MAX,
    INT64_MIN,
    AcceptedOut,
    EventIn,
    HistoryOut,
    ItemOut,
    RecommendationsOut,
    RecommendIn,
    ReloadOut,
    StatusOut,
    UserSampleOut,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class ServiceSettings:
    """Service settings; :meth:`from_env` reads them from the environment.

    Attributes:
        admin_token: bearer token for ``/admin/*`` (``MLSD_ADMIN_TOKEN``); ``None`` disables them.
        max_k: the largest ``k`` a request may ask for (``MLSD_MAX_K``).
        default_k: ``k`` when a request gives none (``MLSD_DEFAULT_K``).
    """

    admin_token: str | None = None
    max_k: int = 100
    default_k: int = 10

    def __post_init__(self) -> None:
        if self.max_k < 1:
            raise ValueError(f"MLSD_MAX_K must be at least 1, got {self.max_k}")
        if not 1 <= self.default_k <= self.max_k:
            raise ValueError(
                f"MLSD_DEFAULT_K must be in [1, MLSD_MAX_K={self.max_k}], got {self.default_k}"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServiceSettings:
        """Read ``MLSD_ADMIN_TOKEN``, ``MLSD_MAX_K`` and ``MLSD_DEFAULT_K`` (unset: defaults)."""
        env = os.environ if environ is None else environ
        return cls(
            admin_token=env.get("MLSD_ADMIN_TOKEN") or None,
            max_k=_env_int(env, "MLSD_MAX_K", cls.max_k),
            default_k=_env_int(env, "MLSD_DEFAULT_K", cls.default_k),
        )


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


class ServiceUnavailableError(RuntimeError):
    """No model and no fallback could answer; a 503."""


class BadRequestError(ValueError):
    """The model rejected the request (it raised ``ValueError``); a 422."""


@runtime_checkable
class UserSampler(Protocol):
    """A model that can name a few users with history (for the UI's examples)."""

    def sample_users(self, n: int = 5) -> list[int]: ...


class RecommendService:
    """The model reference, its reload, and the fallback policy; no HTTP in here."""

    def __init__(
        self,
        load_model: Callable[[], Recommender],
        *,
        settings: ServiceSettings,
        fallback: Recommender | None = None,
    ) -> None:
        self.settings = settings
        self.fallback = fallback
        self.metrics = ServiceMetrics()
        self.last_load_error: str | None = None
        self._load_model = load_model
        self._model: Recommender | None = None
        self._load_lock = threading.Lock()
        self._attempted = False

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

    def reload(self) -> tuple[str | None, str]:
        """Load a new model and swap it in; returns (old, new) versions. Raises what the
        loader raised, with the old model still serving."""
        with self._load_lock:
            self._attempted = True
            old, new = self._reload_locked()
        return (old.version if old else None), new.version

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
        model = self.current()  # read once: a reload meanwhile does not touch this request
        start = time.perf_counter()
        result = None
        if model is not None:
            try:
                result = model.recommend(request)
            except ValueError as exc:
                raise BadRequestError(str(exc)) from exc
            except Exception:
                logger.exception("model %s failed; answering from the fallback", model.version)
                self.metrics.errors.labels("recommend").inc()
        if result is None:
            result = self._from_fallback(request, model_loaded=model is not None)
        total_ms = (time.perf_counter() - start) * 1000.0
        result = replace(result, stage_ms={**result.stage_ms, "total": total_ms})
        self.metrics.observe(result)
        return result

    def _from_fallback(self, request: RecommendRequest, *, model_loaded: bool) -> RecommendResult:
        why = "the model failed" if model_loaded else "no model is loaded"
        if self.fallback is None:
            raise ServiceUnavailableError(f"{why} and no fallback is configured; retry later")
        try:
            result = self.fallback.recommend(request)
        except ValueError as exc:
            raise BadRequestError(str(exc)) from exc
        except Exception as exc:
            self.metrics.errors.labels("fallback").inc()
            raise ServiceUnavailableError(f"{why} and the fallback failed too: {exc}") from exc
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
        """Send feedback to the model (also to the fallback, best effort); returns accepted."""
        model = self.current()
        target = model if model is not None else self.fallback
        if target is None:
            raise ServiceUnavailableError("no model is loaded to record events; retry later")
        try:
            accepted = target.record_events(events)
        except ValueError as exc:
            raise BadRequestError(str(exc)) from exc
        except Exception as exc:
            self.metrics.errors.labels("record_events").inc()
            raise ServiceUnavailableError(f"recording events failed: {exc}; retry") from exc
        if self.fallback is not None and self.fallback is not target:
            try:
                self.fallback.record_events(events)
            except Exception:
                logger.exception("the fallback could not record events")
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


# ---------------------------------------------------------------- dependencies


def get_service(request: Request) -> RecommendService:
    return cast(RecommendService, request.app.state.service)


ServiceDep = Annotated[RecommendService, Depends(get_service)]
_bearer = HTTPBearer(auto_error=False, description="MLSD_ADMIN_TOKEN")


def require_admin(
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


def resolve_k(service: ServiceDep, k: Annotated[int | None, Query(ge=1)] = None) -> int:
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


# ---------------------------------------------------------------- routes

router = APIRouter()


@router.get("/v1/recommendations/{user_id}", response_model=RecommendationsOut)
def recommend_for_user(
    service: ServiceDep, user_id: UserId, k: K, explain: bool = False, precomputed: bool = True
) -> RecommendationsOut:
    """Top-k items for a known user (an unknown one gets the model's cold-start answer)."""
    request = RecommendRequest(user_id, k, explain=explain, allow_precomputed=precomputed)
    return _answer(service.recommend(request), user_id)


@router.post("/v1/recommendations", response_model=RecommendationsOut)
def recommend(service: ServiceDep, body: RecommendIn) -> RecommendationsOut:
    """Top-k items for a user, or for an anonymous visitor from ``recent_items``."""
    request = RecommendRequest(
        user_id=body.user_id,
        k=_check_k(service.settings, body.k, ("body", "k")),
        context=body.context,
        recent_items=tuple(body.recent_items),
        explain=body.explain,
        allow_precomputed=body.allow_precomputed,
    )
    return _answer(service.recommend(request), body.user_id)


@router.post("/v1/events", response_model=AcceptedOut)
def record_events(
    service: ServiceDep, events: Annotated[list[EventIn], Body(max_length=10_000)]
) -> AcceptedOut:
    """Feedback; ``ts`` reaches the model as Unix seconds (the server's clock when omitted)."""
    now = time.time()
    rows = [{**e.model_dump(), "ts": _unix_seconds(e.ts) if e.ts else now} for e in events]
    return AcceptedOut(accepted=service.record_events(rows))


@router.get("/v1/users/sample", response_model=UserSampleOut)
def sample_users(service: ServiceDep, n: Annotated[int, Query(ge=1, le=100)] = 8) -> UserSampleOut:
    """A few user ids with history, from the model (or the fallback)."""
    return UserSampleOut(user_ids=service.sample_users(n))


@router.get("/v1/users/{user_id}/history", response_model=HistoryOut)
def user_history(
    service: ServiceDep, user_id: UserId, n: Annotated[int, Query(ge=1, le=200)] = 20
) -> HistoryOut:
    """The user's most recent items, newest first (empty for an unknown user)."""
    version, items = service.history(user_id, n)
    return HistoryOut(user_id=user_id, model_version=version, items=items)


@router.get("/healthz", response_model=StatusOut)
def healthz() -> StatusOut:
    """The process is alive (does not look at the model)."""
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
def metrics(service: ServiceDep) -> Response:
    """Prometheus text format."""
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/admin/reload", response_model=ReloadOut, dependencies=[Depends(require_admin)])
def reload_model(service: ServiceDep) -> ReloadOut:
    """Load the model again and swap it in; on failure the old model keeps serving (500)."""
    serving = service.current()
    try:
        old, new = service.reload()
    except Exception as exc:
        still = serving.version if serving else "nothing"
        raise HTTPException(
            500, f"reload failed ({type(exc).__name__}: {exc}); {still} still serving"
        ) from exc
    return ReloadOut(old_version=old, new_version=new)


@router.get("/ui", response_class=HTMLResponse, include_in_schema=False)
def ui() -> HTMLResponse:
    """The demo page."""
    return HTMLResponse(UI_HTML)


UI_HTML = (resources.files("mlsd.serving") / "static" / "ui.html").read_text(encoding="utf-8")
"""The whole page (``static/ui.html``): inline CSS and JS, no external assets, no build step. It
marks its state on ``<main data-state="idle|loading|loaded|error" data-count data-user
data-path>``; recommendation rows are ``tr.rec``, history entries ``li.hist``, stage rows
``tr.stage``."""


def _answer(result: RecommendResult, user_id: int | None) -> RecommendationsOut:
    return RecommendationsOut(
        request_id=uuid.uuid4().hex,
        user_id=user_id,
        model_version=result.model_version,
        path=result.path,
        fallbacks=list(result.fallbacks),
        items=[
            ItemOut(item_id=i.item_id, score=i.score, source=i.source, reasons=list(i.reasons))
            for i in result.items
        ],
        stage_ms=result.stage_ms,
    )


def _unix_seconds(ts: datetime) -> float:
    return (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).timestamp()


# ---------------------------------------------------------------- the app


def create_app(
    load_model: Callable[[], Recommender],
    *,
    settings: ServiceSettings,
    fallback: Recommender | None = None,
) -> FastAPI:
    """The service app; ``load_model()`` runs at startup (off the event loop) and on reload.

    Args:
        load_model: returns a ready-to-serve model; may raise (then the fallback serves).
        settings: e.g. ``ServiceSettings.from_env()``.
        fallback: answers when the model fails or is missing, e.g. a ``PopularRecommender``.
    """
    service = RecommendService(load_model, settings=settings, fallback=fallback)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(service.ensure_loaded)
        yield

    app = FastAPI(title="mlsd recommendations", lifespan=lifespan)
    app.state.service = service
    app.include_router(router)
    app.add_middleware(RequestMetricsMiddleware, metrics=service.metrics)
    app.add_exception_handler(ServiceUnavailableError, _status_handler(503))
    app.add_exception_handler(BadRequestError, _status_handler(422))
    return app


def _status_handler(status: int) -> Callable[[Request, Exception], Awaitable[Response]]:
    async def handle(_: Request, exc: Exception) -> Response:
        return JSONResponse({"detail": str(exc)}, status_code=status)

    return handle


def serve(
    app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info"
) -> None:
    """Run the app under uvicorn until interrupted (one process; replicas scale it out)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)
