"""Fault tests: the feature store's Redis stops during a stream of requests and comes back."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from fastapi import FastAPI

from mlsd.cli import run
from mlsd.config import load_feed_config
from mlsd.data.sources.synthetic import WorldConfig, synthesize
from mlsd.serving.app import create_app
from mlsd.serving.batch import batch_predict
from mlsd.serving.feed import FeedRecommender
from mlsd.serving.popular import PopularRecommender
from mlsd.serving.recommender import Recommender
from mlsd.serving.settings import ServiceSettings
from mlsd.systems.feed.package import package_model
from mlsd.systems.feed.serve import ModelLoader
from tests.serving.test_app import running_server

pytestmark = pytest.mark.integration


class RedisProcess:
    """A redis-server that can be stopped (saving its data) and started again on its port."""

    def __init__(self, workdir: Path) -> None:
        binary = os.environ.get("MLSD_REDIS_SERVER") or shutil.which("redis-server")
        if not binary:
            if os.environ.get("CI"):
                pytest.fail("redis-server not found")
            pytest.skip("redis-server not found; install it or set MLSD_REDIS_SERVER")
        self.binary, self.workdir = binary, workdir
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.workdir), "--dbfilename", "dump.rdb", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except redis.exceptions.ConnectionError:
                time.sleep(0.02)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        """Save the data (so a restart has it) and stop."""
        with contextlib.suppress(redis.exceptions.ConnectionError):  # shutdown closes it
            redis.Redis(port=self.port).shutdown(save=True)
        if self.proc is not None:
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, RedisProcess]]:
    root = tmp_path_factory.mktemp("faults")
    server = RedisProcess(root)
    server.start()
    world = root / "world"
    synthesize(
        WorldConfig(n_users=300, n_items=120, n_events=30_000, days=30, seed=9),
        world,
        progress=False,
    )
    config = root / "feed.toml"
    config.write_text(
        f"""
[feature_store]
online_store = "redis"
redis_connection = "127.0.0.1:{server.port}"

[retrieval]
sources = ["popularity", "covisitation"]
n_bootstrap = 20

[ranking]
rankers = ["logistic"]
n_candidates = 100
ranker_windows = 1
"""
    )
    for step in ("apply", "materialize"):
        assert (
            run(["feed", "features", step, "--dataset", str(world), "--config", str(config)]) == 0
        )
    package_model(world, root / "model", load_feed_config(config), version="m1")
    try:
        yield world, config, server
    finally:
        server.stop()


def loader(world: Path, config: Path, redis_url: str | None = None) -> Callable[[], Recommender]:
    """The service's loader of the stack's packaged model (``redis_url``: precomputed lists)."""
    return ModelLoader(
        world,
        load_feed_config(config),
        model_dir=world.parent / "model",
        registry_uri=None,
        base_dir=world.parent,
        redis_url=redis_url,
    )


def test_redis_down_degrades_without_errors_and_recovers(
    stack: tuple[Path, Path, RedisProcess],
) -> None:
    world, config, server = stack
    load = loader(world, config)
    app = create_app(
        load, settings=ServiceSettings(), fallback=PopularRecommender.from_dataset(world)
    )
    answers, back = outage(app, server)
    statuses = {status for _, status, _, _ in answers}
    assert statuses == {200}, "a request failed while Redis was down"
    degraded = [t for t, _, _, fallbacks in answers if "features" in fallbacks]
    assert degraded, "no response said it fell back while Redis was down"
    healthy_again = [t for t, _, _, fallbacks in answers if t > back and not fallbacks]
    assert healthy_again, "the service did not recover"
    assert healthy_again[0] - back <= 1.0  # recovered within a second of Redis returning


Answer = tuple[float, int, str, list[str]]


def outage(app: FastAPI, server: RedisProcess) -> tuple[list[Answer], float]:
    """Requests for user 5 every 10 ms while Redis stops for a second and starts again:
    (time, status, path, fallbacks) of each answer, and when Redis was back."""
    answers: list[Answer] = []
    stop = threading.Event()

    def stream(base_url: str) -> None:
        with httpx.Client(base_url=base_url, timeout=10) as http:
            while not stop.is_set():
                response = http.get("/v1/recommendations/5", params={"k": 10})
                body = response.json()
                answers.append((time.monotonic(), response.status_code, body.get("path", ""),
                                body.get("fallbacks", [])))  # fmt: skip
                time.sleep(0.01)

    with running_server(app) as base_url:
        worker = threading.Thread(target=stream, args=(base_url,))
        worker.start()
        time.sleep(0.5)
        server.stop()
        time.sleep(1.0)
        server.start()
        back = time.monotonic()
        time.sleep(1.5)
        stop.set()
        worker.join(timeout=10)
    return answers, back


def test_precomputed_lists_survive_a_redis_outage_and_return(
    stack: tuple[Path, Path, RedisProcess],
) -> None:
    """Lists read on the event loop (an asyncio client) while Redis goes away and comes back:
    the online path answers meanwhile, and the lists are served again within a second."""
    world, config, server = stack
    load = loader(world, config, redis_url=f"redis://127.0.0.1:{server.port}/1")
    model = load()
    assert isinstance(model, FeedRecommender)
    assert model.precomputed is not None
    assert batch_predict(model, model.precomputed, [5], k=10)[0] == 1
    app = create_app(
        load, settings=ServiceSettings(), fallback=PopularRecommender.from_dataset(world)
    )
    answers, back = outage(app, server)
    assert {status for _, status, _, _ in answers} == {200}
    assert answers[0][2] == "precomputed"
    down = [fallbacks for _, _, path, fallbacks in answers if path != "precomputed"]
    assert down, "no answer came from the online path while Redis was down"
    assert all("precomputed" in fallbacks for fallbacks in down)
    again = [t for t, _, path, _ in answers if t > back and path == "precomputed"]
    assert again, "precomputed lists were not served after Redis returned"
    assert again[0] - back <= 1.0
