"""How the service refuses a request: a body over the size limit (413, :class:`BodyLimit`),
a 422 that JSON can always carry (:func:`validation_error_response`), and the plain
``{"detail": ...}`` answers of the other statuses (:func:`error_response`)."""

from __future__ import annotations

import math
import reprlib
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any, cast

from fastapi import Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class _BodyTooLargeError(Exception):
    """Raised into the app by :class:`BodyLimit` when a body without a declared size goes over."""


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` (``MLSD_MAX_BODY_BYTES``) is a 413.

    Why: FastAPI reads a whole body into memory and parses it on the event loop; a 168 MB
    batch of events held the loop 35 s (``/healthz`` and every other request waited) and took
    2.4 GB of RAM. A declared ``Content-Length`` over the limit is answered before one byte is
    read; a body without one (chunked) is counted as it arrives and the request cut off once
    over, the app's own answer to the cut body (FastAPI's 400) replaced by the 413. Either
    way the connection is closed, so the rest of the body is never read. Sits inside
    :class:`~mlsd.serving.metrics.RequestMetricsMiddleware` (so refusals are counted) and
    outside everything else.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        received, over, started = 0, False, False

        async def counted() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    raise _BodyTooLargeError(f"request body over {self.max_bytes} bytes")
            return message

        async def unless_over(message: Message) -> None:
            nonlocal started
            if over and not started:
                return  # the app's answer to a body cut short: the 413 goes instead
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, unless_over)
        except Exception:
            if not over:
                raise
        if over and not started:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            {"detail": body_limit_detail(self.max_bytes)},
            status_code=413,
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


def body_limit_detail(max_bytes: int) -> str:
    """The ``detail`` of the 413 for a body over ``max_bytes``: the replicas' and, in front of
    them, the balancer's (:func:`~mlsd.serving.balancer.nginx_config`)."""
    return (
        f"the request body is over {max_bytes} bytes (MLSD_MAX_BODY_BYTES); "
        "send less, e.g. split a batch of events"
    )


def _content_length(scope: Scope) -> int | None:
    """The request's declared ``Content-Length``; ``None`` when absent or not a number (the
    body is then counted as it arrives)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


INPUT_ECHO_CHARS = 80
"""At most this many characters of a refused value are echoed in a 422 (``input``)."""

_short = reprlib.Repr()
_short.maxstring = _short.maxother = _short.maxlong = INPUT_ECHO_CHARS
_short.maxlist = _short.maxtuple = _short.maxdict = _short.maxset = 4
_short.maxlevel = 2


async def validation_error_response(_: Request, exc: Exception) -> Response:
    """FastAPI's 422 (``{"detail": [{"type", "loc", "msg", "input", ...}]}``) that JSON can
    always carry, and small.

    Why: Python's JSON parser reads the literals ``NaN`` and ``Infinity``, which validation
    then refuses; FastAPI's own handler echoed them in ``input`` and the response, which
    refuses non-finite numbers, failed with a 500. JSON text also carries lone UTF-16
    surrogates (``"\\ud800"``), which the response's UTF-8 cannot: a 500 again. It also echoed
    the whole refused value: a batch of events missing its brackets came back as large as it
    went. Here a non-finite number anywhere in an error is a string (``"nan"``, ``"inf"``), a
    lone surrogate anywhere (a value, a key, a field name) its escape (the six characters
    ``\\ud800``), and ``input`` is kept only when it is a short scalar, else a short repr
    (:data:`INPUT_ECHO_CHARS`)."""
    errors = cast(RequestValidationError, exc).errors()
    return JSONResponse({"detail": [_json_safe_error(e) for e in errors]}, status_code=422)


def _json_safe_error(error: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: jsonable_encoder(v) for k, v in error.items() if k != "input"}
    if "input" in error:
        out["input"] = _short_input(error["input"])
    return cast(dict[str, Any], _json_safe(out))


def _json_safe(value: Any) -> Any:
    """``value`` (made of JSON types) with every NaN or infinity as its string and every lone
    surrogate in a string or key as its escape (:func:`_utf8`)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return _utf8(value)
    if isinstance(value, dict):
        return {_utf8(str(k)): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _utf8(text: str) -> str:
    """``text`` with each character UTF-8 cannot encode (a lone surrogate: ``"\\ud800"`` in
    JSON text) as its escape, the six characters ``\\ud800``."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _short_input(value: Any) -> Any:
    """``value`` itself when a short JSON scalar, else a short repr (never the whole body)."""
    if value is None or isinstance(value, bool) or value in ({}, []):
        return value  # {}: FastAPI's input of a JSON decode error
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, int) and abs(value) < 10**INPUT_ECHO_CHARS:
        return value
    if isinstance(value, str) and len(value) <= INPUT_ECHO_CHARS:
        return value
    if isinstance(value, datetime):  # a time read from a number (EventIn.ts): as ISO text
        return value.isoformat()
    return _short.repr(value)


def status_handler(status: int) -> Callable[[Request, Exception], Awaitable[Response]]:
    async def handle(_: Request, exc: Exception) -> Response:
        return error_response(status, exc)

    return handle


def error_response(status: int, exc: Exception) -> JSONResponse:
    """``{"detail": str(exc)}``; a lone surrogate in it (echoed from a request) as its escape."""
    return JSONResponse({"detail": _utf8(str(exc))}, status_code=status)
