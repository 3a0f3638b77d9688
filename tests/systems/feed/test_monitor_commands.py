"""``mlsd feed monitor`` on small logs: the drift table, exit codes 0/1/2, JSON and HTML."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import mlsd.systems.feed.monitor_commands  # noqa: F401  (registers the command on the feed app)
from mlsd.cli import run
from tests.monitoring.test_monitor import (
    END,
    START,
    candidates,
    clicked_every_other,
    profile,
    service_log,
    write_log,
)

DRIFT_ONLY = """
[monitoring]
window = "1h"

[[monitoring.alerts]]
name = "feature drift"
metric = "feature_psi_max"
op = ">"
threshold = 0.2

[[monitoring.alerts]]
name = "prediction drift"
metric = "prediction_psi"
op = ">"
threshold = 0.2
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("monitor")
    stable = service_log(root / "stable")
    drifted = root / "drifted"
    write_log(drifted, "candidates", candidates(2_000, shift=1.5, start=START))
    config = root / "feed.toml"
    config.write_text(DRIFT_ONLY)
    return {
        "stable": stable,
        "drifted": drifted,
        "profile": profile().save(root / "profile.json"),
        "config": config,
        "root": root,
    }


def args(setup: dict[str, Path], log: str, *extra: str) -> list[str]:
    return ["feed", "monitor", "--log-dir", str(setup[log]), "--reference",
            str(setup["profile"]), "--end", END.isoformat(), *extra]  # fmt: skip


def test_no_alert_exits_0(setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert run(args(setup, "stable", "--config", str(setup["config"]))) == 0
    out = capsys.readouterr().out
    assert "events_7d" in out
    assert "candidates 3,000" in out
    assert "feature drift" in out
    assert "fired" not in out


def test_fired_alerts_exit_1_and_are_named(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(args(setup, "drifted", "--config", str(setup["config"]))) == 1
    captured = capsys.readouterr()
    assert "2 alert(s) fired" in captured.err
    assert "feature drift: feature_psi_max = " in captured.err
    assert "prediction drift: prediction_psi = " in captured.err
    assert "drifted" in captured.out


def test_default_rules_json_and_report(
    setup: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # no configs/feed.toml here: the built-in rules
    out_dir = setup["root"] / "report"
    extra = ("--json", "--out", str(out_dir), "--reference-ctr", "0.1")
    assert run(args(setup, "stable", *extra)) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["fired"] == ["error rate", "ctr drop"]
    assert result["start"] == START.isoformat()
    assert (out_dir / "monitor.html").stat().st_size > 1000
    assert json.loads((out_dir / "monitor.json").read_text())["fired"] == result["fired"]


def test_without_config_the_rules_come_from_configs_feed_toml(
    setup: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Like every feed command, no --config means configs/feed.toml (relative to the cwd).
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "feed.toml").write_text(DRIFT_ONLY.replace("0.2", "0.3"))
    monkeypatch.chdir(tmp_path)
    assert run(args(setup, "stable", "--json")) == 0  # the built-in "error rate" would fire
    alerts = json.loads(capsys.readouterr().out)["alerts"]
    assert [(a["name"], a["threshold"]) for a in alerts] == [
        ("feature drift", 0.3),
        ("prediction drift", 0.3),
    ]


def test_a_window_ending_now_waits_for_its_clicks(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The last hour up to now, clicks 4 minutes after every other exposure: the config's
    5-minute label delay reads the true CTR, ``--label-delay 0`` the one biased low."""
    now = datetime.now(UTC)
    clicked_every_other(tmp_path, delay_s=240, now=now, start=now - timedelta(hours=1))
    (tmp_path / "feed.toml").write_text("[monitoring]\nlabel_delay_s = 300\nalerts = []\n")
    common = ["feed", "monitor", "--log-dir", str(tmp_path), "--reference",
              str(setup["profile"]), "--end", now.isoformat(),
              "--config", str(tmp_path / "feed.toml"), "--json"]  # fmt: skip
    assert run(common) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metrics"]["ctr"] == pytest.approx(0.5, abs=0.005)
    assert datetime.fromisoformat(result["labels_end"]) < now - timedelta(seconds=290)
    assert run([*common, "--label-delay", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["ctr"] == pytest.approx(
        0.5 * 56 / 60, abs=0.005
    )
    assert run([*common, "--label-delay", "-1"]) == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--window", "an hour"], "window 'an hour'"),
        (["--end", "yesterday"], "--end 'yesterday'"),
        (["--config", "absent.toml"], "absent.toml: config file not found"),
    ],
)
def test_bad_options_exit_2(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert run(args(setup, "stable", *extra)) == 2
    assert message in capsys.readouterr().err


def test_bad_files_exit_2(setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    bad_profile = setup["root"] / "bad.json"
    bad_profile.write_text('{"format": 1}')
    command = ["feed", "monitor", "--log-dir", str(setup["stable"]), "--reference"]
    assert run([*command, str(bad_profile)]) == 2
    assert f"{bad_profile}: malformed reference profile" in capsys.readouterr().err
    bad_config = setup["root"] / "bad.toml"
    bad_config.write_text(DRIFT_ONLY.replace('op = ">"', 'op = "=>"', 1))
    assert run(args(setup, "stable", "--config", str(bad_config))) == 2
    assert "[[monitoring.alerts]] #1 ('feature drift').op" in capsys.readouterr().err
    assert run([*command[:3], str(setup["root"] / "nowhere"), *command[4:],
                str(setup["profile"])]) == 2  # fmt: skip
    assert "log directory not found" in capsys.readouterr().err


def test_only_the_profiled_models_rows_are_compared(
    tmp_path: Path, setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """The profile's model.json names its version: another model's drifted rows in the same
    window (a previous champion, another arm) are left out; --model-version all keeps them."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.json").write_text(json.dumps({"version": "ours"}))
    reference = profile().save(model_dir / "reference_profile.json")
    log = tmp_path / "log"
    ours = candidates(2_000, shift=0.0, start=START).assign(model_version="ours")
    theirs = candidates(2_000, shift=1.5, start=START, seed=2).assign(model_version="theirs")
    write_log(log, "candidates", ours)
    write_log(log, "candidates", theirs)
    base = ["feed", "monitor", "--log-dir", str(log), "--reference", str(reference),
            "--end", END.isoformat(), "--config", str(setup["config"])]  # fmt: skip

    assert run(base) == 0
    assert "candidate rows of model version ours only" in capsys.readouterr().out
    assert run([*base, "--model-version", "all"]) == 1
    assert "alert(s) fired" in capsys.readouterr().err
    assert run([*base, "--model-version", "theirs"]) == 1


CTR_DROP_ONLY = """
[monitoring]
label_delay_s = 0

[[monitoring.alerts]]
name = "ctr drop"
metric = "ctr_drop"
op = ">"
threshold = 0.2
"""


def test_the_tables_show_the_label_metrics_beside_the_training_values(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config = setup["root"] / "ctr-drop.toml"
    config.write_text(CTR_DROP_ONLY)
    assert run(args(setup, "stable", "--config", str(config), "--json")) == 0
    result = json.loads(capsys.readouterr().out)
    metrics = result["metrics"]
    assert {"ctr", "ndcg_at_10", "ece"} <= set(metrics)

    assert run(args(setup, "stable", "--config", str(config))) == 0
    out = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 3}
    for name in ("ctr", "ndcg_at_10", "ece"):
        assert f"{metrics[name]:.4g}" in rows[name], out
    assert "0.1" in rows["ctr"].split("│")[3]  # the profile's training ctr
    assert "base rate of the ranker's candidates" in " ".join(out.split())
    assert "exposures before" not in out  # a window wholly in the past: labels read whole


def test_a_ctr_drop_without_a_reference_ctr_says_what_it_needs(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config = setup["root"] / "ctr-drop.toml"
    config.write_text(CTR_DROP_ONLY)
    assert run(args(setup, "stable", "--config", str(config))) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "no data (needs --reference-ctr)" in out
    assert "ctr_drop needs --reference-ctr or [monitoring].reference_ctr" in out

    out_dir = setup["root"] / "ctr-drop-report"
    extra = ("--config", str(config), "--json", "--out", str(out_dir))
    assert run(args(setup, "stable", *extra)) == 0
    (alert,) = json.loads(capsys.readouterr().out)["alerts"]
    assert alert["status"] == "no data"  # unchanged; the cause is a field of its own
    assert alert["note"] == "needs --reference-ctr or [monitoring].reference_ctr"
    (written,) = json.loads((out_dir / "monitor.json").read_text())["alerts"]
    assert written == alert  # the file says what the command printed

    measured = ("--config", str(config), "--reference-ctr", "0.05")
    assert run(args(setup, "stable", *measured, "--json")) == 1  # ctr 0.03: a 40% drop
    (alert,) = json.loads(capsys.readouterr().out)["alerts"]
    assert alert["status"] == "fired"
    assert "note" not in alert
    assert run(args(setup, "stable", *measured)) == 1
    out = capsys.readouterr().out
    assert "reference_ctr 0.05" in out
    assert "needs --reference-ctr" not in out


def test_labels_read_up_to_the_label_delay_are_said_to(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    clicked_every_other(tmp_path, delay_s=240, now=now, start=now - timedelta(hours=1))
    (tmp_path / "feed.toml").write_text("[monitoring]\nlabel_delay_s = 300\nalerts = []\n")
    command = ["feed", "monitor", "--log-dir", str(tmp_path), "--reference",
               str(setup["profile"]), "--end", now.isoformat(),
               "--config", str(tmp_path / "feed.toml")]  # fmt: skip
    assert run(command) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "label metrics (exposures before " in out
    assert "younger ones may not have their clicks yet" in out


def test_a_model_json_as_reference_points_at_the_profile_next_to_it(
    tmp_path: Path, setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.json").write_text(json.dumps({"version": "ours"}))
    profile().save(model_dir / "reference_profile.json")
    for given in (model_dir / "model.json", model_dir):
        command = ["feed", "monitor", "--log-dir", str(setup["stable"]), "--reference",
                   str(given), "--end", END.isoformat()]  # fmt: skip
        assert run(command) == 2
        said = " ".join(capsys.readouterr().err.split())
        assert f"--reference {given}:" in said
        assert f"--reference {model_dir / 'reference_profile.json'}" in said
