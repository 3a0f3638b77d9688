"""The user simulator against the real service (uvicorn on loopback)."""

from __future__ import annotations

import json
import math
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from mlsd.data.sources.world import World
from mlsd.evaluation.preferences import Preferences, WorldPreferences, log_examination
from mlsd.evaluation.simulator import _schedule_users, simulate
from mlsd.serving.app import create_app
from mlsd.serving.popular import PopularRecommender
from mlsd.serving.recommender import RecommendRequest, RecommendResult
from mlsd.serving.settings import ServiceSettings
from tests.evaluation.test_preferences import DRIFT_AT, _us, world, world_dir
from tests.serving.test_app import running_server

__all__ = ["world", "world_dir"]  # the module fixtures: a small world that drifts at DRIFT_AT

BEFORE_DRIFT = "2024-01-15T23:00:00"  # 300 requests at 12 s cross DRIFT_AT an hour in


class RecordingModel:
    """A real PopularRecommender that also keeps every event the service hands it."""

    def __init__(self, inner: PopularRecommender) -> None:
        self.inner = inner
        self.version = inner.version
        self.events: list[dict[str, object]] = []
        self._lock = threading.Lock()

    def recommend(self, request: RecommendRequest) -> RecommendResult:
        return self.inner.recommend(request)

    def record_events(self, events: Sequence[Mapping[str, object]]) -> int:
        with self._lock:
            self.events.extend(dict(e) for e in events)
        return self.inner.record_events(events)

    def history(self, user_id: int, n: int = 20) -> list[int]:
        return self.inner.history(user_id, n)

    def ready(self) -> bool:
        return True


@pytest.fixture
def served(world_dir: Path) -> Iterator[tuple[str, RecordingModel]]:
    """A fresh service (popularity on the world's data) on a free port; (url, model)."""
    model = RecordingModel(PopularRecommender.from_dataset(world_dir, version="popular:test"))
    app = create_app(lambda: model, settings=ServiceSettings())
    with running_server(app) as url:
        yield url, model


class Spy:
    """Preferences that delegate and remember the users and times they were asked about."""

    def __init__(self, inner: Preferences) -> None:
        self.inner, self.name = inner, inner.name
        self.users: list[int] = []
        self.times: list[int] = []

    def population(self, ts_us: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        return self.inner.population(ts_us)

    def click_probability(
        self, user_ids: npt.ArrayLike, item_ids: npt.ArrayLike, ts_us: npt.ArrayLike
    ) -> npt.NDArray[np.float64]:
        self.users.extend(np.asarray(user_ids).tolist())
        self.times.extend(np.asarray(ts_us).tolist())
        return self.inner.click_probability(user_ids, item_ids, ts_us)


class Constant:
    """Every user clicks every examined item with probability ``p``; the world's users."""

    def __init__(self, world: World, p: float) -> None:
        self.name, self.p = "constant", p
        self.world = WorldPreferences(world)

    def population(self, ts_us: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        return self.world.population(ts_us)

    def click_probability(
        self, user_ids: npt.ArrayLike, item_ids: npt.ArrayLike, ts_us: npt.ArrayLike
    ) -> npt.NDArray[np.float64]:
        return np.full(len(np.asarray(user_ids)), self.p)


class TwoKinds:
    """50 heavy users (activity 10, ids 1-50) and 50 light ones (activity 1, ids 51-100)."""

    name = "two kinds"

    def population(self, ts_us: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        return np.arange(1, 101), np.r_[np.full(50, 10.0), np.full(50, 1.0)]

    def click_probability(
        self, user_ids: npt.ArrayLike, item_ids: npt.ArrayLike, ts_us: npt.ArrayLike
    ) -> npt.NDArray[np.float64]:
        return np.zeros(len(np.asarray(user_ids)))


def test_requests_per_user_are_proportional_to_activity_whatever_the_panel() -> None:
    """Heavy users make 10/11 of the requests, as they make 10/11 of a world's visits: the panel
    is drawn uniformly, not by activity (which would weight a heavy user twice, ~0.99)."""
    ts = np.arange(400, dtype=np.int64) * 1_000_000
    shares = [
        float(np.mean(_schedule_users(TwoKinds(), 20, ts, np.random.default_rng(seed)) <= 50))
        for seed in range(60)
    ]
    assert np.mean(shares) == pytest.approx(10 / 11, abs=0.02)
    everyone = _schedule_users(TwoKinds(), 100, ts, np.random.default_rng(0))
    assert np.mean(everyone <= 50) == pytest.approx(10 / 11, abs=0.04)


# ---------------------------------------------------------------- end to end over HTTP


@pytest.mark.integration
def test_simulation_drives_the_real_service(
    served: tuple[str, RecordingModel], world: World
) -> None:
    url, model = served
    spy = Spy(WorldPreferences(world))
    result = simulate(
        url,
        spy,
        n_users=100,
        n_requests=300,
        start_ts=BEFORE_DRIFT,
        seconds_per_request=12.0,
        seed=1,
        concurrency=2,
        progress=False,
    )
    assert (result.requests, result.answered, result.errors) == (300, 300, 0)
    assert result.exposures == 3000  # 200 items: every user still has 10 unseen ones
    assert set(result.by_model_version) == {"popular:test"}
    assert set(result.by_path) == {"fallback:popular"}
    assert set(result.by_arm) == {"-"}
    assert result.by_model_version["popular:test"] == result.total

    # Every view and click reached the model through POST /v1/events, and was accepted. A view
    # is an examined item: sum_p 1/log2(p + 2) = 4.54 of the 10 shown, on average.
    views = [(e["user_id"], e["item_id"]) for e in model.events if e["event"] == "view"]
    clicks = [(e["user_id"], e["item_id"]) for e in model.events if e["event"] == "click"]
    examined = sum(log_examination(p) for p in range(10)) * 300
    assert abs(len(views) - examined) < 5 * math.sqrt(0.5 * examined)
    assert len(clicks) == result.clicks
    assert set(clicks) <= set(views)  # only an examined item is clicked
    assert result.events_sent == result.events_accepted == len(views) + result.clicks
    assert result.event_errors == 0

    # The simulated clock: request i at start + 12 s * i, crossing drift_at; events carry it.
    start = _us(BEFORE_DRIFT)
    assert sorted(set(spy.times)) == [start + 12_000_000 * i for i in range(300)]
    seconds = [float(e["ts"]) for e in model.events]  # type: ignore[arg-type]
    assert start / 1e6 <= min(seconds)
    assert max(seconds) < start / 1e6 + 3600
    assert len(set(spy.users)) <= 100
    assert result.start == "2024-01-15T23:00:00Z"
    assert result.end == "2024-01-16T00:00:00Z"

    # Clicks are Bernoulli draws of the expected probabilities: within 4 binomial sigmas.
    assert result.expected_clicks > 10
    assert abs(result.clicks - result.expected_clicks) <= 4 * math.sqrt(result.expected_clicks)
    assert 0 < result.latency_ms["p50"] <= result.latency_ms["p99"] <= result.latency_ms["max"]
    total = json.loads(json.dumps(result.to_dict()))["total"]
    assert total["exposures"] == 3000
    assert total["expected_ctr"] == pytest.approx(result.expected_clicks / 3000)


@pytest.mark.integration
def test_clicks_attribute_to_logged_exposures(
    world_dir: Path, world: World, tmp_path: Path
) -> None:
    from mlsd.monitoring.log_reader import read_table
    from mlsd.monitoring.logs import EXPOSURES, FEEDBACK, ServiceLog

    model = PopularRecommender.from_dataset(world_dir, version="popular:test")
    log = ServiceLog(tmp_path / "log")
    app = create_app(lambda: model, settings=ServiceSettings(), fallback=None, log=log)
    with running_server(app) as url:  # the app closes (flushes) the log at shutdown
        result = simulate(
            url,
            Constant(world, 0.3),
            n_users=50,
            n_requests=80,
            start_ts=DRIFT_AT,
            progress=False,
            views="shown",
        )
    exposures = read_table(tmp_path / "log", EXPOSURES).to_pandas()
    feedback = read_table(tmp_path / "log", FEEDBACK).to_pandas()
    assert len(exposures) == result.exposures == 800
    assert (feedback["event"] == "view").sum() == result.exposures
    clicks = feedback[feedback["event"] == "click"]
    assert len(clicks) == result.clicks > 0
    # Each event names the request that showed the item: exact attribution in the log.
    shown = set(zip(exposures["request_id"], exposures["item_id"], strict=True))
    assert set(zip(clicks["request_id"], clicks["item_id"], strict=True)) <= shown
    by_position = exposures.merge(clicks, on=["request_id", "item_id"])["position"]
    assert np.bincount(by_position, minlength=10).tolist() == result.clicks_by_position


@pytest.mark.integration
def test_clicks_fall_with_position_as_examined(
    served: tuple[str, RecordingModel], world: World
) -> None:
    url, _ = served
    p = 0.6
    result = simulate(
        url, Constant(world, p), n_users=200, n_requests=300, start_ts=DRIFT_AT, progress=False
    )
    exam = np.array([log_examination(i) for i in range(10)])
    assert np.allclose(result.expected_clicks_by_position, 300 * p * exam)
    clicks = np.array(result.clicks_by_position)
    sigma = np.sqrt(300 * p * exam)
    assert (np.abs(clicks - 300 * p * exam) <= 4 * sigma + 1).all()
    assert clicks[:3].sum() > 1.5 * clicks[-3:].sum()  # expected ratio 2.1/0.90 = 2.3

    # A custom examination model: nobody looks past the third item.
    top3 = simulate(
        url,
        Constant(world, p),
        n_users=50,
        n_requests=60,
        start_ts=DRIFT_AT,
        examination=lambda pos: 1.0 if pos < 3 else 0.0,
        send_views=False,
        progress=False,
    )
    assert top3.clicks > 0
    assert top3.clicks_by_position[3:] == [0] * 7
    assert top3.events_sent == top3.clicks  # clicks only


@pytest.mark.integration
def test_failures_are_counted_not_raised(world: World) -> None:
    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    result = simulate(
        dead, WorldPreferences(world), n_users=5, n_requests=4, start_ts=DRIFT_AT, progress=False
    )
    assert (result.answered, result.errors) == (0, 4)
    assert result.errors_by_kind == {"ConnectError": 4}
    assert result.events_sent == 0
    assert result.latency_ms == {}

    def broken() -> PopularRecommender:
        raise RuntimeError("no model")

    app = create_app(broken, settings=ServiceSettings())  # no fallback: every request is a 503
    with running_server(app) as url:
        result = simulate(
            url, WorldPreferences(world), n_users=5, n_requests=6, start_ts=DRIFT_AT, progress=False
        )
    assert result.errors_by_kind == {"http 503": 6}
    assert result.exposures == 0


def test_arguments_are_checked(world: World) -> None:
    with pytest.raises(ValueError, match="n_users"):
        simulate("http://x", WorldPreferences(world), n_users=0, n_requests=1, start_ts=DRIFT_AT)
