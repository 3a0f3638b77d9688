"""Drift-detection evaluation: does the drift alert fire in the first monitoring window after drift?

For each seed, two simulated worlds that are identical until ``drift_at`` (2024-01-15, a
Monday): one whose users' tastes drift then (``drift_kind="tastes"``) and one without drift.
In each world:

1. The ranker rows of every view are computed by the project's point-in-time batch feature
   code (:func:`mlsd.features.batch.training_features`, the code training and serving share),
   as of the view's time, from events strictly before it.
2. The reference window is the week before the drift, ``[Jan 8, Jan 15)`` (a full week, so
   weekday effects are in the reference; features with 7-day windows are warm after Jan 8).
   A fixed model, a logistic regression fitted on the reference rows' clicks, gives the
   "prediction"; the reference profile is built from the reference rows and their scores.
3. The monitored window is the first day after ``drift_at``, ``[Jan 15, Jan 16)``: its rows
   and scores are written as the service log's ``candidates`` table and
   :func:`mlsd.monitoring.monitor.run_monitor` checks the rules
   ``feature_psi_max > T`` and ``prediction_psi > T``.

The monitored features are the stationary ones a ranker reads (counts over 1/7-day windows,
recency, session, category affinity, hour, user attributes, item category); features that
grow with the age of the log by construction (``item_age_days``, epoch timestamps, 30-day
counts in a 20-day log) or that a one-day window cannot match (``day_of_week``) are left out,
as a production profile would leave them out or compare them by weekday.

The threshold T is chosen on calibration seeds (1000+) that are not among the evaluated ones
(0..19): ``--calibrate`` prints, per calibration seed, the largest PSI without drift and with it.

    .venv/bin/python bench/drift.py                 # 20 seeds, with and without drift
    .venv/bin/python bench/drift.py --calibrate     # the PSI distribution on seeds 1000..1009

Prints one JSON document; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mlsd.data.schema import EVENTS_FILE
from mlsd.data.sources.synthetic import WorldConfig, synthesize
from mlsd.features.batch import feature_config_for, training_features
from mlsd.monitoring.alerts import AlertRule
from mlsd.monitoring.monitor import run_monitor
from mlsd.monitoring.profile import ReferenceProfile

DRIFT_AT = "2024-01-15"
REFERENCE = (datetime(2024, 1, 8, tzinfo=UTC), datetime(2024, 1, 15, tzinfo=UTC))
WINDOW = (datetime(2024, 1, 15, tzinfo=UTC), datetime(2024, 1, 16, tzinfo=UTC))
NUMERIC = (
    "events_1d", "events_7d", "session_events", "item_events_1d", "item_events_7d",
    "seconds_since_last_event", "session_events_now", "category_affinity", "seen_recently",
    "hour_of_day",
)  # fmt: skip
CATEGORICAL = ("category", "age_bucket", "gender", "occupation", "region")
THRESHOLD = 0.25
"""PSI threshold of both rules, chosen on the calibration seeds 1000..1009 (``--calibrate``):
the largest feature PSI in the first day was 0.026-0.166 without drift (item popularity moves
slowly in the world) and 0.34-0.45 with it (always ``category_affinity``: users now view
categories their history does not predict). 0.25 lies between, near the log-midpoint 0.24, and is
the textbook "major shift" PSI."""
EVAL_SEEDS = tuple(range(20))
CALIBRATION_SEEDS = tuple(range(1000, 1010))


@dataclass(frozen=True)
class WorldSize:
    n_users: int = 2_000
    n_items: int = 500
    n_events: int = 150_000
    days: int = 20


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def world(seed: int, *, drift: bool, size: WorldSize, root: Path) -> Path:
    """Synthesize one world into ``root`` and return its contract directory."""
    config = WorldConfig(
        n_users=size.n_users,
        n_items=size.n_items,
        n_events=size.n_events,
        days=size.days,
        seed=seed,
        start="2024-01-01",
        drift_at=DRIFT_AT if drift else None,
        drift_kind="tastes",
    )
    out = root / f"world-{seed}-{'drift' if drift else 'stable'}"
    synthesize(config, out, progress=False)
    return out


def ranker_rows(dataset: Path) -> pd.DataFrame:
    """Every view in the reference and monitored windows with its click label and features."""
    events = pd.read_parquet(dataset / EVENTS_FILE)
    events["ts"] = pd.to_datetime(events["ts"], utc=True)
    clicks = events.loc[events["event"] == "click", ["session_id", "position"]]
    views = events[(events["event"] == "view") & events["ts"].between(REFERENCE[0], WINDOW[1])]
    views = views.merge(clicks.assign(click=1.0).drop_duplicates(), how="left")
    rows = pd.DataFrame(
        {
            "user_id": views["user_id"].to_numpy(),
            "item_id": views["item_id"].to_numpy(),
            "label_ts": views["ts"].dt.tz_convert(None).to_numpy(),
            "click": views["click"].fillna(0.0).to_numpy(),
        }
    )
    config = feature_config_for(dataset, windows_days=(1, 7))
    return training_features(dataset, rows, config, progress=False)


def encode(frame: pd.DataFrame, vocabulary: dict[str, dict[str, int]]) -> pd.DataFrame:
    """Numeric columns as float64, categorical ones as int codes (0 = unseen)."""
    out = pd.DataFrame({c: frame[c].to_numpy(np.float64) for c in NUMERIC})
    for column in CATEGORICAL:
        values = frame[column].astype(str)
        out[column] = values.map(vocabulary[column]).fillna(0).astype(np.int64).to_numpy()
    return out


def fit_model(features: pd.DataFrame, clicks: np.ndarray) -> Any:
    """The fixed model whose scores are monitored: LR on log1p numerics + category one-hot."""
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    model.fit(design(features), clicks)
    return model


def design(features: pd.DataFrame) -> np.ndarray:
    numeric = np.log1p(np.maximum(features[list(NUMERIC)].to_numpy(np.float64), 0.0))
    categories = np.eye(32)[np.minimum(features["category"].to_numpy(), 31)]
    return np.hstack([numeric, categories])


def write_candidates(log_dir: Path, frame: pd.DataFrame, scores: np.ndarray, ts: pd.Series) -> None:
    """The monitored rows as the service log's ``candidates`` table (the log contract's layout)."""
    columns: dict[str, Any] = {
        "request_id": pa.array([f"r{i}" for i in range(len(frame))]),
        "ts": pa.array(pd.to_datetime(ts, utc=True), pa.timestamp("us", tz="UTC")),
        "user_id": pa.array(np.zeros(len(frame), dtype=np.int64)),
        "item_id": pa.array(np.zeros(len(frame), dtype=np.int64)),
        "model_version": pa.array(["lr:reference"] * len(frame)),
        "score": pa.array(scores.astype(np.float32)),
    }
    for c in NUMERIC:
        columns[f"f_{c}"] = pa.array(frame[c].to_numpy(np.float32))
    for c in CATEGORICAL:
        columns[f"c_{c}"] = pa.array(frame[c].to_numpy(np.int32))
    directory = log_dir / "candidates" / f"date={WINDOW[0]:%Y-%m-%d}"
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), directory / "part-0-bench.parquet")


def run_world(seed: int, *, drift: bool, size: WorldSize, root: Path) -> dict[str, Any]:
    """One world: profile on the reference week, monitor the first day after drift_at."""
    began = time.perf_counter()
    dataset = world(seed, drift=drift, size=size, root=root)
    rows = ranker_rows(dataset)
    in_reference = rows["label_ts"] < pd.Timestamp(REFERENCE[1]).tz_localize(None)
    reference, live = rows[in_reference], rows[~in_reference]
    vocabulary = {
        c: {v: i + 1 for i, v in enumerate(sorted(reference[c].astype(str).unique()))}
        for c in CATEGORICAL
    }
    ref_features, live_features = encode(reference, vocabulary), encode(live, vocabulary)
    model = fit_model(ref_features, reference["click"].to_numpy())
    ref_scores = model.predict_proba(design(ref_features))[:, 1]
    live_scores = model.predict_proba(design(live_features))[:, 1]
    profile = ReferenceProfile.build(
        ref_features,
        ref_scores,
        numeric=NUMERIC,
        categorical=CATEGORICAL,
        label_metrics={"ctr": float(reference["click"].mean())},
        seed=seed,
    )
    log_dir = root / f"log-{seed}-{drift}"
    write_candidates(log_dir, live_features, live_scores, live["label_ts"])
    rules = [
        AlertRule("feature drift", "feature_psi_max", ">", THRESHOLD),
        AlertRule("prediction drift", "prediction_psi", ">", THRESHOLD),
    ]
    result = run_monitor(log_dir, profile, start=WINDOW[0], end=WINDOW[1], rules=rules)
    assert result.drift is not None
    top = result.drift.ranked()[0]
    shutil.rmtree(dataset)
    shutil.rmtree(log_dir)
    return {
        "seed": seed,
        "drift": drift,
        "fired": [a.rule.name for a in result.fired],
        "feature_psi_max": round(result.metrics["feature_psi_max"], 4),
        "most_drifted": top.name,
        "prediction_psi": round(result.metrics["prediction_psi"], 4),
        "reference_rows": len(reference),
        "window_rows": result.counts["candidates"],
        "seconds": round(time.perf_counter() - began, 2),
    }


def evaluate(seeds: tuple[int, ...], *, size: WorldSize) -> dict[str, Any]:
    """Fire rates with and without drift over ``seeds``, with per-seed detail."""
    began = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {"drift": [], "no_drift": []}
    with tempfile.TemporaryDirectory(prefix="mlsd-drift-") as tmp:
        for seed in seeds:
            for drift in (True, False):
                run = run_world(seed, drift=drift, size=size, root=Path(tmp))
                runs["drift" if drift else "no_drift"].append(run)
                log(f"seed {seed} drift={drift}: fired={run['fired']} "
                    f"psi={run['feature_psi_max']} ({run['most_drifted']}) "
                    f"pred={run['prediction_psi']} {run['seconds']} s")  # fmt: skip
    fired = {key: sum(bool(r["fired"]) for r in value) for key, value in runs.items()}
    return {
        "seeds": list(seeds),
        "fired_with_drift": f"{fired['drift']}/{len(seeds)}",
        "fired_without_drift": f"{fired['no_drift']}/{len(seeds)}",
        "targets": {"with_drift": ">= 19/20", "without_drift": "<= 1/20"},
        "met": fired["drift"] >= 0.95 * len(seeds) and fired["no_drift"] <= 0.05 * len(seeds),
        "runs": runs,
        "wall_seconds": round(time.perf_counter() - began, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibrate", action="store_true", help="Seeds 1000..1009 instead.")
    parser.add_argument("--seeds", type=int, default=len(EVAL_SEEDS), help="Evaluated seeds.")
    args = parser.parse_args()
    seeds = CALIBRATION_SEEDS if args.calibrate else EVAL_SEEDS[: args.seeds]
    size = WorldSize()
    report = evaluate(seeds, size=size)
    report = {
        "benchmark": "drift detection",
        "mode": "calibration" if args.calibrate else "evaluation",
        "world": vars(size) | {"drift_at": DRIFT_AT, "drift_kind": "tastes"},
        "reference_window": [t.isoformat() for t in REFERENCE],
        "monitored_window": [t.isoformat() for t in WINDOW],
        "rules": [f"feature_psi_max > {THRESHOLD}", f"prediction_psi > {THRESHOLD}"],
        **report,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
