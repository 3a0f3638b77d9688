"""run_monitor on small service logs written with pyarrow in the log contract's layout."""

from __future__ import annotations

import importlib
import json
import math
import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlsd.evaluation.pointwise import expected_calibration_error
from mlsd.monitoring.alerts import DEFAULT_RULES, AlertRule
from mlsd.monitoring.monitor import run_monitor
from mlsd.monitoring.profile import ReferenceProfile
from mlsd.monitoring.report import write_report

TS = pa.timestamp("us", tz="UTC")
START = datetime(2024, 3, 1, 10, tzinfo=UTC)
END = START + timedelta(hours=1)
TYPES: dict[str, pa.DataType] = {
    "request_id": pa.string(), "ts": TS, "user_id": pa.int64(), "item_id": pa.int64(),
    "model_version": pa.string(), "experiment": pa.string(), "arm": pa.string(),
    "path": pa.string(), "fallbacks": pa.string(), "latency_ms": pa.float32(),
    "status": pa.int16(), "k": pa.int16(), "position": pa.int16(), "score": pa.float32(),
    "source": pa.string(), "event": pa.string(), "value": pa.float64(),
}  # fmt: skip
COLUMNS = {
    "requests": ["request_id", "ts", "user_id", "model_version", "experiment", "arm", "path",
                 "fallbacks", "latency_ms", "status", "k"],
    "exposures": ["request_id", "ts", "user_id", "item_id", "position", "score", "model_version",
                  "experiment", "arm", "path", "source"],
    "candidates": ["request_id", "ts", "user_id", "item_id", "model_version", "score"],
    "feedback": ["ts", "user_id", "item_id", "event", "value", "request_id"],
}  # fmt: skip
DEFAULTS: dict[str, Any] = {
    "model_version": "ranker:1", "experiment": "", "arm": "", "path": "online", "fallbacks": "",
    "status": 200, "k": 10, "source": "ranker", "value": 1.0, "user_id": 1, "item_id": 1,
    "score": 0.05,
}  # fmt: skip


def write_log(log_dir: Path, table: str, rows: pd.DataFrame) -> None:
    """Write ``rows`` as ``<log_dir>/<table>/date=YYYY-MM-DD/part-<pid>-<uuid>.parquet``."""
    rows = rows.copy()
    for column in COLUMNS[table]:
        if column not in rows:
            rows[column] = DEFAULTS[column]
    extra = [c for c in rows.columns if c.startswith(("f_", "c_"))]
    fields = [pa.field(c, TYPES[c]) for c in COLUMNS[table]]
    fields += [pa.field(c, pa.float32() if c.startswith("f_") else pa.int32()) for c in extra]
    schema = pa.schema(fields)
    rows["ts"] = pd.to_datetime(rows["ts"], utc=True)
    for day, part in rows.groupby(rows["ts"].dt.strftime("%Y-%m-%d")):
        directory = log_dir / table / f"date={day}"
        directory.mkdir(parents=True, exist_ok=True)
        data = pa.Table.from_pandas(part[schema.names], schema=schema, preserve_index=False)
        pq.write_table(data, directory / f"part-{os.getpid()}-{uuid.uuid4().hex}.parquet")


def profile(ctr: float = 0.1) -> ReferenceProfile:
    rng = np.random.default_rng(0)
    n = 10_000
    frame = pd.DataFrame({"events_7d": rng.normal(5.0, 1.0, n), "category": rng.integers(1, 5, n)})
    return ReferenceProfile.build(
        frame,
        rng.uniform(0.0, 0.2, n),
        numeric=["events_7d"],
        categorical=["category"],
        label_metrics={"ctr": ctr},
    )


def candidates(n: int, *, shift: float, start: datetime, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "request_id": [f"c{i}" for i in range(n)],
            "ts": [start + timedelta(seconds=float(s)) for s in rng.uniform(0, 3599, n)],
            "f_events_7d": rng.normal(5.0 + shift, 1.0, n),
            "c_category": rng.integers(1, 5, n),
            "score": rng.uniform(0.0, 0.2, n) + shift / 10,
        }
    )


def service_log(log_dir: Path, *, shift: float = 0.0) -> Path:
    """One hour of traffic from START: 100 requests, 10 of them with 10 exposures, 3 clicks."""
    write_log(log_dir, "candidates", candidates(3_000, shift=shift, start=START))
    # the hour before: wildly different rows that a window filter must leave out
    write_log(log_dir, "candidates", candidates(500, shift=50.0, start=START - timedelta(hours=1)))
    write_log(
        log_dir,
        "requests",
        pd.DataFrame(
            {
                "request_id": [f"r{i}" for i in range(100)],
                "ts": [START + timedelta(seconds=30 * i) for i in range(100)],
                "latency_ms": np.arange(1, 101, dtype=float),  # p99 = 99.01 (linear)
                "status": [500, 503] + [200] * 98,  # error rate 0.02
                "fallbacks": ["ann"] * 4 + [""] * 96,
                "path": ["online"] * 4 + ["fallback:popular"] + ["online"] * 95,  # fallbacks: 5%
            }
        ),
    )
    exposures = pd.DataFrame(
        {
            "request_id": [f"r{i}" for i in range(10) for _ in range(10)],
            "ts": [START + timedelta(seconds=30 * i) for i in range(10) for _ in range(10)],
            "user_id": [i for i in range(10) for _ in range(10)],
            "item_id": [100 + p for _ in range(10) for p in range(10)],
            "position": [p for _ in range(10) for p in range(10)],
        }
    )
    write_log(log_dir, "exposures", exposures)
    write_log(
        log_dir,
        "feedback",
        pd.DataFrame(
            {  # r0: clicks at positions 0 and 2; r1: an anonymous-request click at position 9,
                # 60 s later; user 2's click 1900 s after its exposure is attributed to nothing
                "ts": [START + timedelta(seconds=s) for s in (5, 6, 90, 60 + 1900)],
                "user_id": [0, 0, 1, 2],
                "item_id": [100, 102, 109, 100],
                "event": ["click"] * 4,
                "request_id": ["r0", "r0", "", ""],
            }
        ),
    )
    return log_dir


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return service_log(tmp_path_factory.mktemp("log"))


def test_service_and_label_metrics_by_hand(log_dir: Path) -> None:
    result = run_monitor(
        log_dir, profile(), start=START, end=END, rules=DEFAULT_RULES, reference_ctr=0.1
    )
    m = result.metrics
    assert result.counts == {"requests": 100, "exposures": 100, "candidates": 3_000, "feedback": 4}
    assert m["latency_p99_ms"] == pytest.approx(np.quantile(np.arange(1, 101), 0.99))
    assert m["error_rate"] == pytest.approx(0.02)
    assert m["fallback_rate"] == pytest.approx(0.05)
    assert m["ctr"] == pytest.approx(3 / 100)
    assert m["ctr_drop"] == pytest.approx(1 - 0.03 / 0.1)
    ndcg_r0 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    ndcg_r1 = (1 / math.log2(11)) / 1.0
    assert m["ndcg_at_10"] == pytest.approx((ndcg_r0 + ndcg_r1) / 2, rel=1e-6)
    assert m["ece"] == pytest.approx(abs(100 * 0.05 - 3) / 100, rel=1e-6)  # one bin, scores 0.05
    fired = {a.rule.name: a.value for a in result.fired}
    assert set(fired) == {"error rate", "ctr drop"}  # 0.05 fallbacks is not > 0.05
    assert m["feature_psi_max"] < 0.1  # the drifted rows of the hour before are outside


def test_ece_bins_scores_on_an_edge_as_the_profiles_ece_does(tmp_path: Path) -> None:
    """The monitor's ECE is shown beside the profile's (:func:`expected_calibration_error`), so
    a score on a bin edge (0.5) goes to the lower bin in both, 0 to the first, 1 to the last.
    Binned upwards, the unclicked 0.5s and the clicked 0.55s would share a bin and cancel."""
    edges = [round(0.1 * b, 1) for b in range(11)]  # 0.0, 0.1, ..., 1.0
    scores = np.array(edges * 20 + [0.5] * 50 + [0.55] * 50, dtype=np.float32)
    clicked = np.array([i % 3 == 0 for i in range(220)] + [False] * 50 + [True] * 50)
    ids = [f"r{i}" for i in range(len(scores))]
    shown = pd.DataFrame({"request_id": ids, "ts": START, "position": 0, "score": scores})
    write_log(tmp_path, "exposures", shown)
    clicks = {"request_id": np.array(ids)[clicked], "ts": START + timedelta(seconds=5)}
    write_log(tmp_path, "feedback", pd.DataFrame({**clicks, "event": "click"}))
    result = run_monitor(tmp_path, profile(), start=START, end=END, rules=())
    expected = expected_calibration_error(clicked, scores.astype(np.float64), n_bins=10)
    assert result.metrics["ece"] == pytest.approx(expected, rel=1e-9)
    assert expected > 0.2  # the 0.5s (never clicked) and the 0.55s (all clicked) stay apart


def test_drift_in_the_window_fires(tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    write_log(log_dir, "candidates", candidates(3_000, shift=1.5, start=START))
    rules = [r for r in DEFAULT_RULES if "drift" in r.name]
    result = run_monitor(log_dir, profile(), start=START, end=END, rules=rules)
    assert {a.rule.name for a in result.fired} == {"feature drift", "prediction drift"}
    assert result.drift is not None
    assert result.drift.ranked()[0].name == "events_7d"
    no_data = [o.rule.metric for o in run_monitor(
        log_dir, profile(), start=START, end=END, rules=DEFAULT_RULES).outcomes
        if o.status == "no data"]  # fmt: skip
    assert set(no_data) == {"latency_p99_ms", "error_rate", "fallback_rate", "ctr_drop"}


def test_empty_log_is_no_data_not_an_error(tmp_path: Path) -> None:
    result = run_monitor(tmp_path, profile(), start=START, end=END, rules=DEFAULT_RULES)
    assert result.metrics == {}
    assert result.drift is None
    assert {o.status for o in result.outcomes} == {"no data"}
    with pytest.raises(ValueError, match="not before"):
        run_monitor(tmp_path, profile(), start=END, end=START, rules=())


def clicked_every_other(
    log_dir: Path, *, delay_s: float, now: datetime, start: datetime = START
) -> None:
    """An exposure every 6 s over the hour from ``start``; every other one clicked ``delay_s``
    later, of which only the clicks before ``now`` are in the log (the rest have not happened
    yet)."""
    shown = [start + timedelta(seconds=6 * i) for i in range(600)]
    write_log(
        log_dir,
        "exposures",
        pd.DataFrame({"request_id": [f"r{i}" for i in range(600)], "ts": shown, "position": 0}),
    )
    clicks = [
        (f"r{i}", ts + timedelta(seconds=delay_s))
        for i, ts in enumerate(shown)
        if i % 2 == 0 and ts + timedelta(seconds=delay_s) < now
    ]
    write_log(
        log_dir,
        "feedback",
        pd.DataFrame(
            {"request_id": [r for r, _ in clicks], "ts": [t for _, t in clicks], "event": "click"}
        ),
    )


def test_label_metrics_wait_for_the_clicks(tmp_path: Path) -> None:
    """At the window's end, the last 4 minutes' clicks have not come: read whole, the CTR is
    0.5 * 56/60; read up to ``now - label_delay_s`` it is the true 0.5."""
    clicked_every_other(tmp_path, delay_s=240, now=END)

    def ctr(**kwargs: Any) -> Any:
        result = run_monitor(tmp_path, profile(), start=START, end=END, rules=(), **kwargs)
        return result.metrics.get("ctr"), result

    assert ctr(now=END, label_delay_s=0)[0] == pytest.approx(0.5 * 56 / 60)
    value, result = ctr(now=END, label_delay_s=300)
    assert value == pytest.approx(0.5)
    assert result.labels_end == END - timedelta(seconds=300)
    assert result.to_dict()["labels_end"] == (END - timedelta(seconds=300)).isoformat()
    assert result.counts["exposures"] == 600  # the counts still cover the whole window
    _, html = write_report(result, tmp_path / "report")
    assert 'id="labels-end"' in html.read_text()
    # a window younger than the delay has no label metrics, so a CTR rule has no data
    young = run_monitor(
        tmp_path, profile(), start=START, end=END, now=START + timedelta(seconds=200),
        rules=[AlertRule("ctr low", "ctr", "<", 0.9)],
    )  # fmt: skip
    assert "ctr" not in young.metrics
    assert [o.status for o in young.outcomes] == ["no data"]
    with pytest.raises(ValueError, match="label_delay_s"):
        run_monitor(tmp_path, profile(), start=START, end=END, rules=(), label_delay_s=-1)


def test_a_window_in_the_past_is_read_whole(tmp_path: Path) -> None:
    clicked_every_other(tmp_path, delay_s=240, now=END + timedelta(hours=1))
    result = run_monitor(tmp_path, profile(), start=START, end=END, rules=())
    assert result.metrics["ctr"] == pytest.approx(0.5)  # the clock is far past END + delay
    assert result.labels_end == END


def test_a_rule_with_its_own_window(log_dir: Path) -> None:
    late = END + timedelta(hours=3)  # the default window [late - 1h, late) is empty
    rules = [
        AlertRule("errors now", "error_rate", ">", 0.01),
        AlertRule("errors today", "error_rate", ">", 0.01, window="1d"),
    ]
    result = run_monitor(log_dir, profile(), start=late - timedelta(hours=1), end=late, rules=rules)
    assert [o.status for o in result.outcomes] == ["no data", "fired"]
    assert result.window_metrics["1d"]["error_rate"] == pytest.approx(0.02)


def test_report_files(log_dir: Path, tmp_path: Path) -> None:
    result = run_monitor(
        log_dir, profile(), start=START, end=END, rules=DEFAULT_RULES, reference_ctr=0.1
    )
    json_path, html_path = write_report(result, tmp_path / "out")
    saved = json.loads(json_path.read_text())
    assert saved["fired"] == ["error rate", "ctr drop"]
    assert saved["metrics"]["ctr"] == pytest.approx(0.03)
    assert [f["name"] for f in saved["drift"]["features"]] == ["events_7d", "category"]
    html = html_path.read_text()
    assert html.count("data:image/png;base64,") == 3  # 2 features + the prediction
    assert "ctr drop" in html
    assert "events_7d" in html


@pytest.mark.slow
def test_drift_alert_on_the_simulated_world(tmp_path: Path) -> None:
    """bench/drift.py's protocol on 2 seeds: the alert fires in the first window after an
    injected drift, and not in the same window of the world without drift."""
    bench = importlib.import_module("bench.drift")  # bench/ is scripts, not a typed package
    for seed in (0, 1):
        drifted = bench.run_world(seed, drift=True, size=bench.WorldSize(), root=tmp_path)
        stable = bench.run_world(seed, drift=False, size=bench.WorldSize(), root=tmp_path)
        assert drifted["fired"], drifted
        assert drifted["most_drifted"] == "category_affinity"  # tastes moved off the history
        assert not stable["fired"], stable
        assert stable["feature_psi_max"] < drifted["feature_psi_max"] / 2


def test_ctr_drop_needs_a_served_reference_ctr(log_dir: Path) -> None:
    # The profile's ctr is the candidates' base rate, another scale than served lists' CTR:
    # without a served reference there is no ctr_drop, so its rule reports no data.
    result = run_monitor(log_dir, profile(), start=START, end=END, rules=DEFAULT_RULES)
    assert "ctr_drop" not in result.metrics
    assert result.metrics["ctr"] == pytest.approx(0.03)
    assert "ctr drop" not in {a.rule.name for a in result.fired}
    with pytest.raises(ValueError, match="reference_ctr"):
        run_monitor(log_dir, profile(), start=START, end=END, rules=(), reference_ctr=2.0)


def test_one_duckdb_thread_gives_the_same_result(log_dir: Path) -> None:
    # The service's own monitor runs on one thread, leaving the other core to requests.
    many = run_monitor(log_dir, profile(), start=START, end=END, rules=DEFAULT_RULES)
    one = run_monitor(log_dir, profile(), start=START, end=END, rules=DEFAULT_RULES, threads=1)
    assert one.metrics == pytest.approx(many.metrics)
    assert one.counts == many.counts


def test_only_the_profiled_model_versions_rows_are_compared(tmp_path: Path) -> None:
    """After a promotion (or in an experiment) the window holds two models' candidate rows;
    the other model's drifted rows must not be compared with this model's profile."""
    ours = candidates(2_000, shift=0.0, start=START).assign(model_version="ours")
    theirs = candidates(2_000, shift=5.0, start=START, seed=2).assign(model_version="theirs")
    write_log(tmp_path, "candidates", pd.concat([ours, theirs], ignore_index=True))
    ref = profile()

    def measure(version: str | None) -> Any:
        return run_monitor(
            tmp_path, ref, start=START, end=END, rules=DEFAULT_RULES, model_version=version
        )

    mixed, only = measure(None), measure("ours")
    assert mixed.metrics["prediction_psi"] > 0.2  # every row: the other model's drift shows
    assert only.metrics["prediction_psi"] < 0.1
    assert only.metrics["feature_psi_max"] < 0.1
    assert only.drift is not None
    assert only.drift.prediction is not None
    assert only.drift.prediction.n_live == 2_000
    assert only.model_version == "ours"
    assert only.to_dict()["model_version"] == "ours"
    assert only.counts["candidates"] == 4_000  # the window's rows, counted as before

    none = measure("neither")
    assert none.drift is None
    assert "prediction_psi" not in none.metrics


def test_profile_model_version_reads_the_model_json_next_to_it(tmp_path: Path) -> None:
    from mlsd.monitoring.monitor import profile_model_version

    path = tmp_path / "reference_profile.json"
    assert profile_model_version(path) is None
    (tmp_path / "model.json").write_text(json.dumps({"version": "abc-123"}))
    assert profile_model_version(path) == "abc-123"


def test_a_window_of_few_requests_is_not_judged(tmp_path: Path) -> None:
    """3,000 drifted candidate rows of only 20 requests are 20 samples: the drift rules say
    "no data" and the report says why; with a minimum of 20 they fire."""
    rows = candidates(3_000, shift=1.5, start=START)
    rows["request_id"] = [f"r{i % 20}" for i in range(3_000)]
    write_log(tmp_path / "log", "candidates", rows)
    rules = [r for r in DEFAULT_RULES if "drift" in r.name]
    result = run_monitor(tmp_path / "log", profile(), start=START, end=END, rules=rules)
    assert [o.status for o in result.outcomes] == ["no data", "no data"]
    assert result.drift is not None
    assert (result.drift.n_requests, result.drift.min_requests) == (20, 100)
    assert result.metrics["n_missing_features"] == 0
    _, html_path = write_report(result, tmp_path / "out")
    assert "drift not judged: 20 sampled requests" in html_path.read_text()
    judged = run_monitor(
        tmp_path / "log", profile(), start=START, end=END, rules=rules, min_drift_requests=20
    )
    assert {a.rule.name for a in judged.fired} == {"feature drift", "prediction drift"}
    assert "drift not judged" not in write_report(judged, tmp_path / "out2")[1].read_text()


def test_a_feature_the_service_stops_filling_fires(tmp_path: Path) -> None:
    """A logged feature that is NaN in 60% of rows and null in the rest: every row is in the
    missing bin, so its PSI is large, the drift rule fires and its histogram is drawn."""
    rows = candidates(3_000, shift=0.0, start=START)
    rows["f_events_7d"] = [math.nan if i % 5 < 3 else None for i in range(3_000)]
    write_log(tmp_path / "log", "candidates", rows)
    rules = [r for r in DEFAULT_RULES if "drift" in r.name]
    result = run_monitor(tmp_path / "log", profile(), start=START, end=END, rules=rules)
    assert {a.rule.name for a in result.fired} == {"feature drift"}
    assert result.drift is not None
    row = result.drift.ranked()[0]
    assert (row.name, row.n_live, row.missing_share) == ("events_7d", 0, 1.0)
    assert row.bins[-1] == "missing"
    assert row.live_shares[-1] == 1.0
    _, html_path = write_report(result, tmp_path / "out")
    assert html_path.read_text().count("data:image/png;base64,") == 3  # events_7d drawn too
