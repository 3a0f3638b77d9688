"""``mlsd feed logs`` over a service log written by :class:`ServiceLog`."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mlsd.cli import run
from mlsd.monitoring.logs import ServiceLog

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    """Two hours of traffic: 3 requests of model a:1 (one a fallback, one clicked), then 1 of
    b:2 an hour later (clicked) and a failed request."""
    root = tmp_path / "log"
    with ServiceLog(root) as log:
        for i, (version, path, fallbacks) in enumerate(
            [("a:1", "online", ""), ("a:1", "online", ""), ("a:1", "fallback:popular", "model")]
        ):
            ts = T0 + timedelta(minutes=i)
            log.log_request(f"r{i}", ts, 7, version, path=path, latency_ms=10.0 * (i + 1),
                            status=200, k=2, fallbacks=fallbacks)  # fmt: skip
            log.log_exposures(f"r{i}", ts, 7, version, [1, 2], [0.9, 0.5], path=path)
        log.log_feedback(T0 + timedelta(minutes=5), 7, 2, "click", request_id="r1")
        later = T0 + timedelta(hours=1)
        log.log_request("r9", later, 8, "b:2", path="online", latency_ms=5.0, status=200, k=2)
        log.log_exposures("r9", later, 8, "b:2", [3, 4], [0.8, 0.7])
        log.log_feedback(later + timedelta(seconds=30), 8, 3, "click", request_id="r9")
        log.log_request("r10", later, 8, "", path="", latency_ms=1.0, status=503, k=2)
    return root


def test_summary_of_the_whole_log(
    log_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "summary.json"
    assert run(["feed", "logs", "--log-dir", str(log_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "service log" in printed
    assert "a:1" in printed
    summary = json.loads(out.read_text())
    assert summary["log_dir"] == str(log_dir)
    assert (summary["requests"], summary["exposures"], summary["clicks"]) == (5, 8, 2)
    assert summary["error_rate"] == pytest.approx(1 / 5)
    assert summary["fallback_rate"] == pytest.approx(1 / 5)
    models = {m["model_version"]: m for m in summary["ctr_by_model"]}
    assert models["a:1"]["ctr"] == pytest.approx(1 / 6)
    assert models["b:2"]["ctr"] == pytest.approx(1 / 2)


def test_a_window_cuts_every_table(
    log_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "summary.json"
    end = (T0 + timedelta(minutes=30)).isoformat()
    assert run(["feed", "logs", "--log-dir", str(log_dir), "--window", "1h", "--end", end,
                "--out", str(out)]) == 0  # fmt: skip
    summary = json.loads(out.read_text())
    assert (summary["requests"], summary["exposures"], summary["clicks"]) == (3, 6, 1)

    monkeypatch.setenv("MLSD_LOG_DIR", str(log_dir))  # the directory from the environment
    start = (T0 + timedelta(minutes=59)).isoformat()
    assert run(["feed", "logs", "--start", start, "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert (summary["requests"], summary["exposures"], summary["clicks"]) == (2, 2, 1)


def test_the_default_directory_comes_from_the_config(
    log_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "feed.toml"
    config.write_text('[service_log]\ndir = "log"\n')
    args = ["feed", "logs", "--config", str(config), "--base-dir", str(tmp_path)]
    assert run(args) == 0
    assert str(log_dir) in capsys.readouterr().out.replace("\n", "")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--log-dir", "no/such/log"], "no service log at no/such/log"),
        (["--window", "1h", "--start", "2024-05-01"], "--window or --start"),
        (["--window", "soon"], "window 'soon'"),
        (["--end", "yesterday"], "not an ISO 8601 time"),
    ],
)
def test_bad_input_is_one_line(
    log_dir: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if "--log-dir" not in args:
        args = ["--log-dir", str(log_dir), *args]
    assert run(["feed", "logs", *args]) == 1
    err = capsys.readouterr().err
    assert message in err.replace("\n", "")
    assert "Traceback" not in err


def test_since_and_json_print_the_recent_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--since 1h --json``: only the last hour, as JSON on stdout (nothing else printed)."""
    now = datetime.now(UTC)
    with ServiceLog(tmp_path) as log:
        for i, (ago, arm) in enumerate([(timedelta(hours=2), "a"), (timedelta(0), "b")]):
            ts = now - ago
            log.log_request(f"r{i}", ts, i, "m", path="online", latency_ms=2.0 + i, status=200,
                            k=2, experiment="exp", arm=arm)  # fmt: skip
            log.log_exposures(f"r{i}", ts, i, "m", [10, 20], [0.7, 0.3], experiment="exp", arm=arm)
            log.log_feedback(ts + timedelta(seconds=1), i, 10, "click", request_id=f"r{i}")

    assert run(["feed", "logs", "--log-dir", str(tmp_path), "--json"]) == 0
    everything = json.loads(capsys.readouterr().out)
    assert (everything["requests"], everything["exposures"], everything["clicks"]) == (2, 4, 2)

    assert run(["feed", "logs", "--log-dir", str(tmp_path), "--since", "1h", "--json"]) == 0
    recent = json.loads(capsys.readouterr().out)
    assert (recent["requests"], recent["exposures"], recent["clicks"]) == (1, 2, 1)
    assert recent["ctr_by_arm"] == [
        {"experiment": "exp", "arm": "b", "exposures": 2, "clicks": 1, "ctr": 0.5}
    ]
    assert recent["latency_p50_ms"] == pytest.approx(3.0)

    assert run(["feed", "logs", "--log-dir", str(tmp_path), "--since", "30m"]) == 0
    printed = capsys.readouterr().out
    assert "CTR by experiment arm" in printed
    assert "50.00%" in printed
