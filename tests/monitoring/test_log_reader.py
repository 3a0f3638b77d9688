"""Reading the service log: the click attribution, the summary's figures by hand, windows, an
empty log, JSON."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from mlsd.monitoring.log_reader import ATTRIBUTED, connect, create_log_views, summarize
from mlsd.monitoring.logs import ServiceLog

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def write_small_log(log_dir: Path) -> None:
    """Five requests in experiment "ab", two model versions, and clicks of every kind.

    control (r1, r2, r4: model m1) shows 6 exposures; treatment (r3, r5: model m2) shows 4.
    """
    latencies = [1.0, 2.0, 3.0, 4.0, 100.0]
    statuses = [200, 200, 503, 200, 200]
    paths = ["online", "online", "precomputed", "fallback:popular", "online"]
    fallbacks = ["", "features", "", "model", ""]
    users = [1, 2, 3, -1, 1]
    arms = ["control", "control", "treatment", "control", "treatment"]
    items = [[10, 30], [20, 21], [40, 41], [50, 51], [30, 60]]
    with ServiceLog(log_dir) as log:
        for i in range(5):
            rid, ts, version = f"r{i + 1}", at(600 * i), "m1" if arms[i] == "control" else "m2"
            log.log_request(rid, ts, users[i], version, path=paths[i], latency_ms=latencies[i],
                            status=statuses[i], k=2, experiment="ab", arm=arms[i],
                            fallbacks=fallbacks[i])  # fmt: skip
            log.log_exposures(rid, ts, users[i], version, items[i], [0.9, 0.1], path=paths[i],
                              experiment="ab", arm=arms[i])  # fmt: skip
        log.log_feedback(at(5), 1, 10, "click", request_id="r1")  # direct: r1/10
        log.log_feedback(at(6), 1, 10, "click", request_id="r1")  # the same exposure again
        log.log_feedback(at(700), 2, 20, "click")  # window: r2/20 (shown at 600)
        log.log_feedback(at(600 + 1801), 2, 21, "click")  # window: too late for r2/21
        log.log_feedback(at(2500), 1, 30, "click")  # window: latest is r5/30 (2400), not r1/30
        log.log_feedback(at(1100), 3, 41, "click")  # window: before r3 showed it (1200): none
        log.log_feedback(at(1300), 3, 99, "click", request_id="r3")  # never shown: none
        log.log_feedback(at(1300), 3, 40, "view", request_id="r3")  # not a click
        log.log_feedback(at(1900), -1, 50, "click")  # anonymous, no request id: none


def test_clicks_are_attributed_to_the_latest_exposure_within_the_lag(tmp_path: Path) -> None:
    """The one attribution the summary, the monitor and the A/B report aggregate."""
    with ServiceLog(tmp_path) as log:
        for rid, seconds, user, items in (
            ("r1", 0, 1, [10, 11, 12]),
            ("r2", 600, 1, [10]),  # item 10 again, later
            ("r3", 2900, 2, [30]),
            ("r4", 3000, 1, [12]),  # at the window's end: outside it
            ("r5", 100, None, [50]),  # an anonymous visitor
        ):
            log.log_exposures(rid, at(seconds), user, "m1", items, [0.5] * len(items))
        log.log_feedback(at(60), 1, 11, "click")  # inside the window: r1/11
        log.log_feedback(at(65), 1, 11, "click", request_id="r1")  # the same exposure again
        log.log_feedback(at(50), 1, 12, "view", request_id="r1")  # not a click
        log.log_feedback(at(700), 1, 10, "click")  # the later exposure r2/10, not r1/10
        log.log_feedback(at(1801), 1, 12, "click")  # 1801 s after r1/12: after the lag
        log.log_feedback(at(30), 1, 99, "click")  # an item never shown: no row
        log.log_feedback(at(3200), 2, 30, "click")  # after the end, within the lag: r3/30
        log.log_feedback(at(110), None, 50, "click")  # anonymous, no request id: nothing

    def attributed(lag: float) -> dict[tuple[str, int], bool]:
        with connect() as con:
            create_log_views(con, tmp_path, at(0), at(3000), attribution_window_s=lag)
            rows = con.sql(f"SELECT request_id, item_id, clicked FROM {ATTRIBUTED}").fetchall()
        assert len(rows) == 6  # one row per exposure of the window
        return {(rid, item): clicked for rid, item, clicked in rows}

    assert attributed(1800) == {
        ("r1", 10): False, ("r1", 11): True, ("r1", 12): False, ("r2", 10): True,
        ("r3", 30): True, ("r5", 50): False,
    }  # fmt: skip
    assert attributed(1801)[("r1", 12)]  # a lag of 1801 s reaches it
    assert not attributed(299)[("r3", 30)]  # the click at 3200 is 300 s after it
    assert (summarize(tmp_path, start=at(0), end=at(3000)).clicks) == 3


def test_a_late_click_goes_to_the_exposure_after_the_window_and_counts_once(
    tmp_path: Path,
) -> None:
    """A click without request id read after the window's end belongs to the latest exposure
    before it, even when that exposure is after the end: then it counts in the next window
    only, not for an older exposure of this one as well."""
    with ServiceLog(tmp_path) as log:
        log.log_exposures("in", at(2400), 1, "m1", [10], [0.5])  # in [0, 3000)
        log.log_exposures("out", at(3300), 1, "m1", [10], [0.5])  # the same item, after it
        log.log_feedback(at(3360), 1, 10, "click")  # a minute after "out"

    def clicked(start: float, end: float) -> dict[str, bool]:
        with connect() as con:
            create_log_views(con, tmp_path, at(start), at(end), attribution_window_s=1800)
            rows = con.sql(f"SELECT request_id, clicked FROM {ATTRIBUTED}").fetchall()
        return dict(rows)

    assert clicked(0, 3000) == {"in": False}
    assert clicked(3000, 6000) == {"out": True}
    assert clicked(0, 6000) == {"in": False, "out": True}
    assert summarize(tmp_path, start=at(0), end=at(3000)).clicks == 0


def test_summary_matches_hand_computed_figures(tmp_path: Path) -> None:
    write_small_log(tmp_path)
    summary = summarize(tmp_path)
    assert summary.requests == 5
    assert summary.error_rate == pytest.approx(1 / 5)
    expected = np.percentile([1.0, 2.0, 3.0, 4.0, 100.0], [50, 95, 99])  # linear, like DuckDB
    p50, p95, p99 = summary.latency_p50_ms, summary.latency_p95_ms, summary.latency_p99_ms
    assert [p50, p95, p99] == pytest.approx(list(expected))
    assert (p50, p95) == pytest.approx((3.0, 80.8))
    assert summary.path_share == pytest.approx(
        {"online": 0.6, "precomputed": 0.2, "fallback:popular": 0.2}
    )
    assert summary.fallback_rate == pytest.approx(2 / 5)
    assert summary.users == 3
    assert (summary.exposures, summary.clicks) == (10, 3)  # r1/10, r2/20, r5/30
    assert summary.ctr == pytest.approx(0.3)
    control, treatment = (
        summary.ctr_by_arm[("ab", "control")],
        summary.ctr_by_arm[("ab", "treatment")],
    )
    assert (control.exposures, control.clicks) == (6, 2)
    assert (treatment.exposures, treatment.clicks) == (4, 1)
    assert treatment.ctr == pytest.approx(0.25)
    assert {v: (s.exposures, s.clicks) for v, s in summary.ctr_by_model.items()} == {
        "m1": (6, 2),
        "m2": (4, 1),
    }
    assert summary.events == {"click": 8, "view": 1}
    assert summary.first_request == at(0)
    assert summary.last_request == at(2400)

    wider = summarize(tmp_path, attribution_window_s=1900)  # now r2/21 counts too
    assert wider.clicks == 4
    assert wider.ctr_by_arm[("ab", "control")].clicks == 3


def test_summary_of_a_window_and_of_an_empty_log(tmp_path: Path) -> None:
    write_small_log(tmp_path)
    window = summarize(tmp_path, start=at(600), end=at(1800))  # r2, r3
    assert (window.requests, window.exposures, window.clicks) == (2, 4, 1)
    assert window.error_rate == pytest.approx(0.5)
    assert window.to_dict()["start"] == at(600).isoformat()

    empty = summarize(tmp_path / "none")
    assert (empty.requests, empty.exposures, empty.clicks, empty.users) == (0, 0, 0, 0)
    assert (empty.error_rate, empty.latency_p99_ms, empty.ctr, empty.fallback_rate) == (None,) * 4
    assert empty.to_dict()["ctr_by_arm"] == []


def test_summary_to_dict_is_json_ready(tmp_path: Path) -> None:

    write_small_log(tmp_path)
    data = json.loads(json.dumps(summarize(tmp_path).to_dict()))
    assert data["ctr"] == pytest.approx(0.3)
    assert {
        "experiment": "ab",
        "arm": "treatment",
        "exposures": 4,
        "clicks": 1,
        "ctr": 0.25,
    } in data["ctr_by_arm"]
    assert data["first_request"] == "2024-05-01T12:00:00+00:00"
