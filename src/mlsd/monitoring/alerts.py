"""Alert rules: ``metric op threshold`` over a monitoring window, read from the system's TOML.

In ``configs/feed.toml``::

    [monitoring]
    window = "1h"                  # the default window of every rule
    min_drift_requests = 100       # fewer sampled requests: drift metrics have no data
    label_delay_s = 300            # younger exposures may still get their click: no labels yet

    [[monitoring.alerts]]
    name = "feature drift"
    metric = "feature_psi_max"     # one of METRICS
    op = ">"
    threshold = 0.25
    # window = "1d"                # this rule looks at its own window

A rule fires when its metric, computed over the window, satisfies ``op threshold``. A metric
with no data in the window (no labels yet, so no CTR; no traffic, so no latency) never fires:
its outcome says ``"no data"``, because an alert on an absent number would page people for a
quiet night, and a missing log is what the ``missing`` list of the drift report is for (and
``n_missing_features`` its alertable count). The PSI and KS metrics have no data either in a
window of fewer than ``min_drift_requests`` sampled requests, whose drift statistics are noise
(see :mod:`mlsd.monitoring.drift`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

Op = Literal[">", "<"]
Status = Literal["fired", "ok", "no data"]

METRICS: dict[str, str] = {
    "feature_psi_max": "largest PSI over the monitored features (time-trending ones apart)",
    "n_drifted_features": "features whose PSI exceeds the drift threshold",
    "trending_psi_max": "largest PSI over the features that moved with time in the reference",
    "ks_pvalue_min": (
        "smallest Kolmogorov–Smirnov p-value over the numeric features (time-trending ones apart)"
    ),
    "n_missing_features": "profiled feature columns absent from the logged candidate rows",
    "prediction_psi": "PSI of the ranker's score",
    "prediction_ks_pvalue": "Kolmogorov–Smirnov p-value of the ranker's score",
    "latency_p99_ms": "99th percentile of request latency, ms",
    "error_rate": "share of requests answered with status >= 500",
    "fallback_rate": "share of requests that used at least one fallback",
    "ctr": "clicks per exposure",
    "ctr_drop": "relative CTR drop vs the reference CTR: 1 - ctr / reference ctr",
    "ndcg_at_10": "NDCG@10 of the served lists against clicks (requests with a click)",
    "ece": "expected calibration error of the served score against clicks",
}
"""Metric name → meaning; what a rule may name (and what the monitor reports)."""

_WINDOW = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3_600, "d": 86_400, "w": 604_800}


def parse_window(text: str) -> timedelta:
    """``"90s"``, ``"30m"``, ``"1h"``, ``"1d"``, ``"1w"`` → a positive timedelta."""
    match = _WINDOW.match(text) if isinstance(text, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"window {text!r}: expected a positive duration such as 30m, 1h or 1d")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


@dataclass(frozen=True)
class AlertRule:
    """Fire when ``metric op threshold`` over ``window`` (``None``: the section's window)."""

    name: str
    metric: str
    op: Op
    threshold: float
    window: str | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric {self.metric!r} is unknown; choose from {', '.join(METRICS)}")
        if self.op not in (">", "<"):
            raise ValueError(f"op {self.op!r}: expected '>' or '<'")
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold {self.threshold!r}: expected a finite number")
        if self.window is not None:
            parse_window(self.window)

    def breached(self, value: float) -> bool:
        return value > self.threshold if self.op == ">" else value < self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "metric": self.metric,
            "op": self.op,
            "threshold": self.threshold,
            "window": self.window,
        }


DEFAULT_RULES = (
    AlertRule("feature drift", "feature_psi_max", ">", 0.25),
    AlertRule("prediction drift", "prediction_psi", ">", 0.25),
    AlertRule("p99 latency", "latency_p99_ms", ">", 250.0),
    AlertRule("error rate", "error_rate", ">", 0.01),
    AlertRule("fallback rate", "fallback_rate", ">", 0.05),
    AlertRule("ctr drop", "ctr_drop", ">", 0.2),
)
"""PSI above 0.25 is the textbook "major shift"; 250 ms is a feed's usual p99 budget; 1% errors
and 5% degraded answers are worth a page. A 20% relative CTR drop is a feed's traffic's rule: an
hour's CTR of 0.05 over ``n`` independent exposures has a relative standard error of
``√((1 − 0.05) / (0.05 n))``, so 20% is 6.5 standard errors at 20,000 exposures an hour but 2.5
at 3,000, where an unchanged CTR breaches it about once a week of hourly runs, more often when a
user's clicks correlate (the design effect of :mod:`mlsd.evaluation.experiment_stats`). Smaller
traffic raises the threshold or lengthens the rule's window. Systems override them in
``[[monitoring.alerts]]``."""

_RULE_KEYS = ("name", "metric", "op", "threshold", "window")
_SECTION_KEYS = (
    "window", "psi_threshold", "min_drift_requests", "reference_ctr", "label_delay_s", "alerts",
)  # fmt: skip
MIN_DRIFT_REQUESTS = 100
"""The default ``[monitoring].min_drift_requests`` and of :func:`mlsd.monitoring.drift.compare`
(defined here, where the config reads it, so that reading a config needs no scipy)."""
DEFAULT_LABEL_DELAY_S = 300.0
"""The default ``[monitoring].label_delay_s``: exposures younger than this at a monitoring run
are left out of its label metrics, since their clicks may not have come yet (see
:mod:`mlsd.monitoring.monitor`). Five minutes covers most clicks on a feed; a system whose
users act later (a purchase, a rating) sets more."""


@dataclass(frozen=True)
class MonitoringSection:
    """``[monitoring]``: the default window and the alert rules (:data:`DEFAULT_RULES` if none)."""

    window: str = "1h"
    alerts: tuple[AlertRule, ...] = DEFAULT_RULES
    psi_threshold: float = 0.25
    reference_ctr: float | None = None
    """The served CTR of a known-good period, what ``ctr_drop`` compares with (``None``: the
    ``ctr_drop`` rule has no data)."""
    min_drift_requests: int = MIN_DRIFT_REQUESTS
    """The fewest distinct sampled requests in a window whose PSI and KS are judged (fewer:
    their metrics have no data; :func:`mlsd.monitoring.drift.compare`'s ``min_requests``)."""
    label_delay_s: float = DEFAULT_LABEL_DELAY_S
    """Exposures younger than this at a run are left out of the label metrics (CTR, NDCG,
    ECE): their clicks may not have come yet."""

    def __post_init__(self) -> None:
        parse_window(self.window)
        if isinstance(self.label_delay_s, bool) or not self.label_delay_s >= 0:
            raise ValueError(
                f"[monitoring].label_delay_s must be a number of seconds >= 0, "
                f"got {self.label_delay_s!r}"
            )
        _check_min_requests(self.min_drift_requests, "[monitoring].min_drift_requests")
        check_psi_threshold(self.psi_threshold, "[monitoring].psi_threshold")
        if self.reference_ctr is not None and not 0.0 < self.reference_ctr <= 1.0:
            raise ValueError(
                f"[monitoring].reference_ctr must be in (0, 1], got {self.reference_ctr}"
            )

    @property
    def window_delta(self) -> timedelta:
        return parse_window(self.window)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], *, where: str) -> MonitoringSection:
        """Build from the ``[monitoring]`` TOML table; errors name ``where`` and the key.

        Args:
            raw: the table (``window``, ``psi_threshold``, ``min_drift_requests``,
                ``reference_ctr``, ``alerts``: a list of tables).
            where: the file the table came from, e.g. ``"configs/feed.toml"``.
        """
        unknown = sorted(set(raw) - set(_SECTION_KEYS))
        if unknown:
            raise ValueError(
                f"{where}: [monitoring] has unknown key(s) {', '.join(unknown)}; "
                f"known keys: {', '.join(_SECTION_KEYS)}"
            )
        min_requests = raw.get("min_drift_requests", cls.min_drift_requests)
        _check_min_requests(min_requests, f"{where}: [monitoring].min_drift_requests")
        reference_ctr = raw.get("reference_ctr")
        if reference_ctr is not None and (
            isinstance(reference_ctr, bool)
            or not isinstance(reference_ctr, int | float)
            or not 0.0 < reference_ctr <= 1.0
        ):
            raise ValueError(
                f"{where}: [monitoring].reference_ctr: expected a CTR in (0, 1], "
                f"got {reference_ctr!r}"
            )
        ctr = None if reference_ctr is None else float(reference_ctr)
        window = raw.get("window", cls.window)
        try:
            parse_window(window)
        except ValueError as exc:
            raise ValueError(f"{where}: [monitoring].window: {exc}") from exc
        psi_threshold = raw.get("psi_threshold", cls.psi_threshold)
        check_psi_threshold(psi_threshold, f"{where}: [monitoring].psi_threshold")
        delay = raw.get("label_delay_s", cls.label_delay_s)
        if isinstance(delay, bool) or not isinstance(delay, int | float) or not delay >= 0:
            raise ValueError(
                f"{where}: [monitoring].label_delay_s: expected seconds >= 0, got {delay!r}"
            )
        settings: dict[str, Any] = {
            "window": window,
            "label_delay_s": float(delay),
            "psi_threshold": float(psi_threshold),
            "reference_ctr": ctr,
            "min_drift_requests": min_requests,
        }
        alerts = raw.get("alerts")
        if alerts is None:
            return cls(**settings)
        if not isinstance(alerts, list):
            raise ValueError(
                f"{where}: [monitoring].alerts must be [[monitoring.alerts]] tables, got {alerts!r}"
            )
        rules = tuple(
            _rule(entry, f"{where}: [[monitoring.alerts]] #{i + 1}")
            for i, entry in enumerate(alerts)
        )
        names = [r.name for r in rules]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"{where}: [[monitoring.alerts]] names {duplicates} more than once")
        return cls(alerts=rules, **settings)


def _check_min_requests(value: Any, where: str) -> None:
    """A ValueError naming ``where`` unless ``value`` is an integer >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: expected an integer >= 1, got {value!r}")


def check_psi_threshold(value: Any, where: str) -> None:
    """A ValueError naming ``where`` unless ``value`` is a finite number > 0 (not a bool): NaN
    would flag no feature, and 0 or less every one."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (value > 0 and math.isfinite(value))
    ):
        raise ValueError(f"{where}: expected a PSI > 0 such as 0.25, got {value!r}")


def _rule(entry: Any, where: str) -> AlertRule:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a table, got {entry!r}")
    unknown = sorted(set(entry) - set(_RULE_KEYS))
    missing = [k for k in ("name", "metric", "op", "threshold") if k not in entry]
    if unknown or missing:
        raise ValueError(
            f"{where}: unknown key(s) {unknown} / missing key(s) {missing}; "
            f"a rule has {', '.join(_RULE_KEYS)} (window optional)"
        )
    where = f"{where} ({entry['name']!r})"
    for key, kinds in (("name", str), ("metric", str), ("op", str), ("window", str)):
        value = entry.get(key)
        if value is not None and not isinstance(value, kinds):
            raise ValueError(f"{where}.{key}: expected a string, got {value!r}")
    threshold = entry["threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise ValueError(f"{where}.threshold: expected a number, got {threshold!r}")
    try:
        return AlertRule(
            name=entry["name"],
            metric=entry["metric"],
            op=entry["op"],
            threshold=float(threshold),
            window=entry.get("window"),
        )
    except ValueError as exc:
        key = next(
            (k for k in ("metric", "op", "threshold", "window") if str(exc).startswith(k)), "rule"
        )
        raise ValueError(f"{where}.{key}: {exc}") from exc


@dataclass(frozen=True)
class RuleOutcome:
    """One rule checked against one window's metrics; ``value`` is ``None`` with no data."""

    rule: AlertRule
    value: float | None
    status: Status

    @property
    def fired(self) -> bool:
        return self.status == "fired"

    def to_dict(self) -> dict[str, Any]:
        return {**self.rule.to_dict(), "value": self.value, "status": self.status}


@dataclass(frozen=True)
class FiredAlert:
    """A rule that fired, with the value that breached its threshold."""

    rule: AlertRule
    value: float

    def describe(self) -> str:
        r = self.rule
        return f"{r.name}: {r.metric} = {self.value:.4g} {r.op} {r.threshold:g}"


def check(rules: Sequence[AlertRule], metrics: Mapping[str, float]) -> list[RuleOutcome]:
    """Every rule's outcome: ``"fired"``, ``"ok"``, or ``"no data"`` (metric absent or NaN)."""
    outcomes = []
    for rule in rules:
        value = metrics.get(rule.metric)
        if value is None or not math.isfinite(value):
            outcomes.append(RuleOutcome(rule, None, "no data"))
        else:
            status: Status = "fired" if rule.breached(float(value)) else "ok"
            outcomes.append(RuleOutcome(rule, float(value), status))
    return outcomes


def evaluate(rules: Sequence[AlertRule], metrics: Mapping[str, float]) -> list[FiredAlert]:
    """The rules that fire on ``metrics`` (a metric without data never fires)."""
    return [
        FiredAlert(o.rule, o.value)
        for o in check(rules, metrics)
        if o.fired and o.value is not None
    ]
