"""Alert rules: evaluation, "no data", windows and the [monitoring] TOML table."""

from __future__ import annotations

import tomllib
from datetime import timedelta

import pytest

from mlsd.monitoring.alerts import (
    DEFAULT_RULES,
    AlertRule,
    MonitoringSection,
    check,
    evaluate,
    parse_window,
)


def test_rules_fire_on_their_side_of_the_threshold() -> None:
    rules = [
        AlertRule("drift", "feature_psi_max", ">", 0.2),
        AlertRule("ks", "ks_pvalue_min", "<", 0.01),
        AlertRule("ctr", "ctr_drop", ">", 0.2),
    ]
    fired = evaluate(rules, {"feature_psi_max": 0.31, "ks_pvalue_min": 0.02, "ctr_drop": 0.2})
    assert [(a.rule.name, a.value) for a in fired] == [("drift", 0.31)]  # 0.2 is not > 0.2
    assert fired[0].describe() == "drift: feature_psi_max = 0.31 > 0.2"
    assert [a.rule.name for a in evaluate(rules, {"ks_pvalue_min": 0.001})] == ["ks"]


def test_a_metric_without_data_never_fires() -> None:
    rules = [AlertRule("ctr", "ctr_drop", ">", 0.2), AlertRule("p99", "latency_p99_ms", ">", 1.0)]
    outcomes = check(rules, {"latency_p99_ms": float("nan")})
    assert [(o.status, o.value) for o in outcomes] == [("no data", None), ("no data", None)]
    assert evaluate(rules, {}) == []
    assert check(rules, {"ctr_drop": 0.1})[0].status == "ok"


def test_windows() -> None:
    assert parse_window("1h") == timedelta(hours=1)
    assert parse_window("30m") == timedelta(minutes=30)
    assert parse_window("1.5d") == timedelta(hours=36)
    for bad in ("", "1y", "-1h", "0h", "h"):
        with pytest.raises(ValueError, match="positive duration"):
            parse_window(bad)


def test_defaults_cover_every_kind_of_alert() -> None:
    section = MonitoringSection()
    assert section.window_delta == timedelta(hours=1)
    assert section.alerts == DEFAULT_RULES
    assert {r.metric for r in DEFAULT_RULES} == {
        "feature_psi_max", "prediction_psi", "latency_p99_ms", "error_rate", "fallback_rate",
        "ctr_drop",
    }  # fmt: skip


TOML = """
[monitoring]
window = "2h"

[[monitoring.alerts]]
name = "drift"
metric = "feature_psi_max"
op = ">"
threshold = 0.2

[[monitoring.alerts]]
name = "daily ctr"
metric = "ctr_drop"
op = ">"
threshold = 1
window = "1d"
"""


def test_from_toml() -> None:
    raw = tomllib.loads(TOML)["monitoring"]
    section = MonitoringSection.from_mapping(raw, where="feed.toml")
    assert section.window == "2h"
    assert section.alerts == (
        AlertRule("drift", "feature_psi_max", ">", 0.2),
        AlertRule("daily ctr", "ctr_drop", ">", 1.0, window="1d"),
    )
    assert MonitoringSection.from_mapping({}, where="x").alerts == DEFAULT_RULES


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ('metric = "feature_psi_max"', "#1 ('drift').metric: metric 'psi' is unknown"),
        ('op = ">"', "#1 ('drift').op: op '>=': expected '>' or '<'"),
        ("threshold = 0.2", "#1 ('drift').threshold: expected a number, got '0.2'"),
        ('name = "drift"', "#1: unknown key(s) [] / missing key(s) ['name']"),
        ('window = "2h"', "[monitoring].window: window '2 hours'"),
    ],
)
def test_bad_rules_name_the_toml_key(edit: str, message: str) -> None:
    replacement = {
        'metric = "feature_psi_max"': 'metric = "psi"',
        'op = ">"': 'op = ">="',
        "threshold = 0.2": 'threshold = "0.2"',
        'name = "drift"': "",
        'window = "2h"': 'window = "2 hours"',
    }[edit]
    raw = tomllib.loads(TOML.replace(edit, replacement, 1))["monitoring"]
    with pytest.raises(ValueError, match=r"^configs/feed\.toml: ") as info:
        MonitoringSection.from_mapping(raw, where="configs/feed.toml")
    assert message in str(info.value)


def test_unknown_keys_and_duplicate_names() -> None:
    with pytest.raises(ValueError, match=r"\[monitoring\] has unknown key\(s\) windw"):
        MonitoringSection.from_mapping({"windw": "1h"}, where="f.toml")
    rule = {"name": "a", "metric": "ctr", "op": "<", "threshold": 0.01}
    with pytest.raises(ValueError, match=r"names \['a'\] more than once"):
        MonitoringSection.from_mapping({"alerts": [rule, rule]}, where="f.toml")
    with pytest.raises(ValueError, match="unknown key"):
        MonitoringSection.from_mapping({"alerts": [{**rule, "severity": 1}]}, where="f.toml")


def test_reference_ctr_is_a_ctr() -> None:
    assert MonitoringSection.from_mapping({}, where="x").reference_ctr is None
    section = MonitoringSection.from_mapping({"reference_ctr": 0.04}, where="x")
    assert section.reference_ctr == 0.04
    for bad in (0, 1.5, "0.05", True):
        with pytest.raises(ValueError, match=r"x: \[monitoring\].reference_ctr"):
            MonitoringSection.from_mapping({"reference_ctr": bad}, where="x")


def test_the_minimum_of_drift_requests() -> None:
    assert MonitoringSection.from_mapping({}, where="x").min_drift_requests == 100
    section = MonitoringSection.from_mapping({"min_drift_requests": 30}, where="x")
    assert section.min_drift_requests == 30
    for bad in (0, -1, 1.5, "100", True):
        with pytest.raises(ValueError, match=r"^f\.toml: \[monitoring\]\.min_drift_requests: "):
            MonitoringSection.from_mapping({"min_drift_requests": bad}, where="f.toml")
    with pytest.raises(ValueError, match="min_drift_requests"):
        MonitoringSection(min_drift_requests=0)


def test_the_psi_threshold_is_a_positive_psi() -> None:
    """NaN flagged no feature at all (every comparison false), and 0 or less every one."""
    section = MonitoringSection.from_mapping({"psi_threshold": 0.1}, where="x")
    assert section.psi_threshold == 0.1
    for bad in (float("nan"), float("inf"), 0, -1.0, "0.25", True):
        with pytest.raises(ValueError, match=r"^f\.toml: \[monitoring\]\.psi_threshold: .*0\.25"):
            MonitoringSection.from_mapping({"psi_threshold": bad}, where="f.toml")
    with pytest.raises(ValueError, match="psi_threshold"):
        MonitoringSection(psi_threshold=float("nan"))


def test_the_label_delay() -> None:
    assert MonitoringSection.from_mapping({}, where="x").label_delay_s == 300.0
    assert MonitoringSection.from_mapping({"label_delay_s": 0}, where="x").label_delay_s == 0.0
    for bad in (-1, "5m", True):
        with pytest.raises(ValueError, match=r"^f\.toml: \[monitoring\]\.label_delay_s: "):
            MonitoringSection.from_mapping({"label_delay_s": bad}, where="f.toml")
    with pytest.raises(ValueError, match="label_delay_s"):
        MonitoringSection(label_delay_s=-5.0)


def test_rules_may_watch_for_missing_columns() -> None:
    rule = AlertRule("columns gone", "n_missing_features", ">", 0)
    assert [a.value for a in evaluate([rule], {"n_missing_features": 2.0})] == [2.0]
