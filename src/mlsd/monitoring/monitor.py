"""One monitoring run: a window of the service log against the reference profile, then the alerts.

What is read (the log layout is :mod:`mlsd.monitoring.logs`'s:
``<log_dir>/<table>/date=YYYY-MM-DD/part-*.parquet``), all through DuckDB so that nothing of
size "exposures" ever becomes a Python object:

- ``candidates`` (sampled ranker inputs): feature and prediction drift. The window's rows are
  counted, and a seeded reservoir sample of at most ``max_candidate_rows`` (50k) is compared
  with the profile (:func:`mlsd.monitoring.drift.compare`); at 50k rows the PSI and KS
  estimates are within a few thousandths of the full-window values. With a
  ``model_version`` (that of the model whose profile is used, see
  :func:`profile_model_version`), only that version's rows are sampled: after a promotion
  or a rollback the window holds the previous model's rows too, and in an experiment the
  other arm's, and neither is described by this profile. The sample's distinct
  ``request_id`` values are its effective size (a request's candidates share its user's
  features): below ``min_drift_requests`` (100) the drift table is still shown, but no feature
  is drifted and the PSI/KS metrics have no data (:mod:`mlsd.monitoring.drift`).
- ``requests``: ``latency_p99_ms``, ``error_rate`` (status >= 500), ``fallback_rate`` (a
  fallback used, or a ``fallback:`` path).
- ``exposures`` + ``feedback``: the label metrics, once labels exist, i.e. once the window
  has any feedback row. An exposure is clicked when a ``click`` has its ``(request_id,
  item_id)``, or, for a click without a request id, when it is the latest exposure of the same
  ``(user_id, item_id)`` at most ``attribution_window_s`` before the click (an ASOF join; the
  attribution of ``mlsd feed logs``, defined once by
  :func:`mlsd.monitoring.log_reader.create_log_views`). Then ``ctr`` and ``ctr_drop`` (``1 - ctr /
  reference_ctr``; only with a ``reference_ctr``: the CTR of served lists in a period known to
  be good, e.g. the champion's first day from ``mlsd feed logs``. The profile's ``ctr`` is the
  base rate of the ranker's candidates, a different scale: served lists are the top of the
  candidates, and clicks there also depend on position),
  ``ndcg_at_10`` of each served list against its clicks (mean over requests with at
  least one click: a list with no click has no ideal ordering) and ``ece`` of the served score
  against clicks (10 equal-width bins, a score on an edge in the lower one, as in the profile's
  ``ece``; only when every score lies in [0, 1], i.e. the service serves calibrated
  probabilities).

A window is ``[start, end)``; clicks are looked for up to ``attribution_window_s`` after
``end``. A rule with its own ``window`` is checked on ``[end - window, end)``.

**Labels need time.** An exposure shown a minute before the run has not had its click yet, so
a window ending at the present would count it as unclicked and read the CTR low (with clicks
coming ~5 minutes after their exposures, about 8% low over an hour). The label metrics
therefore read only exposures at least ``label_delay_s`` old at the run's ``now``: over
``[start, min(end, now - label_delay_s))`` (:attr:`MonitorResult.labels_end`). A window
wholly in the past is read whole; one younger than the delay has no label metrics.

:attr:`MonitorResult.metrics` is a flat ``{name: value}`` dict (names of
:data:`mlsd.monitoring.alerts.METRICS`), what a ``/metrics`` endpoint publishes as gauges.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from mlsd.monitoring.alerts import (
    DEFAULT_LABEL_DELAY_S,
    MIN_DRIFT_REQUESTS,
    AlertRule,
    FiredAlert,
    RuleOutcome,
    check,
    parse_window,
)
from mlsd.monitoring.drift import PSI_MAJOR, DriftReport, compare
from mlsd.monitoring.log_reader import (
    ATTRIBUTED,
    DEFAULT_ATTRIBUTION_WINDOW_S,
    connect,
    create_log_views,
)
from mlsd.monitoring.logs import EXPOSURES, FEEDBACK, TABLES
from mlsd.monitoring.profile import ReferenceProfile

MAX_CANDIDATE_ROWS = 50_000
NDCG_K = 10
ECE_BINS = 10


@dataclass(frozen=True)
class MonitorResult:
    """A monitoring run.

    Attributes:
        start, end: the window ``[start, end)``, UTC.
        counts: rows of each log table in the window (``feedback`` incl. the attribution lag).
        metrics: alertable metrics that had data (see the module docstring).
        drift: the drift table; ``None`` when the window has no candidate rows (of
            ``model_version``, when given).
        model_version: the model version whose candidate rows were compared, or ``None``
            (every row of the window).
        outcomes: every rule, fired or not (``"no data"`` when its metric is absent).
        reference_metrics: the profile's training-time label metrics, for comparison.
        window_metrics: rule window (e.g. ``"1d"``) → its metrics, for rules with their own.
        seconds: wall time of the run.
        labels_end: the end of the exposures the label metrics read, ``min(end, now -
            label_delay_s)`` (see the module docstring); ``None`` means ``end``.
    """

    log_dir: str
    start: datetime
    end: datetime
    counts: Mapping[str, int]
    metrics: Mapping[str, float]
    drift: DriftReport | None
    outcomes: tuple[RuleOutcome, ...]
    reference_metrics: Mapping[str, float] = field(default_factory=dict)
    window_metrics: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    seconds: float = 0.0
    model_version: str | None = None
    labels_end: datetime | None = None

    @property
    def fired(self) -> list[FiredAlert]:
        return [
            FiredAlert(o.rule, o.value) for o in self.outcomes if o.fired and o.value is not None
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "log_dir": self.log_dir,
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "labels_end": (self.labels_end or self.end).isoformat(),
            "seconds": round(self.seconds, 3),
            "model_version": self.model_version,
            "counts": dict(self.counts),
            "metrics": dict(self.metrics),
            "reference_metrics": dict(self.reference_metrics),
            "window_metrics": {k: dict(v) for k, v in self.window_metrics.items()},
            "alerts": [o.to_dict() for o in self.outcomes],
            "fired": [o.rule.name for o in self.outcomes if o.fired],
            "drift": None if self.drift is None else self.drift.to_dict(),
        }


def run_monitor(
    log_dir: Path,
    profile: ReferenceProfile,
    *,
    start: datetime,
    end: datetime,
    rules: Sequence[AlertRule],
    psi_threshold: float = PSI_MAJOR,
    max_candidate_rows: int = MAX_CANDIDATE_ROWS,
    attribution_window_s: float = DEFAULT_ATTRIBUTION_WINDOW_S,
    seed: int = 0,
    reference_ctr: float | None = None,
    threads: int | None = None,
    model_version: str | None = None,
    min_drift_requests: int = MIN_DRIFT_REQUESTS,
    label_delay_s: float = DEFAULT_LABEL_DELAY_S,
    now: datetime | None = None,
) -> MonitorResult:
    """Compute the window's metrics from the log, compare with ``profile``, check ``rules``.

    Args:
        log_dir: the service log root (a missing table means no data, not an error).
        start, end: the window ``[start, end)``; naive datetimes are UTC.
        rules: alert rules; one with its own ``window`` looks at ``[end - window, end)``.
        reference_ctr: the served CTR ``ctr_drop`` is measured against (``None``: no
            ``ctr_drop``; see the module docstring).
        threads: DuckDB threads (``None``: all cores). Inside the service, 1 leaves the other
            cores to the requests.
        model_version: compare only this version's ``candidates`` rows with ``profile`` (the
            version of the model the profile was built for; ``None``: every row).
        min_drift_requests: the fewest distinct sampled requests whose drift is judged
            (``[monitoring].min_drift_requests``; fewer: the PSI/KS metrics have no data).
        label_delay_s: how old an exposure must be at ``now`` to count in the label metrics
            (``[monitoring].label_delay_s``; see the module docstring), >= 0.
        now: the time of the run (default: the clock); only the label delay reads it.
    """
    if reference_ctr is not None and not 0.0 < reference_ctr <= 1.0:
        raise ValueError(f"reference_ctr must be in (0, 1], got {reference_ctr}")
    if not label_delay_s >= 0.0:
        raise ValueError(f"label_delay_s must be >= 0, got {label_delay_s}")
    began = time.perf_counter()
    start, end = _utc(start), _utc(end)
    if not start < end:
        raise ValueError(f"monitoring window: start {start} is not before end {end}")
    labels_end = min(end, _utc(now or datetime.now(UTC)) - timedelta(seconds=label_delay_s))
    window = _Window(Path(log_dir), profile, psi_threshold, max_candidate_rows,
                     attribution_window_s, seed, reference_ctr, threads,
                     model_version, min_drift_requests, labels_end)  # fmt: skip
    counts, metrics, drift = window.measure(start, end)
    by_window: dict[str, dict[str, float]] = {}
    outcomes: list[RuleOutcome] = []
    for rule in rules:
        if rule.window is None:
            outcomes += check([rule], metrics)
            continue
        if rule.window not in by_window:
            _, by_window[rule.window], _ = window.measure(end - parse_window(rule.window), end)
        outcomes += check([rule], by_window[rule.window])
    return MonitorResult(
        log_dir=str(log_dir),
        start=start,
        end=end,
        counts=counts,
        metrics=metrics,
        drift=drift,
        outcomes=tuple(outcomes),
        reference_metrics=dict(profile.label_metrics),
        window_metrics=by_window,
        seconds=time.perf_counter() - began,
        model_version=model_version,
        labels_end=labels_end,
    )


@dataclass(frozen=True)
class _Window:
    log_dir: Path
    profile: ReferenceProfile
    psi_threshold: float
    max_candidate_rows: int
    attribution_window_s: float
    seed: int
    reference_ctr: float | None = None
    threads: int | None = None
    model_version: str | None = None
    min_drift_requests: int = MIN_DRIFT_REQUESTS
    labels_end: datetime | None = None
    """Exposures from here on are too young for the label metrics (``None``: none are)."""

    def measure(
        self, start: datetime, end: datetime
    ) -> tuple[dict[str, int], dict[str, float], DriftReport | None]:
        with connect(threads=self.threads) as con:
            present = create_log_views(
                con, self.log_dir, start, end,
                attribution_window_s=self.attribution_window_s, tables=TABLES,
            )  # fmt: skip
            counts = {
                t: _scalar(con, f"SELECT count(*) FROM {t}") if present[t] else 0 for t in TABLES
            }
            metrics: dict[str, float] = {}
            drift = None
            sample = self._sample(con) if counts["candidates"] else None
            if sample is not None and sample.num_rows:
                drift = compare(
                    self.profile,
                    sample,
                    psi_threshold=self.psi_threshold,
                    min_requests=self.min_drift_requests,
                )
                metrics.update(drift.metrics())
            if counts["requests"]:
                metrics.update(_request_metrics(con))
            if counts["exposures"] and counts["feedback"]:
                labelled = self._labelled_views(con, start, end)
                if labelled:
                    metrics.update(self._label_metrics(con))
        return counts, metrics, drift

    def _labelled_views(
        self, con: duckdb.DuckDBPyConnection, start: datetime, end: datetime
    ) -> bool:
        """Narrow the exposure views to the exposures old enough for labels; False when none
        of the window's are."""
        if self.labels_end is None or self.labels_end >= end:
            return True
        if self.labels_end <= start:
            return False
        present = create_log_views(
            con, self.log_dir, start, self.labels_end,
            attribution_window_s=self.attribution_window_s, tables=(EXPOSURES, FEEDBACK),
        )  # fmt: skip
        return (
            present[EXPOSURES]
            and present[FEEDBACK]
            and _scalar(con, "SELECT count(*) FROM exposures") > 0
        )

    def _sample(self, con: duckdb.DuckDBPyConnection) -> pa.Table:
        """A seeded reservoir sample of the window's candidate rows (of ``model_version``)."""
        where, params = "", []
        if self.model_version is not None:
            where, params = " WHERE model_version = $1", [self.model_version]
        sql = (
            f"SELECT * FROM (SELECT * FROM candidates{where}) "
            f"USING SAMPLE reservoir({int(self.max_candidate_rows)} ROWS) REPEATABLE ({self.seed})"
        )
        return con.sql(sql, params=params or None).to_arrow_table()

    def _label_metrics(self, con: duckdb.DuckDBPyConnection) -> dict[str, float]:
        con.execute(_CLICKED_SQL).fetchall()
        n, low, high = _row(con, "SELECT count(*), min(score), max(score) FROM exposures")
        clicks = _scalar(con, "SELECT count(*) FROM clicked")
        out: dict[str, float] = {"ctr": clicks / n}
        if self.reference_ctr:
            out["ctr_drop"] = 1.0 - out["ctr"] / self.reference_ctr
        per_request = con.execute(_NDCG_SQL).fetchnumpy()
        if len(per_request["dcg"]):
            out["ndcg_at_10"] = _mean_ndcg(per_request["dcg"], per_request["n_clicks"])
        if low is not None and high is not None and low >= 0.0 and high <= 1.0:
            shown = con.execute(_ECE_SQL.format(table="exposures")).fetchnumpy()
            clicked = con.execute(_ECE_SQL.format(table="clicked")).fetchnumpy()
            score_sum = np.zeros(ECE_BINS)
            score_sum[shown["bin"].astype(np.int64)] = shown["score_sum"]
            click_sum = np.zeros(ECE_BINS)
            click_sum[clicked["bin"].astype(np.int64)] = clicked["n"]
            out["ece"] = float(np.abs(score_sum - click_sum).sum() / n)
        return out


def profile_model_version(profile_path: Path) -> str | None:
    """The version of the model a reference profile belongs to: ``version`` of the
    ``model.json`` next to it (a model directory holds both), or ``None`` if there is none."""
    meta_path = Path(profile_path).parent / "model.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    version = meta.get("version") if isinstance(meta, dict) else None
    return version if isinstance(version, str) else None


def _request_metrics(con: duckdb.DuckDBPyConnection) -> dict[str, float]:
    p99, error_rate, fallback_rate = _row(con, _REQUESTS_SQL)
    return {
        "latency_p99_ms": float(p99),
        "error_rate": float(error_rate),
        "fallback_rate": float(fallback_rate),
    }


def _mean_ndcg(dcg: np.ndarray[Any, Any], n_clicks: np.ndarray[Any, Any]) -> float:
    discounts = 1.0 / np.log2(np.arange(NDCG_K) + 2.0)
    ideal = np.concatenate([[0.0], np.cumsum(discounts)])  # ideal[m]: m clicks on top
    idcg = ideal[np.minimum(n_clicks.astype(np.int64), NDCG_K)]
    return float(np.mean(dcg.astype(float) / idcg))


def _row(con: duckdb.DuckDBPyConnection, sql: str) -> tuple[Any, ...]:
    """The single row of an aggregate (fetched to the end, so the connection is free again)."""
    (row,) = con.execute(sql).fetchall()
    return tuple(row)


def _scalar(con: duckdb.DuckDBPyConnection, sql: str) -> int:
    return int(_row(con, sql)[0])


def _utc(ts: datetime) -> datetime:
    return ts.astimezone(UTC) if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


_REQUESTS_SQL = """
SELECT quantile_cont(latency_ms::DOUBLE, 0.99),
       avg(CASE WHEN status >= 500 THEN 1.0 ELSE 0.0 END),
       avg(CASE WHEN fallbacks <> '' OR starts_with(path, 'fallback:') THEN 1.0 ELSE 0.0 END)
FROM requests
"""
# The clicked exposures (a few % of the window's, attributed by the shared view). Every other
# label metric aggregates this small table or one scan of exposures, so no 10M-row join is
# materialised.
_CLICKED_SQL = f"""
CREATE OR REPLACE TEMP TABLE clicked AS
SELECT request_id, position, score::DOUBLE AS score FROM {ATTRIBUTED} WHERE clicked
"""
_NDCG_SQL = f"""
SELECT sum(CASE WHEN position < {NDCG_K} THEN 1.0 / log2(position + 2.0) ELSE 0.0 END) AS dcg,
       count(*) AS n_clicks
FROM clicked GROUP BY request_id
"""
# A score's bin is the number of interior edges below it, compared in DOUBLE with the edges of
# ``np.linspace``: exactly the bins of :func:`mlsd.evaluation.pointwise.expected_calibration_error`
# (scikit-learn's), which the profile's ``ece`` is, shown beside this one. A score on an edge
# goes to the lower bin (``floor(score * 10)`` would put 0.5 in the upper one), 0 to the first.
_ECE_BIN = " + ".join(
    f"(score::DOUBLE > {edge!r}::DOUBLE)::INTEGER"
    for edge in np.linspace(0.0, 1.0, ECE_BINS + 1)[1:-1].tolist()
)
_ECE_SQL = (
    f"SELECT {_ECE_BIN} AS bin, count(*) AS n, "
    "sum(score::DOUBLE) AS score_sum FROM {table} GROUP BY bin"
)
