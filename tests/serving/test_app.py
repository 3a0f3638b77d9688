"""The HTTP service against a real PopularRecommender: endpoints, errors, auth, reload, metrics."""

from __future__ import annotations

import functools
import gc
import itertools
import json
import socket
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pandas as pd
import pytest
import schemathesis
import uvicorn
from anyio.to_thread import current_default_thread_limiter
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from prometheus_client.parser import text_string_to_metric_families
from schemathesis.checks import not_a_server_error

from mlsd.data.sources.synthetic import WorldConfig, synthesize
from mlsd.features.definitions import EVENT_TS_ALLOWANCE_S
from mlsd.serving.app import FREEZE_AFTER_RELOAD_S, HotRoute, create_app, listen_socket
from mlsd.serving.popular import PopularRecommender
from mlsd.serving.recommender import (
    BadRequestError,
    Recommender,
    RecommendRequest,
    RecommendResult,
)
from mlsd.serving.schemas import NOW_MAX
from mlsd.serving.settings import ServiceSettings

with warnings.catch_warnings():  # starlette 1.x would rather have httpx2 behind its TestClient
    warnings.simplefilter("ignore", UserWarning)
    from fastapi.testclient import TestClient

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def contract_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("app") / "synthetic"
    synthesize(WorldConfig(n_users=200, n_items=100, n_events=10_000, days=10), out, progress=False)
    return out


@pytest.fixture(scope="module")
def popular(contract_dir: Path) -> PopularRecommender:
    return PopularRecommender.from_dataset(contract_dir, version="popular:test")


@dataclass
class StubModel:
    """A model with a chosen version, readiness and failure, answering like ``inner``."""

    inner: PopularRecommender
    version: str = "stub:1"
    fail: Exception | None = None
    is_ready: bool = True

    def recommend(self, request: RecommendRequest) -> RecommendResult:
        if self.fail is not None:
            raise self.fail
        answer = self.inner.recommend(request)
        return replace(answer, path="online", model_version=self.version)

    def record_events(self, events: object) -> int:
        return self.inner.record_events(events)  # type: ignore[arg-type]

    def history(self, user_id: int, n: int = 20) -> list[int]:
        return self.inner.history(user_id, n)

    def ready(self) -> bool:
        return self.is_ready


MakeClient = Callable[..., TestClient]


@dataclass
class FastModel(StubModel):
    """A StubModel with a fast path: ``fast`` "answer" (path ``precomputed``), "none", "raise"
    or "bad"; records which request ids each path saw."""

    fast: str = "answer"
    fast_ids: list[str | None] = field(default_factory=list)
    thread_ids: list[str | None] = field(default_factory=list)

    async def recommend_fast(self, request: RecommendRequest) -> RecommendResult | None:
        self.fast_ids.append(request.request_id)
        if self.fast == "raise":
            raise RuntimeError("redis went away")
        if self.fast == "bad":
            raise BadRequestError("no such context key")
        if self.fast == "none":
            return None
        answer = self.inner.recommend(request)
        return replace(answer, path="precomputed", model_version=self.version)

    def recommend(self, request: RecommendRequest) -> RecommendResult:
        self.thread_ids.append(request.request_id)
        return super().recommend(request)


@pytest.fixture
def make_client(popular: PopularRecommender) -> Iterator[MakeClient]:
    """``make_client(load_model=..., fallback=..., token=..., ui=...)``: a started TestClient
    (with the UI's endpoints unless ``ui=False``)."""
    with ExitStack() as stack:

        def make(
            load_model: Callable[[], Recommender] | None = None,
            *,
            fallback: Recommender | None = popular,
            token: str | None = TOKEN,
            ui: bool = True,
            **settings_kw: int,
        ) -> TestClient:
            loader = load_model or (lambda: StubModel(popular))
            service_settings = ServiceSettings(admin_token=token, ui=ui, **settings_kw)
            app = create_app(loader, settings=service_settings, fallback=fallback)
            return stack.enter_context(TestClient(app))

        yield make


@pytest.fixture
def client(make_client: MakeClient) -> TestClient:
    return make_client()


def metric_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``{(sample name, labels): value}`` from Prometheus text."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@contextmanager
def running_server(app: FastAPI, sock: socket.socket | None = None) -> Iterator[str]:
    """Serve ``app`` with uvicorn on ``sock`` (default: a free loopback port) in a thread;
    yields its base URL."""
    if sock is None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise AssertionError("uvicorn did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


# ---------------------------------------------------------------- recommendations


def test_get_recommendations(client: TestClient, popular: PopularRecommender) -> None:
    response = client.get("/v1/recommendations/5", params={"k": 7, "explain": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["user_id"] == 5
    assert body["model_version"] == "stub:1"
    assert body["path"] == "online"
    assert body["fallbacks"] == []
    assert len(body["items"]) == 7
    expected = popular.recommend(RecommendRequest(5, 7))
    assert [i["item_id"] for i in body["items"]] == [r.item_id for r in expected.items]
    assert all(i["source"] == "popular" and i["reasons"] for i in body["items"])
    assert {"popular", "total"} <= set(body["stage_ms"])
    assert body["request_id"] != client.get("/v1/recommendations/5").json()["request_id"]


def test_default_k_and_no_reasons_unless_asked(make_client: MakeClient) -> None:
    body = make_client(default_k=4).get("/v1/recommendations/5").json()
    assert len(body["items"]) == 4
    assert all(i["reasons"] == [] for i in body["items"])


def test_post_recommendations_for_a_user_and_a_visitor(client: TestClient) -> None:
    known = client.post("/v1/recommendations", json={"user_id": 5, "k": 3, "context": {"d": 1}})
    assert known.status_code == 200, known.text
    assert known.json()["user_id"] == 5
    top = [i["item_id"] for i in client.post("/v1/recommendations", json={"k": 3}).json()["items"]]
    visitor = client.post("/v1/recommendations", json={"k": 3, "recent_items": top[:2]})
    assert visitor.json()["user_id"] is None
    assert not set(top[:2]) & {i["item_id"] for i in visitor.json()["items"]}


def test_unknown_user_gets_the_cold_start_answer(client: TestClient) -> None:
    unknown = client.get("/v1/recommendations/987654321", params={"k": 5})
    anonymous = client.post("/v1/recommendations", json={"k": 5})
    assert unknown.status_code == 200
    assert unknown.json()["items"] == anonymous.json()["items"]


@pytest.mark.parametrize("k", [0, -3, 101])
def test_k_out_of_range_is_422(client: TestClient, k: int) -> None:
    for response in (
        client.get("/v1/recommendations/5", params={"k": k}),
        client.post("/v1/recommendations", json={"user_id": 5, "k": k}),
    ):
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert error["loc"][-1] == "k"
        if k > 100:
            assert "less than or equal to 100 (MLSD_MAX_K)" in error["msg"]


@pytest.mark.parametrize(
    "content",
    [b'{"user_id": 5, "k": ', b"[1, 2]", b'{"user_id": 5, "kk": 3}', b'{"k": "ten"}'],
    ids=["truncated", "not-an-object", "unknown-field", "wrong-type"],
)
def test_malformed_body_is_422(client: TestClient, content: bytes) -> None:
    headers = {"Content-Type": "application/json"}
    response = client.post("/v1/recommendations", content=content, headers=headers)
    assert response.status_code == 422, response.text


def test_a_model_bad_request_is_422(make_client: MakeClient, popular: PopularRecommender) -> None:
    client = make_client(
        lambda: StubModel(popular, fail=BadRequestError("unknown context key 'x'"))
    )
    response = client.get("/v1/recommendations/5")
    assert response.status_code == 422
    assert response.json()["detail"] == "unknown context key 'x'"


def test_a_models_own_value_error_is_its_failure_not_the_clients(
    make_client: MakeClient, popular: PopularRecommender
) -> None:
    # e.g. the re-ranker's check of its inputs: a 422 would blame the client and hide it.
    fail = ValueError("scores[3] is nan; real candidates need finite")
    client = make_client(lambda: StubModel(popular, fail=fail))
    response = client.get("/v1/recommendations/5", params={"k": 5})
    assert response.status_code == 200, response.text
    assert response.json()["path"] == "fallback:popular"
    samples = metric_samples(client.get("/metrics").text)
    assert samples["mlsd_model_errors_total", frozenset({("operation", "recommend")})] == 1


def test_model_exception_falls_back_to_popular(
    make_client: MakeClient, popular: PopularRecommender
) -> None:
    client = make_client(lambda: StubModel(popular, fail=RuntimeError("index corrupted")))
    response = client.get("/v1/recommendations/5", params={"k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["path"] == "fallback:popular"
    assert body["fallbacks"] == ["model"]
    assert body["model_version"] == "popular:test"
    assert len(body["items"]) == 5
    samples = metric_samples(client.get("/metrics").text)
    assert samples["mlsd_model_errors_total", frozenset({("operation", "recommend")})] == 1
    assert samples["mlsd_recommend_fallbacks_total", frozenset({("kind", "model")})] == 1


def test_model_exception_without_fallback_is_503(
    make_client: MakeClient, popular: PopularRecommender
) -> None:
    client = make_client(lambda: StubModel(popular, fail=RuntimeError("boom")), fallback=None)
    response = client.get("/v1/recommendations/5")
    assert response.status_code == 503
    assert "no fallback is configured" in response.json()["detail"]


@pytest.mark.parametrize(
    ("target", "read"),
    [
        ("/v1/recommendations/5", RecommendRequest(5, 10)),
        ("/v1/recommendations/-9223372036854775808?k=100", RecommendRequest(-(2**63), 100)),
        (
            "/v1/recommendations/7?k=3&explain=YES&precomputed=off&now=1700000000.5&utm=x",
            RecommendRequest(7, 3, explain=True, allow_precomputed=False, now=1_700_000_000.5),
        ),
        ("/v1/recommendations/9223372036854775808", None),  # beyond int64
        ("/v1/recommendations/0x10", None),
        ("/v1/recommendations/1_000", None),
        ("/v1/recommendations/5?k=0", None),
        ("/v1/recommendations/5?k=101", None),
        ("/v1/recommendations/5?k=%C2%B2", None),  # a superscript two: a digit, not an int
        ("/v1/recommendations/5?k=3&k=4", None),
        ("/v1/recommendations/5?explain=maybe", None),
        ("/v1/recommendations/5?now=-1", None),
        ("/v1/recommendations/5?now=1e9", None),
        ("/v1/recommendations/5?now=99999999999", None),  # after NOW_MAX (2262)
        ("/v1/recommendations/5/more", None),
        ("/v1/recommendations", None),
    ],
)
def test_the_hot_route_reads_plain_requests_only(
    target: str, read: RecommendRequest | None
) -> None:
    path, _, query = target.partition("?")
    scope = {"type": "http", "method": "GET", "path": path, "query_string": query.encode()}
    hot = HotRoute(None, SimpleNamespace(settings=ServiceSettings()), None)  # type: ignore[arg-type]
    assert hot._read(scope) == read
    assert hot._read({**scope, "method": "POST"}) is None


@pytest.mark.parametrize(
    "query",
    [
        {"k": 4},
        {"k": 4, "explain": "true", "precomputed": "false", "now": 1_700_000_000},
        {"k": 4, "explain": "on", "unknown": "ignored"},  # read by the hot route
        {"k": ["4", "4"], "explain": ["no", "1"]},  # repeated: FastAPI takes the last
    ],
    ids=["k", "all", "words", "repeated"],
)
def test_the_hot_route_answers_as_the_declared_route(
    make_client: MakeClient, popular: PopularRecommender, query: dict[str, Any]
) -> None:
    """A GET the hot route reads and one it leaves to FastAPI answer alike, and alike to the
    POST route (FastAPI's all through), but for the request id and the timings."""
    client = make_client(lambda: FastModel(popular))
    got = client.get("/v1/recommendations/5", params=query)
    assert got.status_code == 200, got.text
    last = {name: value[-1] if isinstance(value, list) else value for name, value in query.items()}
    words = {"true": True, "on": True, "1": True, "false": False, "no": False}
    posted = client.post(
        "/v1/recommendations",
        json={
            "user_id": 5,
            "k": int(last["k"]),
            "explain": words.get(str(last.get("explain", "false"))),
            "allow_precomputed": words[str(last.get("precomputed", "true"))],
            "now": last.get("now"),
        },
    )
    assert posted.status_code == 200, posted.text
    assert got.headers["content-type"] == posted.headers["content-type"] == "application/json"

    def same(body: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in body.items() if k not in ("request_id", "stage_ms")}

    assert same(got.json()) == same(posted.json())
    assert got.json()["request_id"] != posted.json()["request_id"]


@pytest.mark.parametrize(
    ("target", "field"),
    [
        ("/v1/recommendations/5?k=abc", "k"),
        ("/v1/recommendations/5?explain=maybe", "explain"),
        ("/v1/recommendations/5?now=-1", "now"),
        ("/v1/recommendations/0x10", "user_id"),
    ],
)
def test_what_the_hot_route_leaves_gets_fastapis_422(
    client: TestClient, target: str, field: str
) -> None:
    response = client.get(target)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"][-1] == field


# ---------------------------------------------------------------- events, history, users


def test_a_fast_answer_skips_the_thread_pool(
    make_client: MakeClient, popular: PopularRecommender
) -> None:
    model = FastModel(popular)
    client = make_client(lambda: model)
    got = client.get("/v1/recommendations/5", params={"k": 4}).json()
    posted = client.post("/v1/recommendations", json={"user_id": 6, "k": 4}).json()
    assert (got["path"], posted["path"]) == ("precomputed", "precomputed")
    assert model.fast_ids == [got["request_id"], posted["request_id"]]
    assert model.thread_ids == []  # recommend() never ran
    want = popular.recommend(RecommendRequest(5, k=4))
    assert [i["item_id"] for i in got["items"]] == [r.item_id for r in want.items]
    samples = metric_samples(client.get("/metrics").text)
    assert samples["mlsd_recommend_responses_total", frozenset({("path", "precomputed")})] == 2


@pytest.mark.parametrize("fast", ["none", "raise"])
def test_without_a_fast_answer_the_thread_path_answers_the_same_request(
    make_client: MakeClient, popular: PopularRecommender, fast: str
) -> None:
    model = FastModel(popular, fast=fast)
    client = make_client(lambda: model)
    answer = client.get("/v1/recommendations/5").json()
    assert answer["path"] == "online"
    assert model.fast_ids == model.thread_ids == [answer["request_id"]]
    samples = metric_samples(client.get("/metrics").text)
    failed = samples.get(("mlsd_model_errors_total", frozenset({("operation", "recommend_fast")})))
    assert failed == (1.0 if fast == "raise" else None)


def test_a_bad_request_on_the_fast_path_is_422(
    make_client: MakeClient, popular: PopularRecommender
) -> None:
    model = FastModel(popular, fast="bad")
    response = make_client(lambda: model).get("/v1/recommendations/5")
    assert response.status_code == 422
    assert "no such context key" in response.json()["detail"]
    assert model.thread_ids == []


def test_events_reach_the_history(client: TestClient) -> None:
    events = [  # user 6 is not used by other tests (the model is shared by the module)
        {"user_id": 6, "item_id": 92, "event": "click", "value": 2.5},  # ts: now
        {"user_id": 6, "item_id": 91, "event": "click", "ts": "2020-01-01T00:00:00Z"},
    ]
    response = client.post("/v1/events", json=events)
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 2}
    history = client.get("/v1/users/6/history", params={"n": 3}).json()
    assert history["items"][:2] == [92, 91]  # newest first, by ts
    recs = client.get("/v1/recommendations/6", params={"k": 100}).json()["items"]
    assert not {91, 92} & {i["item_id"] for i in recs}


@pytest.mark.parametrize(
    "events",
    [
        [{"user_id": 5, "event": "click"}],
        [{"user_id": 5, "item_id": 1, "event": ""}],
        [{"user_id": 5, "item_id": 1, "event": "click", "value": "nan"}],
        [{"user_id": 5, "item_id": 1, "event": "click", "ts": "yesterday"}],
        {"user_id": 5, "item_id": 1, "event": "click"},
        [{"user_id": 5, "item_id": 1, "event": "click"}] * 10_001,
    ],
    ids=["no-item", "empty-event", "nan-value", "bad-ts", "not-a-list", "too-many"],
)
def test_invalid_events_are_422(client: TestClient, events: object) -> None:
    assert client.post("/v1/events", json=events).status_code == 422


@pytest.mark.parametrize(
    ("ts", "bound"),
    [("2300-01-01T00:00:00Z", "2262-01-01T00:00:00Z"), ("1600-01-01", "1970-01-01T00:00:00Z")],
)
def test_an_event_time_out_of_range_is_422_naming_its_row(
    client: TestClient, ts: str, bound: str
) -> None:
    click = {"user_id": 8, "item_id": 93, "event": "click"}  # user 8: only this test's
    response = client.post("/v1/events", json=[click, {**click, "ts": ts}, click])
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", 1, "ts"]
    assert bound in error["msg"]
    assert 93 not in client.get("/v1/users/8/history").json()["items"]  # the batch was refused


def test_a_numeric_event_time_past_2262_echoes_the_time_it_read(client: TestClient) -> None:
    click = {"user_id": 8, "item_id": 93, "event": "click", "ts": 20_000_000_001}
    (error,) = client.post("/v1/events", json=[click]).json()["detail"]
    assert error["input"] == "2603-10-11T11:33:21+00:00"  # not datetime.datetime(2603, ...)


def test_event_times_at_the_bounds_are_accepted(client: TestClient) -> None:
    soon = time.time() + EVENT_TS_ALLOWANCE_S - 60  # a client's clock a little ahead
    events = [  # user 9: only this test's
        {"user_id": 9, "item_id": 94, "event": "click", "ts": soon},
        {"user_id": 9, "item_id": 95, "event": "click", "ts": 0},
    ]
    assert client.post("/v1/events", json=events).json() == {"accepted": 2}
    assert client.get("/v1/users/9/history").json()["items"][:2] == [94, 95]
    # The feature path converts ts so (mlsd.serving.feed.FeedRecommender.record_events).
    assert pd.to_datetime(pd.Series([NOW_MAX]), unit="s", utc=True)[0].year == 2262


def test_an_event_after_the_servers_clock_is_422_naming_its_row_and_the_time(
    client: TestClient,
) -> None:
    """A future event would count in the user's features before it happened (and in Redis
    keep later materializations out): refused, with the whole batch."""
    click = {"user_id": 12, "item_id": 96, "event": "click"}  # user 12: only this test's
    later = time.time() + EVENT_TS_ALLOWANCE_S + 120
    for ts in (later, "2262-01-01T00:00:00Z"):
        before = datetime.now(UTC)
        response = client.post("/v1/events", json=[click, {**click, "ts": ts}])
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert error["loc"] == ["body", 1, "ts"]
        server = datetime.fromisoformat(error["msg"].split("(")[1].split(")")[0])
        assert abs((server - before).total_seconds()) < 5
        assert f"{EVENT_TS_ALLOWANCE_S:.0f} s after the server's clock" in error["msg"]
    assert 96 not in client.get("/v1/users/12/history").json()["items"]


def test_the_ui_and_its_user_endpoints_are_off_by_default(make_client: MakeClient) -> None:
    client = make_client(ui=False)
    for path in ("/ui", "/v1/users/sample", "/v1/users/5/history?n=3"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert "--ui (MLSD_UI=1)" in response.json()["detail"]
    schema = client.get("/openapi.json").json()
    assert not [path for path in schema["paths"] if path.startswith("/v1/users")]
    assert client.get("/v1/recommendations/5").status_code == 200  # the API itself serves
    on = make_client(ui=True).get("/openapi.json").json()["paths"]
    assert {"/v1/users/sample", "/v1/users/{user_id}/history"} <= set(on)


def test_history_and_user_sample(client: TestClient, popular: PopularRecommender) -> None:
    users = client.get("/v1/users/sample", params={"n": 4}).json()["user_ids"]
    assert users == popular.sample_users(4)
    history = client.get(f"/v1/users/{users[0]}/history").json()
    assert history["items"] == popular.history(users[0])
    assert client.get("/v1/users/123456789/history").json()["items"] == []
    assert client.get("/v1/users/5/history", params={"n": 0}).status_code == 422


# ---------------------------------------------------------------- health and readiness


def test_healthz_and_readyz(client: TestClient) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["model_version"] == "stub:1"


def test_healthz_answers_while_event_pushes_hold_the_thread_pool(
    make_client: MakeClient, popular: PopularRecommender
) -> None:
    """The liveness probe shared the thread pool with slow pushes: 40 of them held its 40
    threads and /healthz waited, which gets a healthy process restarted."""
    release = threading.Event()

    class SlowStore(StubModel):
        def record_events(self, events: object) -> int:
            release.wait(10)
            return 1

    client = make_client(lambda: SlowStore(popular))
    assert client.portal is not None  # started
    client.portal.call(lambda: setattr(current_default_thread_limiter(), "total_tokens", 1))
    event = [{"user_id": 5, "item_id": 7, "event": "click"}]
    with ThreadPoolExecutor(1) as pool:
        pushed = pool.submit(client.post, "/v1/events", json=event)
        time.sleep(0.2)  # the push holds the pool's only thread
        started = time.monotonic()
        assert client.get("/healthz").status_code == 200
        assert client.get("/metrics").status_code == 200
        waited = time.monotonic() - started
        release.set()
        assert pushed.result().status_code == 200
    assert waited < 5  # not behind the push (10 s)


def test_the_wait_for_a_model_thread_is_in_the_latency(
    make_client: MakeClient, popular: PopularRecommender
) -> None:
    """The clock started once a model thread was free: three requests queued behind one
    thread each reported the model's 0.2 s while their clients waited up to 0.6 s."""

    class Slow(StubModel):
        def recommend(self, request: RecommendRequest) -> RecommendResult:
            time.sleep(0.2)
            return super().recommend(request)

    client = make_client(lambda: Slow(popular), model_threads=1)
    params = {"precomputed": "false"}
    with ThreadPoolExecutor(3) as pool:
        bodies = list(
            pool.map(lambda u: client.get(f"/v1/recommendations/{u}", params=params), [1, 2, 3])
        )
    totals = sorted(b.json()["stage_ms"]["total"] for b in bodies)
    assert totals[0] >= 190
    assert totals[-1] >= 550  # two requests' 0.2 s ahead of it, in its latency


def test_a_503_names_the_error_but_not_its_text(
    make_client: MakeClient, popular: PopularRecommender
) -> None:
    """The text of an internal error (hosts, ports, file paths) went to any caller."""
    secret = ConnectionError("Error 111 connecting to 10.1.2.3:6379")

    class Down(StubModel):
        def record_events(self, events: object) -> int:
            raise secret

    broken = replace(StubModel(popular), fail=secret)
    client = make_client(lambda: Down(popular, fail=secret), fallback=broken)
    answers = [
        client.get("/v1/recommendations/5"),
        client.post("/v1/events", json=[{"user_id": 5, "item_id": 7, "event": "click"}]),
    ]
    for answer in answers:
        assert answer.status_code == 503
        assert "ConnectionError" in answer.json()["detail"]
        assert "10.1.2.3" not in answer.text


def test_readyz_503_while_the_model_is_not_ready(
    make_client: MakeClient, popular: PopularRecommender
) -> None:
    model = StubModel(popular, is_ready=False)
    client = make_client(lambda: model)
    assert client.get("/readyz").status_code == 503
    assert client.get("/healthz").status_code == 200
    model.is_ready = True
    assert client.get("/readyz").status_code == 200


def test_failed_startup_load_serves_the_fallback(make_client: MakeClient) -> None:
    def broken() -> Recommender:
        raise FileNotFoundError("no champion in the registry")

    client = make_client(broken)
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert "no champion in the registry" in ready.json()["detail"]
    body = client.get("/v1/recommendations/5").json()
    assert (body["path"], body["fallbacks"]) == ("fallback:popular", ["model"])
    # Events are refused, not "accepted" into the fallback's memory while no store keeps them.
    user = 987_654_321  # no other test's: the fallback's history is the module's
    posted = client.post("/v1/events", json=[{"user_id": user, "item_id": 7, "event": "click"}])
    assert posted.status_code == 503
    assert "cannot be stored" in posted.json()["detail"]
    assert client.get(f"/v1/users/{user}/history").json()["items"] == []
    no_fallback = make_client(broken, fallback=None).get("/v1/recommendations/5")
    assert no_fallback.status_code == 503
    assert "no model is loaded" in no_fallback.json()["detail"]


# ---------------------------------------------------------------- admin


@pytest.mark.parametrize(
    ("server_token", "header", "status", "message"),
    [
        (TOKEN, None, 401, "Authorization: Bearer"),
        (TOKEN, "Bearer wrong", 403, "wrong admin token"),
        (TOKEN, f"Basic {TOKEN}", 401, "Authorization: Bearer"),
        (None, None, 403, "MLSD_ADMIN_TOKEN is not set"),
        (None, f"Bearer {TOKEN}", 403, "MLSD_ADMIN_TOKEN is not set"),
    ],
)
def test_admin_auth(
    make_client: MakeClient, server_token: str | None, header: str | None, status: int, message: str
) -> None:
    client = make_client(token=server_token)
    headers = {"Authorization": header} if header else {}
    response = client.post("/admin/reload", headers=headers)
    assert response.status_code == status
    assert message in response.json()["detail"]


def test_reload_swaps_the_version(make_client: MakeClient, popular: PopularRecommender) -> None:
    versions = itertools.count(1)
    client = make_client(lambda: StubModel(popular, version=f"v{next(versions)}"))
    assert client.get("/v1/recommendations/5").json()["model_version"] == "v1"
    response = client.post("/admin/reload", headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json() == {"old_version": "v1", "new_version": "v2"}
    assert client.get("/v1/recommendations/5").json()["model_version"] == "v2"
    assert client.get("/readyz").json()["model_version"] == "v2"
    samples = metric_samples(client.get("/metrics").text)
    assert samples["mlsd_model_info", frozenset({("version", "v2")})] == 1
    assert ("mlsd_model_info", frozenset({("version", "v1")})) not in samples


def test_failed_reload_keeps_the_old_model(
    make_client: MakeClient, popular: PopularRecommender
) -> None:
    calls = itertools.count()

    def load() -> Recommender:
        if next(calls) > 0:
            raise OSError("artifact checksum mismatch")
        return StubModel(popular, version="good")

    client = make_client(load)
    response = client.post("/admin/reload", headers=AUTH)
    assert response.status_code == 500
    assert "artifact checksum mismatch" in response.json()["detail"]
    assert "good still serving" in response.json()["detail"]
    body = client.get("/v1/recommendations/5").json()
    assert (body["model_version"], body["path"]) == ("good", "online")
    assert client.get("/readyz").status_code == 200
    samples = metric_samples(client.get("/metrics").text)
    assert samples["mlsd_model_reloads_total", frozenset({("outcome", "error")})] == 1


@dataclass
class CyclicModel(StubModel):
    """A StubModel in a reference cycle: only the cyclic garbage collector can free it."""

    me: object = None


def test_the_heap_is_frozen_after_a_load_and_a_replaced_model_is_still_freed(
    make_client: MakeClient, popular: PopularRecommender
) -> None:
    loaded: list[weakref.ref[CyclicModel]] = []

    def load() -> Recommender:
        model = CyclicModel(popular, version=f"v{len(loaded) + 1}")
        model.me = model
        loaded.append(weakref.ref(model))
        return model

    try:
        client = make_client(load)
        assert gc.get_freeze_count() > 0  # full collections skip what start-up loaded
        assert client.post("/admin/reload", headers=AUTH).status_code == 200
        deadline = time.monotonic() + FREEZE_AFTER_RELOAD_S + 10
        while (
            loaded[0]() is not None or not gc.get_freeze_count()
        ) and time.monotonic() < deadline:
            gc.collect()  # what the cyclic collector does on its own, sooner
            time.sleep(0.1)
        assert loaded[0]() is None, "the replaced model outlived its reload"
        assert loaded[1]() is not None
        assert gc.get_freeze_count() > 0  # frozen again, with the new model
    finally:
        gc.unfreeze()


def test_replicas_share_a_port_and_both_answer(popular: PopularRecommender) -> None:
    first = listen_socket("127.0.0.1", 0, reuse_port=True)
    port = first.getsockname()[1]
    second = listen_socket("127.0.0.1", port, reuse_port=True)
    apps = [
        create_app(functools.partial(StubModel, popular, version=v), settings=ServiceSettings())
        for v in ("replica-a", "replica-b")
    ]
    seen: set[str] = set()
    with running_server(apps[0], first) as url, running_server(apps[1], second):
        for _ in range(200):  # a new connection each time: the kernel picks a replica per one
            body = httpx.get(f"{url}/v1/recommendations/5", timeout=10).json()
            seen.add(body["model_version"])
            if len(seen) == 2:
                break
    assert seen == {"replica-a", "replica-b"}


def test_a_taken_port_is_refused_without_reuse_port() -> None:
    with listen_socket("127.0.0.1", 0, reuse_port=True) as taken:
        taken.listen()
        with pytest.raises(OSError, match="in use"):
            listen_socket("127.0.0.1", taken.getsockname()[1])


def test_the_follower_reloads_on_a_change_and_outlives_a_failing_check(
    popular: PopularRecommender,
) -> None:
    versions = itertools.count(1)
    checks: Iterator[bool | Exception] = iter([RuntimeError("registry unreachable"), True])

    def changed() -> bool:
        answer = next(checks, False)
        if isinstance(answer, Exception):
            raise answer
        return answer

    app = create_app(
        lambda: StubModel(popular, version=f"v{next(versions)}"),
        settings=ServiceSettings(),
        follow=changed,
        follow_interval_s=0.05,
    )
    with TestClient(app) as client:
        deadline = time.monotonic() + 10
        version = client.get("/v1/recommendations/5").json()["model_version"]
        while version != "v2" and time.monotonic() < deadline:
            time.sleep(0.05)
            version = client.get("/v1/recommendations/5").json()["model_version"]
        assert version == "v2"  # the check after the failed one reloaded
        time.sleep(0.2)  # more checks: no change, no reload
        assert client.get("/v1/recommendations/5").json()["model_version"] == "v2"
        samples = metric_samples(client.get("/metrics").text)
    assert samples["mlsd_model_errors_total", frozenset({("operation", "follow")})] == 1
    assert samples["mlsd_model_reloads_total", frozenset({("outcome", "ok")})] == 2


# ---------------------------------------------------------------- metrics and settings


def test_metrics_after_requests(client: TestClient) -> None:
    for _ in range(3):
        client.get("/v1/recommendations/5")
    client.get("/v1/recommendations/5", params={"k": 0})
    client.get("/no/such/page")
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    samples = metric_samples(response.text)
    endpoint = ("endpoint", "/v1/recommendations/{user_id}")
    ok = frozenset({endpoint, ("method", "GET"), ("status", "200")})
    assert samples["mlsd_http_requests_total", ok] == 3
    assert samples["mlsd_http_requests_total", ok - {("status", "200")} | {("status", "422")}] == 1
    lost = frozenset({("endpoint", "unmatched"), ("method", "GET"), ("status", "404")})
    assert samples["mlsd_http_requests_total", lost] == 1
    for stage in ("popular", "total"):
        assert samples["mlsd_recommend_stage_duration_seconds_count", frozenset({("stage", stage)})]
        bucket = frozenset({("stage", stage), ("le", "0.0005")})
        assert ("mlsd_recommend_stage_duration_seconds_bucket", bucket) in samples
    assert samples["mlsd_recommend_responses_total", frozenset({("path", "online")})] == 3
    assert samples["mlsd_model_info", frozenset({("version", "stub:1")})] == 1


def test_apps_keep_separate_metrics(make_client: MakeClient) -> None:
    first, second = make_client(), make_client()
    first.get("/v1/recommendations/5")
    samples = metric_samples(second.get("/metrics").text)
    assert not any(name == "mlsd_recommend_responses_total" for name, _ in samples)


@dataclass
class SlowModel(StubModel):
    """A StubModel that holds each answer ``seconds`` and records the most held at once."""

    seconds: float = 0.2
    running: int = 0
    most: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def recommend(self, request: RecommendRequest) -> RecommendResult:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(self.seconds)
            return super().recommend(request)
        finally:
            with self.lock:
                self.running -= 1


@pytest.mark.integration
def test_model_threads_bounds_the_answers_in_flight(popular: PopularRecommender) -> None:
    """Eight requests at once, two model threads: two answers at a time, all eight answered."""
    model = SlowModel(popular)
    settings = ServiceSettings(model_threads=2)
    with running_server(create_app(lambda: model, settings=settings)) as url:

        def get(user: int) -> int:
            return httpx.get(f"{url}/v1/recommendations/{user}", timeout=30).status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(get, range(8)))
    assert statuses == [200] * 8
    assert model.most == 2


# ---------------------------------------------------------------- a real server


@pytest.mark.integration
def test_reload_under_load_drops_nothing(contract_dir: Path) -> None:
    versions = itertools.count(1)
    app = create_app(
        lambda: PopularRecommender.from_dataset(contract_dir, version=f"v{next(versions)}"),
        settings=ServiceSettings(admin_token=TOKEN),
    )
    statuses: list[int] = []
    served: set[str] = set()
    stop = threading.Event()

    def hammer(base_url: str, user_id: int) -> None:
        with httpx.Client(base_url=base_url, timeout=10) as http:
            while not stop.is_set():
                response = http.get(f"/v1/recommendations/{user_id}", params={"k": 10})
                statuses.append(response.status_code)
                if response.status_code == 200:
                    served.add(response.json()["model_version"])

    with running_server(app) as base_url:
        workers = [threading.Thread(target=hammer, args=(base_url, u)) for u in (1, 2, 3)]
        for worker in workers:
            worker.start()
        reloads = []
        with httpx.Client(base_url=base_url, timeout=30) as admin:
            for _ in range(5):
                time.sleep(0.35)
                reloads.append(admin.post("/admin/reload", headers=AUTH))
        time.sleep(0.2)
        stop.set()
        for worker in workers:
            worker.join(timeout=10)
    assert [r.status_code for r in reloads] == [200] * 5
    assert reloads[-1].json()["new_version"] == "v6"
    assert len(statuses) > 50
    assert set(statuses) == {200}
    assert {"v1", "v6"} <= served


# ---------------------------------------------------------------- schemathesis


# The lazy loader (schemathesis.pytest.from_fixture) breaks on pytest 9.2 (it sets the removed
# ``Function._nodeid``), so the schema comes from an app built at import (nothing is loaded: no
# request reaches it) and each case is sent to the fixture's app instead.


def _schema_only() -> Recommender:
    raise AssertionError("this app only lends its OpenAPI schema")


api = schemathesis.openapi.from_dict(create_app(_schema_only, settings=ServiceSettings()).openapi())


@pytest.fixture(scope="module")
def fuzz_app(contract_dir: Path) -> FastAPI:
    model = PopularRecommender.from_dataset(contract_dir, version="popular:fuzz")
    return create_app(lambda: model, settings=ServiceSettings(admin_token=TOKEN), fallback=model)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@api.parametrize()
def test_api_never_answers_5xx(case: schemathesis.Case[Any], fuzz_app: FastAPI) -> None:
    case.call_and_validate(checks=[not_a_server_error], app=fuzz_app)


# ---------------------------------------------------------------- hostile bodies

JSON = {"Content-Type": "application/json"}


def http_500s(client: TestClient) -> float:
    """Requests counted with status 500 on ``/metrics``."""
    samples = metric_samples(client.get("/metrics").text)
    return sum(
        value
        for (name, labels), value in samples.items()
        if name == "mlsd_http_requests_total" and ("status", "500") in labels
    )


EVENT = '[{"user_id": 5, "item_id": 1, "event": "c", %s}]'


@pytest.mark.parametrize(
    ("path", "content", "loc"),
    [
        ("/v1/recommendations", '{"user_id": 5, "now": NaN}', ["body", "now"]),
        ("/v1/recommendations", '{"user_id": 5, "now": Infinity}', ["body", "now"]),
        ("/v1/events", EVENT % '"value": NaN', ["body", 0, "value"]),
        ("/v1/events", EVENT % '"value": -Infinity', ["body", 0, "value"]),
        ("/v1/events", EVENT % '"ts": NaN', ["body", 0, "ts"]),
        ("/v1/events", EVENT % '"ts": Infinity', ["body", 0, "ts"]),
    ],
)
def test_nan_and_infinity_literals_are_a_422_naming_the_field(
    client: TestClient, path: str, content: str, loc: list[object]
) -> None:
    """Python's JSON parser reads these literals; the 422 that refuses them must still be JSON
    (FastAPI's own handler echoed them and failed with a 500)."""
    response = client.post(path, content=content, headers=JSON)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == loc
    assert error["input"] in ("nan", "inf", "-inf")
    assert http_500s(client) == 0


def test_a_422_echoes_only_a_short_repr_of_a_large_input(client: TestClient) -> None:
    """One event object where a list goes: FastAPI echoed the whole body in ``input``."""
    event = {"user_id": 5, "item_id": 1, "event": "click", "request_id": "r" * 60}
    body = {"batch": [event] * 5_000}  # about 0.5 MB, under the limit
    response = client.post("/v1/events", json=body)
    assert response.status_code == 422, response.text[:300]
    assert len(response.content) < 1_000
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body"]
    long = client.post("/v1/events", json=[{**event, "event": "e" * 10_000}])
    assert long.status_code == 422
    assert len(long.content) < 1_000
    assert long.json()["detail"][0]["loc"] == ["body", 0, "event"]


def test_a_body_over_the_limit_is_413_with_or_without_content_length(
    make_client: MakeClient,
) -> None:
    client = make_client(max_body_bytes=2_000)
    events = [{"user_id": 13, "item_id": 97, "event": "click"}] * 60  # user 13: only this test's
    content = json.dumps(events).encode()
    assert len(content) > 2_000
    declared = client.post("/v1/events", content=content, headers=JSON)
    assert declared.status_code == 413, declared.text
    assert "2000 bytes (MLSD_MAX_BODY_BYTES)" in declared.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked
        for start in range(0, len(content), 500):
            yield content[start : start + 500]

    chunked = client.post("/v1/events", content=chunks(), headers=JSON)
    assert chunked.status_code == 413, chunked.text
    assert "MLSD_MAX_BODY_BYTES" in chunked.json()["detail"]
    assert 97 not in client.get("/v1/users/13/history").json()["items"]
    samples = metric_samples(client.get("/metrics").text)
    refused = frozenset({("endpoint", "/v1/events"), ("method", "POST"), ("status", "413")})
    assert samples["mlsd_http_requests_total", refused] == 1  # the chunked one, routed
    under = client.post(
        "/v1/events", content=content[:1_500].rsplit(b",", 1)[0] + b"]", headers=JSON
    )
    assert under.status_code == 200, under.text
    small_chunked = client.post(
        "/v1/events", content=iter([content.split(b", {")[0], b"]"]), headers=JSON
    )
    assert small_chunked.json() == {"accepted": 1}


def test_event_values_beyond_float32_are_422(client: TestClient) -> None:
    """The online store keeps values as float32: 1e39 would be stored as infinity."""
    click = {"user_id": 14, "item_id": 98, "event": "click"}  # user 14: only this test's
    for value in (1e39, -1e39):
        response = client.post("/v1/events", json=[click, {**click, "value": value}])
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert error["loc"] == ["body", 1, "value"]
    assert client.post("/v1/events", json=[{**click, "value": 3.4e38}]).status_code == 200


@pytest.mark.parametrize("bad", [True, "7", 7.0])
def test_integers_in_a_body_are_strict(client: TestClient, bad: object) -> None:
    """JSON true is not user 1, nor "7" or 7.0 user 7; query and path parameters still parse."""
    click = {"user_id": 15, "item_id": 99, "event": "click"}  # user 15: only this test's
    cases = [
        ("/v1/recommendations", {"user_id": bad, "k": 2}, ["body", "user_id"]),
        ("/v1/recommendations", {"user_id": 5, "k": bad}, ["body", "k"]),
        ("/v1/recommendations", {"recent_items": [bad]}, ["body", "recent_items", 0]),
        ("/v1/events", [{**click, "user_id": bad}], ["body", 0, "user_id"]),
        ("/v1/events", [{**click, "item_id": bad}], ["body", 0, "item_id"]),
    ]
    for path, body, loc in cases:
        response = client.post(path, json=body)
        assert response.status_code == 422, (body, response.text)
        (error,) = response.json()["detail"]
        assert error["loc"] == loc
    assert client.post("/v1/recommendations", json={"user_id": 7, "k": 2}).status_code == 200
    assert client.post("/v1/events", json=[click]).json() == {"accepted": 1}
    assert client.get("/v1/recommendations/7", params={"k": "2"}).status_code == 200


def test_numbers_and_context_values_in_a_body_are_strict_and_finite(client: TestClient) -> None:
    """A string is not a number ("7" as an event's value or a request's ``now``), JSON true is
    not a context value of 1, and a context value is finite."""
    click = {"user_id": 16, "item_id": 99, "event": "click"}  # user 16: only this test's
    cases = [
        ("/v1/events", '[{"user_id": 16, "item_id": 99, "event": "c", "value": "7"}]'),
        ("/v1/recommendations", '{"user_id": 5, "now": "7"}'),
        ("/v1/recommendations", '{"user_id": 5, "context": {"x": NaN}}'),
        ("/v1/recommendations", '{"user_id": 5, "context": {"x": -Infinity}}'),
        ("/v1/recommendations", '{"user_id": 5, "context": {"x": true}}'),
        ("/v1/recommendations", '{"user_id": 5, "context": {"x": [1]}}'),
    ]
    for path, content in cases:
        response = client.post(path, content=content, headers=JSON)
        assert response.status_code == 422, (content, response.text)
        errors = response.json()["detail"]
        field = "context" if "context" in content else "value" if "value" in content else "now"
        assert all(field in error["loc"] for error in errors), errors
    assert http_500s(client) == 0
    context = {"user_id": 5, "context": {"x": "7", "y": 2, "z": 2.5}, "now": 1_700_000_000}
    assert client.post("/v1/recommendations", json=context).status_code == 200
    assert client.post("/v1/events", json=[{**click, "value": 2}]).json() == {"accepted": 1}


def test_the_schema_gives_k_this_services_maximum_and_default() -> None:
    settings = ServiceSettings(max_k=50, default_k=7)
    schema = create_app(_schema_only, settings=settings).openapi()
    (query,) = [
        p["schema"]
        for p in schema["paths"]["/v1/recommendations/{user_id}"]["get"]["parameters"]
        if p["name"] == "k"
    ]
    body = schema["components"]["schemas"]["RecommendIn"]["properties"]["k"]
    for k in (query, body):
        (integer,) = [option for option in k["anyOf"] if option["type"] == "integer"]
        assert (integer["minimum"], integer["maximum"], k["default"]) == (1, 50, 7)
    other = create_app(_schema_only, settings=ServiceSettings()).openapi()
    assert other["components"]["schemas"]["RecommendIn"]["properties"]["k"]["default"] == 10


def test_the_schema_documents_413_and_503() -> None:
    paths = create_app(_schema_only, settings=ServiceSettings()).openapi()["paths"]
    assert {"413", "503"} <= set(paths["/v1/events"]["post"]["responses"])
    assert {"413", "503"} <= set(paths["/v1/recommendations"]["post"]["responses"])
    assert "503" in paths["/v1/recommendations/{user_id}"]["get"]["responses"]
