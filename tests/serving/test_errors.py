"""The service's refusals below FastAPI: the body limit as an ASGI middleware on its own."""

from __future__ import annotations

import json

import anyio
from starlette.types import Message, Receive, Scope, Send

from mlsd.serving.errors import BodyLimit


def test_a_body_over_the_limit_is_413_before_the_app_reads_it() -> None:
    """Content-Length over the limit: answered at once, the app never called."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("the app was called")

    async def receive() -> Message:
        raise AssertionError("the body was read")

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/events",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"2001")],
    }
    anyio.run(BodyLimit(app, max_bytes=2000), scope, receive, send)
    assert sent[0]["status"] == 413
    assert (b"connection", b"close") in sent[0]["headers"]
    detail = json.loads(sent[1]["body"])["detail"]
    assert "2000 bytes (MLSD_MAX_BODY_BYTES)" in detail
