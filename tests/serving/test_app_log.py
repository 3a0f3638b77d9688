"""The service writes its log: requests, exposures, failures and feedback, tied by request id."""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import httpx
import pytest
from fastapi import FastAPI

from mlsd.config import load_feed_config
from mlsd.data.sources.synthetic import WorldConfig, synthesize
from mlsd.features.batch import feature_config_for
from mlsd.features.online import OnlineFeatures
from mlsd.monitoring.alerts import AlertRule
from mlsd.monitoring.drift import compare
from mlsd.monitoring.log_reader import read_table, summarize
from mlsd.monitoring.logs import CANDIDATES, EXPOSURES, FEEDBACK, REQUESTS, ServiceLog
from mlsd.monitoring.profile import ReferenceProfile
from mlsd.serving.app import create_app
from mlsd.serving.feed import FeedRecommender
from mlsd.serving.feed_model import FeedModel
from mlsd.serving.periodic import MonitorSettings, ServiceMonitor
from mlsd.serving.popular import PopularRecommender
from mlsd.serving.recommender import (
    BadRequestError,
    Recommender,
    RecommendRequest,
    RecommendResult,
)
from mlsd.serving.settings import ServiceSettings
from tests.serving.test_app import metric_samples, running_server
from tests.serving.test_feed import served

__all__ = ["served"]  # the module fixture: a trained, packaged feed model and its world

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    from fastapi.testclient import TestClient


@pytest.fixture(scope="module")
def popular(tmp_path_factory: pytest.TempPathFactory) -> PopularRecommender:
    out = tmp_path_factory.mktemp("app-log") / "synthetic"
    synthesize(WorldConfig(n_users=200, n_items=100, n_events=10_000, days=10), out, progress=False)
    return PopularRecommender.from_dataset(out, version="popular:test")


@dataclass
class Model:
    """Answers like ``inner`` under version ``m:1``; remembers the events it was sent."""

    inner: PopularRecommender
    fail: Exception | None = None
    version: str = "m:1"
    received: list[Mapping[str, object]] = field(default_factory=list)

    def recommend(self, request: RecommendRequest) -> RecommendResult:
        if self.fail is not None:
            raise self.fail
        return replace(self.inner.recommend(request), path="online", model_version=self.version)

    def record_events(self, events: Sequence[Mapping[str, object]]) -> int:
        self.received.extend(events)
        return len(events)

    def history(self, user_id: int, n: int = 20) -> list[int]:
        return []

    def ready(self) -> bool:
        return True


MakeClient = Callable[..., tuple[TestClient, ServiceLog]]


@pytest.fixture
def make_client(tmp_path: Path, popular: PopularRecommender) -> Iterator[MakeClient]:
    """``make_client(model, fallback=...)``: a started client and its log under tmp_path/log."""
    with ExitStack() as stack:

        def make(
            model: Recommender, *, fallback: Recommender | None = popular
        ) -> tuple[TestClient, ServiceLog]:
            log = ServiceLog(tmp_path / "log", flush_interval_s=60.0)
            app = create_app(lambda: model, settings=ServiceSettings(), fallback=fallback, log=log)
            return stack.enter_context(TestClient(app)), log

        yield make


def test_answers_are_logged_under_the_request_id_they_return(
    make_client: MakeClient, popular: PopularRecommender
) -> None:
    client, log = make_client(Model(popular))
    known = client.get("/v1/recommendations/5", params={"k": 7}).json()
    visitor = client.post("/v1/recommendations", json={"recent_items": [1, 2], "k": 3}).json()
    log.close()  # writes what it holds

    requests = read_table(log.log_dir, REQUESTS).to_pylist()
    by_id = {row["request_id"]: row for row in requests}
    assert set(by_id) == {known["request_id"], visitor["request_id"]}
    row = by_id[known["request_id"]]
    assert (row["user_id"], row["k"], row["status"], row["path"]) == (5, 7, 200, "online")
    assert row["model_version"] == "m:1"
    assert row["latency_ms"] == pytest.approx(known["stage_ms"]["total"], rel=1e-3)
    assert by_id[visitor["request_id"]]["user_id"] == -1  # anonymous

    exposures = read_table(log.log_dir, EXPOSURES).to_pandas()
    shown = exposures[exposures["request_id"] == known["request_id"]].sort_values("position")
    assert shown["position"].tolist() == list(range(7))
    assert shown["item_id"].tolist() == [i["item_id"] for i in known["items"]]
    assert shown["score"].tolist() == pytest.approx([i["score"] for i in known["items"]])
    assert shown["source"].tolist() == [i["source"] for i in known["items"]]
    assert set(shown["model_version"]) == {"m:1"}
    assert len(exposures) == 7 + 3


def test_feedback_names_its_request_and_the_model_never_sees_the_id(
    make_client: MakeClient, popular: PopularRecommender
) -> None:
    model = Model(popular)
    client, log = make_client(model)
    answer = client.get("/v1/recommendations/5", params={"k": 4}).json()
    first = answer["items"][0]["item_id"]
    events = [
        {"user_id": 5, "item_id": first, "event": "click", "request_id": answer["request_id"]},
        {"user_id": 5, "item_id": answer["items"][1]["item_id"], "event": "view"},
    ]
    assert client.post("/v1/events", json=events).json() == {"accepted": 2}
    assert all("request_id" not in e for e in model.received)
    log.close()

    feedback = read_table(log.log_dir, FEEDBACK).to_pylist()
    assert [(f["event"], f["request_id"]) for f in feedback] == [
        ("click", answer["request_id"]),
        ("view", ""),
    ]
    summary = summarize(log.log_dir)
    assert (summary.exposures, summary.clicks) == (4, 1)
    assert summary.ctr_by_model["m:1"].ctr == pytest.approx(0.25)


def test_fallback_and_failures_are_logged(
    make_client: MakeClient, popular: PopularRecommender
) -> None:
    client, log = make_client(Model(popular, fail=RuntimeError("boom")))
    assert client.get("/v1/recommendations/5", params={"k": 2}).status_code == 200
    log.close()
    [row] = read_table(log.log_dir, REQUESTS).to_pylist()
    assert (row["path"], row["fallbacks"], row["status"]) == ("fallback:popular", "model", 200)

    # two more apps, each with a writer of its own, into the same log directory
    client, second = make_client(Model(popular, fail=RuntimeError("boom")), fallback=None)
    assert client.get("/v1/recommendations/5", params={"k": 2}).status_code == 503
    client, third = make_client(Model(popular, fail=BadRequestError("bad context")))
    assert client.get("/v1/recommendations/5", params={"k": 2}).status_code == 422
    second.close()
    third.close()
    rows = read_table(log.log_dir, REQUESTS).to_pylist()
    failed = sorted(
        (r["status"], r["path"], r["model_version"]) for r in rows if r["status"] != 200
    )
    assert failed == [(422, "", ""), (503, "", "")]
    assert len(read_table(log.log_dir, EXPOSURES)) == 2  # only the fallback's answer showed items


def test_a_failing_log_never_fails_a_request(
    make_client: MakeClient, popular: PopularRecommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, log = make_client(Model(popular))

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(log, "log_request", broken)
    monkeypatch.setattr(log, "log_feedback", broken)
    assert client.get("/v1/recommendations/5").status_code == 200
    events = [{"user_id": 5, "item_id": 1, "event": "click"}]
    assert client.post("/v1/events", json=events).status_code == 200
    samples = metric_samples(client.get("/metrics").text)
    assert samples["mlsd_model_errors_total", frozenset({("operation", "log")})] == 2


def test_shutdown_closes_the_log(tmp_path: Path, popular: PopularRecommender) -> None:
    log = ServiceLog(tmp_path / "log", flush_interval_s=60.0)
    app = create_app(lambda: Model(popular), settings=ServiceSettings(), log=log)
    with TestClient(app) as client:
        client.get("/v1/recommendations/5", params={"k": 2})
        assert read_table(log.log_dir, REQUESTS).num_rows == 0  # still in memory
    assert read_table(log.log_dir, REQUESTS).num_rows == 1


def test_metrics_count_the_rows_written(
    make_client: MakeClient, popular: PopularRecommender
) -> None:
    client, log = make_client(Model(popular))
    client.get("/v1/recommendations/5", params={"k": 3})
    log.flush()
    samples = metric_samples(client.get("/metrics").text)
    assert samples["mlsd_log_written_rows_total", frozenset()] == 1 + 3
    assert samples["mlsd_log_dropped_rows_total", frozenset()] == 0
    assert samples["mlsd_log_write_errors_total", frozenset()] == 0


@pytest.mark.integration
def test_concurrent_clients_on_a_real_server_lose_no_row(
    tmp_path: Path, popular: PopularRecommender
) -> None:
    log = ServiceLog(tmp_path / "log", flush_rows=50, flush_interval_s=0.05)
    app = create_app(lambda: Model(popular), settings=ServiceSettings(), log=log)
    answers: list[dict[str, object]] = []
    lock = threading.Lock()

    def client(base_url: str, user_id: int) -> None:
        with httpx.Client(base_url=base_url, timeout=10) as http:
            for _ in range(40):
                body = http.get(f"/v1/recommendations/{user_id}", params={"k": 5}).json()
                click = {"user_id": user_id, "item_id": body["items"][0]["item_id"],
                         "event": "click", "request_id": body["request_id"]}  # fmt: skip
                assert http.post("/v1/events", json=[click]).status_code == 200
                with lock:
                    answers.append(body)

    with running_server(app) as base_url:
        threads = [threading.Thread(target=client, args=(base_url, u)) for u in range(1, 7)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    log.close()  # the server's shutdown closed it already; closing again is a no-op
    assert len(answers) == 240
    summary = summarize(log.log_dir)
    assert (summary.requests, summary.exposures, summary.clicks) == (240, 1200, 240)
    logged = set(read_table(log.log_dir, REQUESTS, columns=["request_id"]).column(0).to_pylist())
    assert logged == {a["request_id"] for a in answers}
    assert log.dropped_rows == 0


# ---------------------------------------------------------------- the ranker's rows, monitoring


@pytest.fixture(scope="module")
def feed_model(served: tuple[Path, Path, Path]) -> FeedRecommender:
    """The packaged feed model; every online answer carries its ranker rows (rate 1)."""
    world, model_dir, config = served
    feed = load_feed_config(config)
    features = OnlineFeatures(
        feed.feature_store.repo_path(world), feature_config_for(world, **vars(feed.features))
    )
    model = FeedModel.load(model_dir)
    return FeedRecommender(model, features=features, candidates_sample_rate=1.0).warm_up()


def _profile(model: FeedRecommender) -> ReferenceProfile:
    assert model.reference_profile_path is not None
    return ReferenceProfile.load(model.reference_profile_path)


def test_a_sampled_online_answer_logs_the_rankers_rows(
    make_client: MakeClient, feed_model: FeedRecommender
) -> None:
    client, log = make_client(feed_model)
    answer = client.get("/v1/recommendations/7", params={"k": 10, "precomputed": False}).json()
    assert answer["path"] == "online"
    log.close()

    rows = read_table(log.log_dir, CANDIDATES).to_pandas()
    assert set(rows["request_id"]) == {answer["request_id"]}
    assert set(rows["model_version"]) == {feed_model.version}
    assert len(rows) > len(answer["items"])  # every scored candidate, not only those shown
    assert rows["item_id"].is_unique
    profile = _profile(feed_model)
    logged_numeric = [c.removeprefix("f_") for c in rows.columns if c.startswith("f_")]
    logged_categorical = [c.removeprefix("c_") for c in rows.columns if c.startswith("c_")]
    assert logged_numeric == list(profile.numeric)
    assert logged_categorical == list(profile.categorical)
    assert compare(profile, rows).missing == ()  # the monitor finds every profiled feature

    score = rows.set_index("item_id")["score"]
    shown = answer["items"]
    assert score.loc[[i["item_id"] for i in shown]].tolist() == pytest.approx(
        [i["score"] for i in shown], rel=1e-6
    )  # the served score is the logged ranker score (float32)


def test_unsampled_and_degraded_answers_log_no_rankers_rows(
    make_client: MakeClient, feed_model: FeedRecommender
) -> None:
    unsampled = FeedRecommender(feed_model.model, features=feed_model.features)
    client, log = make_client(unsampled)
    assert client.get("/v1/recommendations/7", params={"precomputed": False}).status_code == 200
    log.close()
    assert read_table(log.log_dir, REQUESTS).num_rows == 1
    assert read_table(log.log_dir, CANDIDATES).num_rows == 0

    with pytest.raises(ValueError, match="candidates_sample_rate"):
        FeedRecommender(feed_model.model, features=feed_model.features, candidates_sample_rate=2)


RULES = (
    AlertRule("feature drift", "feature_psi_max", ">", 0.25),
    AlertRule("p99 latency", "latency_p99_ms", ">", 250.0),
    AlertRule("ctr drop", "ctr_drop", ">", 0.2),
)


def test_the_monitor_publishes_gauges_and_an_alert_flips_when_its_rule_fires(
    tmp_path: Path, feed_model: FeedRecommender
) -> None:
    log = ServiceLog(tmp_path / "log", flush_interval_s=60.0)
    settings = MonitorSettings(
        rules=RULES, window=timedelta(hours=1), interval_s=3600.0, min_drift_requests=1
    )  # 5 requests, then 1: judge them all
    app = create_app(lambda: feed_model, settings=ServiceSettings(), log=log, monitor=settings)
    with TestClient(app) as client:
        monitor = app.state.monitor
        assert isinstance(monitor, ServiceMonitor)
        assert monitor.profile_path() == feed_model.reference_profile_path  # the model's own
        before = metric_samples(client.get("/metrics").text)
        assert before["mlsd_monitor_alert_firing", frozenset({("rule", "p99 latency")})] == 0
        assert math.isnan(before["mlsd_monitor_feature_psi_max", frozenset()])  # no pass yet

        answers = [
            client.get(f"/v1/recommendations/{u}", params={"k": 5, "precomputed": False}).json()
            for u in range(1, 6)
        ]
        log.flush()
        now = datetime.now(UTC) + timedelta(seconds=1)
        result = monitor.run_once(now=now)
        assert result is not None
        assert result.counts["requests"] == 5
        samples = metric_samples(client.get("/metrics").text)
        for name in ("feature_psi_max", "prediction_psi", "latency_p99_ms", "error_rate"):
            assert samples[f"mlsd_monitor_{name}", frozenset()] == pytest.approx(
                result.metrics[name]
            )
        assert samples["mlsd_monitor_error_rate", frozenset()] == 0.0
        assert math.isnan(samples["mlsd_monitor_ctr", frozenset()])  # no feedback: no labels
        assert samples["mlsd_monitor_alert_firing", frozenset({("rule", "p99 latency")})] == 0
        assert samples["mlsd_monitor_last_run_timestamp_seconds", frozenset()] == pytest.approx(
            now.timestamp()
        )

        # An hour later: slow requests and ranker rows whose features moved far away.
        later = now + timedelta(hours=1)
        rows = read_table(log.log_dir, CANDIDATES).to_pandas()
        numeric = {c[2:]: rows[c].to_numpy() + 1000.0 for c in rows if c.startswith("f_")}
        categorical = {c[2:]: rows[c].to_numpy() for c in rows if c.startswith("c_")}
        for answer in answers:
            log.log_request(answer["request_id"] + "-late", later.timestamp() - 60, 1, "m",
                            path="online", latency_ms=900.0, status=200, k=5)  # fmt: skip
        # Logged as the serving model's version: the monitor compares only its rows.
        log.log_candidates("late", later.timestamp() - 60, 1, feed_model.version,
                           rows["item_id"], rows["score"], numeric, categorical)  # fmt: skip
        log.flush()
        drifted = monitor.run_once(now=later)
        assert drifted is not None
        assert {alert.rule.name for alert in drifted.fired} == {"feature drift", "p99 latency"}
        samples = metric_samples(client.get("/metrics").text)
        for rule, firing in (("feature drift", 1), ("p99 latency", 1), ("ctr drop", 0)):
            assert samples["mlsd_monitor_alert_firing", frozenset({("rule", rule)})] == firing
        assert samples["mlsd_monitor_latency_p99_ms", frozenset()] == pytest.approx(900.0)
        assert samples["mlsd_monitor_feature_psi_max", frozenset()] > 0.25


def test_a_pass_leaves_exposures_younger_than_the_label_delay_out_of_the_ctr(
    tmp_path: Path, feed_model: FeedRecommender
) -> None:
    """Exposures of the last minute, one clicked: with the default 5-minute delay the pass has
    no CTR yet (their other clicks may still come); with none it reads 1 in 4."""
    log = ServiceLog(tmp_path / "log", flush_interval_s=60.0)
    now = datetime.now(UTC)
    shown = now.timestamp() - 60
    log.log_exposures("r1", shown, 1, feed_model.version, [10, 11, 12, 13], [0.4, 0.3, 0.2, 0.1])
    log.log_feedback(shown + 5, 1, 11, "click", request_id="r1")
    log.flush()
    default = MonitorSettings(rules=RULES, interval_s=3600.0)
    for settings, ctr in ((default, math.nan), (replace(default, label_delay_s=0.0), 0.25)):
        app = create_app(lambda: feed_model, settings=ServiceSettings(), log=log, monitor=settings)
        with TestClient(app):
            result = app.state.monitor.run_once(now=now)
            assert result is not None
            assert result.counts["exposures"] == 4
            assert result.metrics.get("ctr", math.nan) == pytest.approx(ctr, nan_ok=True)
    log.close()


def test_the_monitor_thread_runs_passes_and_stops_with_the_app(
    tmp_path: Path, feed_model: FeedRecommender
) -> None:
    log = ServiceLog(tmp_path / "log", flush_interval_s=0.05)
    settings = MonitorSettings(rules=RULES, interval_s=0.05)
    app = create_app(lambda: feed_model, settings=ServiceSettings(), log=log, monitor=settings)
    with TestClient(app) as client:
        client.get("/v1/recommendations/3", params={"precomputed": False})
        monitor = app.state.monitor
        deadline = time.monotonic() + 20.0
        while (monitor.last_result is None or not monitor.last_result.counts["requests"]) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert monitor.last_result is not None
        assert monitor.last_result.counts["requests"] == 1
        samples = metric_samples(client.get("/metrics").text)
        assert samples["mlsd_monitor_error_rate", frozenset()] == 0.0
    assert not [t for t in threading.enumerate() if t.name == "mlsd-monitor"]  # stopped


def test_a_pass_runs_in_a_child_process_and_a_dead_child_is_replaced(
    tmp_path: Path, feed_model: FeedRecommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    def in_this_process(*_: object, **__: object) -> None:
        raise AssertionError("the pass ran in the service's own process")

    # The service's process has no working run_monitor; a pass in the child does not notice.
    monkeypatch.setattr("mlsd.monitoring.monitor.run_monitor", in_this_process)
    monkeypatch.setattr("mlsd.serving.monitor_pass.run_monitor", in_this_process)
    log = ServiceLog(tmp_path / "log", flush_interval_s=60.0)
    settings = MonitorSettings(rules=RULES, interval_s=3600.0)
    app = create_app(lambda: feed_model, settings=ServiceSettings(), log=log, monitor=settings)
    before = {p.pid for p in multiprocessing.active_children()}
    with TestClient(app) as client:
        children = [p for p in multiprocessing.active_children() if p.pid not in before]
        assert children, "the child did not start with the service"
        client.get("/v1/recommendations/3", params={"precomputed": False})
        log.flush()
        monitor = app.state.monitor
        first = monitor.run_once()
        assert first is not None
        assert first.counts["requests"] == 1
        for child in children:
            os.kill(cast(int, child.pid), signal.SIGKILL)
            child.join(timeout=10)
        with pytest.raises(BrokenProcessPool):
            monitor.run_once()
        again = monitor.run_once()  # a new child
        assert again is not None
        assert again.counts["requests"] == 1
        # The child yields the cores to the service when they are contended.
        from mlsd.serving.monitor_pass import NICE, niceness

        assert monitor._child().submit(niceness).result() == os.nice(0) + NICE
    assert {p.pid for p in multiprocessing.active_children()} <= before  # stopped with the app


def stalled_monitor_app(
    tmp_path: Path, popular: PopularRecommender, *, interval_s: float, pass_timeout_s: float
) -> FastAPI:
    """A service whose monitoring passes hang: its reference profile is a FIFO with no writer,
    whose read blocks as a read from a stalled network mount would."""
    stalled = tmp_path / "profile.json"
    os.mkfifo(stalled)
    log = ServiceLog(tmp_path / "log", flush_interval_s=60.0)
    settings = MonitorSettings(
        rules=RULES, interval_s=interval_s, profile_path=stalled, pass_timeout_s=pass_timeout_s
    )
    return create_app(lambda: popular, settings=ServiceSettings(), log=log, monitor=settings)


def test_a_pass_that_hangs_is_abandoned_and_its_child_killed(
    tmp_path: Path, popular: PopularRecommender
) -> None:
    app = stalled_monitor_app(tmp_path, popular, interval_s=3600.0, pass_timeout_s=3.0)
    before = {p.pid for p in multiprocessing.active_children()}
    with TestClient(app):
        monitor = app.state.monitor
        children = [p for p in multiprocessing.active_children() if p.pid not in before]
        assert children, "the child did not start with the service"
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"still running after 3 s; its child .* killed"):
            monitor.run_once()
        assert time.monotonic() - started < 15
        # The pool's own thread may reap the child first: poll until it is seen gone.
        deadline = time.monotonic() + 10
        while any(child.is_alive() for child in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(child.is_alive() for child in children)
        assert monitor._pool is None  # the next pass starts a new child
    # The app stopped without waiting for the hung pass.


def test_a_stopping_service_does_not_wait_for_a_pass_in_progress(
    tmp_path: Path, popular: PopularRecommender
) -> None:
    """Shutdown joined the monitor's thread while its pass ran, up to ``pass_timeout_s``."""
    app = stalled_monitor_app(tmp_path, popular, interval_s=0.2, pass_timeout_s=60.0)
    before = {p.pid for p in multiprocessing.active_children()}
    with TestClient(app):
        time.sleep(1.5)  # the first pass started and hangs
        started = time.monotonic()
    assert time.monotonic() - started < 15
    deadline = time.monotonic() + 10
    while {p.pid for p in multiprocessing.active_children()} - before:
        assert time.monotonic() < deadline, "the pass's child outlived the service"
        time.sleep(0.05)
    assert app.state.monitor.service.metrics.errors.labels("monitor")._value.get() == 0


def test_without_a_profile_the_monitor_does_nothing(
    tmp_path: Path, popular: PopularRecommender
) -> None:
    log = ServiceLog(tmp_path / "log", flush_interval_s=60.0)
    app = create_app(
        lambda: Model(popular),
        settings=ServiceSettings(),
        log=log,
        monitor=MonitorSettings(rules=RULES),
    )
    with TestClient(app) as client:
        client.get("/v1/recommendations/3")
        log.flush()
        assert app.state.monitor.run_once() is None
        samples = metric_samples(client.get("/metrics").text)
        assert math.isnan(samples["mlsd_monitor_latency_p99_ms", frozenset()])
    no_log = create_app(
        lambda: Model(popular), settings=ServiceSettings(), monitor=MonitorSettings(rules=RULES)
    )
    assert no_log.state.monitor is None  # nothing to monitor without a log
