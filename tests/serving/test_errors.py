"""The service's refusals on their own: the body limit as an ASGI middleware, and the 422 and
other error bodies behind a bare FastAPI app."""

from __future__ import annotations

import json
import warnings

import anyio
import pytest
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.types import Message, Receive, Scope, Send

from mlsd.serving.errors import BodyLimit, error_response, validation_error_response
from mlsd.serving.schemas import EventIn, RecommendIn

with warnings.catch_warnings():  # starlette 1.x would rather have httpx2 behind its TestClient
    warnings.simplefilter("ignore", UserWarning)
    from fastapi.testclient import TestClient


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


# ---------------------------------------------------------------- 422s JSON can carry


def _validating_app() -> FastAPI:
    """The service's request bodies behind the service's 422 handler, and nothing else."""
    app = FastAPI()
    app.add_exception_handler(RequestValidationError, validation_error_response)

    @app.post("/v1/recommendations")
    def recommend(body: RecommendIn) -> None:
        raise AssertionError("the body was valid")

    @app.post("/v1/events")
    def record_events(events: list[EventIn]) -> None:
        raise AssertionError("the body was valid")

    return app


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/recommendations", '{"user_id": "\\ud800"}'),
        ("/v1/recommendations", '{"\\ud800": 1}'),
        ("/v1/events", '[{"user_id": 1, "item_id": 2, "event": "click", "request_id": "\\ud800"}]'),
    ],
    ids=["user_id", "unknown-key", "event-request_id"],
)
def test_a_lone_surrogate_in_a_request_is_a_422_echoing_its_escape(path: str, body: str) -> None:
    """JSON text may hold a lone UTF-16 surrogate (``"\\ud800"``), which UTF-8 cannot: echoed
    as it came, it failed the 422's own encoding, a 500."""
    client = TestClient(_validating_app(), raise_server_exceptions=False)
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/json"
    (error,) = response.json()["detail"]
    assert error["input"] == "\\ud800"  # the six characters, not the surrogate


def test_an_error_detail_keeps_its_text_and_escapes_a_lone_surrogate() -> None:
    response = error_response(422, ValueError("unknown context key 'café\ud800'"))
    assert json.loads(bytes(response.body)) == {"detail": "unknown context key 'café\\ud800'"}
