"""Experiments in the service: each request goes to its user's arm, and the log says which."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from mlsd.data.sources.synthetic import WorldConfig, synthesize
from mlsd.evaluation.experiments import Arm, Experiment, experiment_report
from mlsd.monitoring.log_reader import read_table
from mlsd.monitoring.logs import EXPOSURES, REQUESTS, ServiceLog
from mlsd.serving.app import create_app
from mlsd.serving.experiment import ExperimentRecommender
from mlsd.serving.popular import PopularRecommender
from mlsd.serving.recommender import RecommendRequest, RecommendResult
from mlsd.serving.settings import ServiceSettings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    from fastapi.testclient import TestClient

EXPERIMENT = Experiment(
    "ranker-ab", "s1", (Arm("control", "popular", 1.0), Arm("treatment", "champion", 1.0))
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("experiment") / "synthetic"
    synthesize(WorldConfig(n_users=200, n_items=100, n_events=10_000, days=10), out, progress=False)
    return out


def arms(world: Path) -> dict[str, PopularRecommender]:
    """Two real models that answer differently: all-time vs last-day popularity."""
    return {
        "control": PopularRecommender.from_dataset(world, version="popular:all"),
        "treatment": PopularRecommender.from_dataset(world, days=1.0, version="popular:1d"),
    }


def test_each_user_is_served_by_the_arm_the_experiment_assigns(world: Path) -> None:
    models = arms(world)
    routed = ExperimentRecommender(EXPERIMENT, models)
    assert routed.version == "control=popular:all,treatment=popular:1d"
    for user in range(60):
        result = routed.recommend(RecommendRequest(user, k=5))
        arm = EXPERIMENT.assign(user).name
        assert (result.experiment, result.arm) == ("ranker-ab", arm)
        assert result.model_version == models[arm].version
        # The baseline arm serves popularity by design: not counted as a fallback.
        assert result.path == ("popular" if arm == "control" else "fallback:popular")
        expected = models[arm].recommend(RecommendRequest(user, k=5))
        assert [r.item_id for r in result.items] == [r.item_id for r in expected.items]
    # An anonymous visitor is assigned by the request id: the same id, the same arm.
    visitor = RecommendRequest(None, k=5, recent_items=(1, 2), request_id="abc")
    assert routed.recommend(visitor).arm == EXPERIMENT.assign(None, request_id="abc").name
    assert routed.reference_profile_path is None  # popularity models carry no profile


class ThreadOnly:
    """A real model behind the plain Recommender protocol: no fast path."""

    def __init__(self, inner: PopularRecommender) -> None:
        self.inner, self.version = inner, inner.version

    def recommend(self, request: RecommendRequest) -> RecommendResult:
        return self.inner.recommend(request)

    def record_events(self, events: Sequence[Mapping[str, object]]) -> int:
        return self.inner.record_events(events)

    def history(self, user_id: int, n: int = 20) -> list[int]:
        return self.inner.history(user_id, n)

    def ready(self) -> bool:
        return True


def test_the_fast_path_answers_as_the_arm_would(world: Path) -> None:
    models = arms(world)
    routed = ExperimentRecommender(EXPERIMENT, models)
    mixed = ExperimentRecommender(
        EXPERIMENT, {"control": models["control"], "treatment": ThreadOnly(models["treatment"])}
    )
    for user in range(40):
        request = RecommendRequest(user, k=5, request_id=f"r{user}")
        fast = asyncio.run(routed.recommend_fast(request))
        assert fast is not None
        slow = routed.recommend(request)  # same arm, items, path and tags; other timings
        assert replace(fast, stage_ms={}) == replace(slow, stage_ms={})
        arm = EXPERIMENT.assign(user).name
        partly = asyncio.run(mixed.recommend_fast(request))
        assert (partly is None) == (arm == "treatment")  # that arm's model has no fast path


def test_every_arm_needs_a_model(world: Path) -> None:
    models = arms(world)
    with pytest.raises(ValueError, match="missing \\['treatment'\\]"):
        ExperimentRecommender(EXPERIMENT, {"control": models["control"]})
    with pytest.raises(ValueError, match="unknown \\['extra'\\]"):
        ExperimentRecommender(EXPERIMENT, {**models, "extra": models["control"]})


def test_feedback_reaches_each_arm_once(world: Path) -> None:
    models = arms(world)
    routed = ExperimentRecommender(EXPERIMENT, models)
    assert routed.record_events([{"user_id": 7, "item_id": 3, "event": "click"}]) == 1
    assert models["control"].history(7)[:1] == [3]
    assert models["treatment"].history(7)[:1] == [3]


def test_the_service_answers_and_logs_each_request_with_its_arm(
    world: Path, tmp_path: Path
) -> None:
    log = ServiceLog(tmp_path / "log", flush_interval_s=60.0)
    routed = ExperimentRecommender(EXPERIMENT, arms(world))
    app = create_app(lambda: routed, settings=ServiceSettings(), log=log)
    answered = {}
    with TestClient(app) as client:
        for user in range(80):
            body = client.get(f"/v1/recommendations/{user}", params={"k": 3}).json()
            answered[user] = body["arm"]
            assert body["experiment"] == "ranker-ab"
            if user % 4 == 0:  # a click on the first item, tied to its request
                item = body["items"][0]["item_id"]
                event = {"user_id": user, "item_id": item, "event": "click"}
                client.post("/v1/events", json=[{**event, "request_id": body["request_id"]}])
    log.close()
    assert answered == {u: EXPERIMENT.assign(u).name for u in range(80)}
    requests = read_table(tmp_path / "log", REQUESTS).to_pandas()
    assert dict(zip(requests["user_id"], requests["arm"], strict=True)) == answered
    exposures = read_table(tmp_path / "log", EXPOSURES).to_pandas()
    assert set(exposures["experiment"]) == {"ranker-ab"}
    assert len(exposures) == 3 * 80
    # The report reads the arms back from the log: every user once, the clicks by arm.
    report = experiment_report(tmp_path / "log", EXPERIMENT)
    users = {a.name: a.users for a in report.arms}
    assert users == {
        arm: sum(1 for a in answered.values() if a == arm) for arm in ("control", "treatment")
    }
    assert sum(a.clicks for a in report.arms) == 20


class FailsSome(ThreadOnly):
    """A real model that fails every ``every``-th request it is asked (a crash of the model,
    not of the request): the service's fallback answers those."""

    def __init__(self, inner: PopularRecommender, every: int) -> None:
        super().__init__(inner)
        self.every, self.asked = every, 0

    def recommend(self, request: RecommendRequest) -> RecommendResult:
        self.asked += 1
        if self.asked % self.every == 0:
            raise RuntimeError("the treatment model crashed")
        return self.inner.recommend(request)


def test_a_request_its_arm_failed_stays_in_that_arm(world: Path, tmp_path: Path) -> None:
    """Intent to treat: the fallback's answers, and the refusals when there is no fallback,
    are logged in the arm that failed them, so its requests and users are all counted."""
    models = arms(world)
    failing = FailsSome(models["treatment"], every=3)
    routed = ExperimentRecommender(EXPERIMENT, {**models, "treatment": failing})
    log = ServiceLog(tmp_path / "log", flush_interval_s=60.0)
    fallback = PopularRecommender.from_dataset(world, version="popular:fallback")
    app = create_app(lambda: routed, settings=ServiceSettings(), fallback=fallback, log=log)
    answered: dict[int, tuple[str, str]] = {}
    with TestClient(app) as client:
        for user in range(90):
            body = client.get(f"/v1/recommendations/{user}", params={"k": 3}).json()
            answered[user] = (body["arm"], body["model_version"])
    log.close()
    assigned = {u: EXPERIMENT.assign(u).name for u in range(90)}
    assert {u: arm for u, (arm, _) in answered.items()} == assigned
    treated = [u for u in range(90) if assigned[u] == "treatment"]
    crashed = [u for u in treated if answered[u][1] == "popular:fallback"]
    assert len(crashed) == len(treated) // 3 > 0  # the fallback answered them
    requests = read_table(tmp_path / "log", REQUESTS).to_pandas()
    assert dict(zip(requests["user_id"], requests["arm"], strict=True)) == assigned
    report = experiment_report(tmp_path / "log", EXPERIMENT)
    counted = {a.name: (a.users, a.requests) for a in report.arms}
    assert counted["treatment"] == (len(treated), len(treated))
    assert counted["control"] == (90 - len(treated), 90 - len(treated))

    # without a fallback, the arm's failures are 503s, logged in the arm too
    log = ServiceLog(tmp_path / "log2", flush_interval_s=60.0)
    failing.asked = 0
    app = create_app(lambda: routed, settings=ServiceSettings(), log=log)
    with TestClient(app) as client:
        statuses = {u: client.get(f"/v1/recommendations/{u}").status_code for u in treated}
    log.close()
    assert sorted(statuses.values()).count(503) == len(treated) // 3
    requests = read_table(tmp_path / "log2", REQUESTS).to_pandas()
    assert set(requests["arm"]) == {"treatment"}
    assert set(requests["experiment"]) == {"ranker-ab"}
    assert sorted(requests["status"].tolist()).count(503) == len(treated) // 3


def test_an_anonymous_request_needs_its_request_id_for_an_arm(world: Path) -> None:
    routed = ExperimentRecommender(EXPERIMENT, arms(world))
    with pytest.raises(ValueError, match="request id"):
        routed.arm_for(RecommendRequest(None, k=5, recent_items=(1, 2)))
    arms_of_one_id = {
        routed.arm_for(RecommendRequest(None, k=5, request_id="visit-1")) for _ in range(50)
    }
    assert arms_of_one_id == {EXPERIMENT.assign(None, request_id="visit-1").name}
