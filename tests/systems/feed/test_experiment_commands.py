"""``mlsd feed experiment report|size`` through typer's CliRunner on a hand-written log."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlsd.cli import app
from mlsd.evaluation.experiments import power, read_pilot, sample_size
from mlsd.systems.feed import experiment_commands
from mlsd.systems.feed.experiment_commands import parse_time
from tests.evaluation.test_experiments import SECTION, write_small_log

runner = CliRunner()


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    """The small log of the evaluation tests and a config defining ``ranker-ab`` (active)."""
    write_small_log(tmp_path / "logs")
    config = tmp_path / "feed.toml"
    config.write_text("[ranking]\nrankers = ['logistic']\n" + SECTION)
    return tmp_path / "logs", config


def test_report_json_holds_the_hand_checked_numbers(setup: tuple[Path, Path]) -> None:
    assert experiment_commands.experiment_app is not None  # importing registered the group
    log_dir, config = setup
    args = ["feed", "experiment", "report", "--log-dir", str(log_dir), "--config", str(config)]
    result = runner.invoke(app, [*args, "--until", "2025-03-01T18:00", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["experiment"] == "ranker-ab"  # the active experiment by default
    assert [arm["users"] for arm in data["arms"]] == [2, 3]
    assert [arm["ctr"]["value"] for arm in data["arms"]] == [0.25, 0.6]
    assert data["comparisons"][0]["ctr_per_exposure"]["statistic"] == pytest.approx(1.05)
    assert data["srm"]["statistic"] == pytest.approx(0.2)
    assert data["window"] == [None, "2025-03-01T18:00:00+00:00"]
    assert data["trusted"] is True
    assert data["comparisons"][0]["decision"] == "no significant difference"

    result = runner.invoke(app, [*args, "--experiment", "ranker-ab"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "treatment vs control" in out
    assert "CTR, delta method: decision" in out
    assert "CTR, z per exposure: naive" in out
    assert "0.2000 [-0.1136, 0.5136]" in out  # control CTR and its delta-method CI
    assert "p = 0.655 → ok" in out  # the SRM verdict
    assert "decision: no significant difference" in out
    assert max(len(line) for line in out.splitlines()) <= 80  # fits a terminal


def test_report_resalt_is_labelled(setup: tuple[Path, Path]) -> None:
    log_dir, config = setup
    result = runner.invoke(
        app,
        ["feed", "experiment", "report", "--log-dir", str(log_dir), "--config", str(config),
         "--resalt", "aa-1", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["resalted"] is True
    assert data["salt"] == "aa-1"
    assert sum(arm["users"] for arm in data["arms"]) == 5


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--experiment", "nope"], "no experiment 'nope'"),
        (["--since", "2030-01-01"], "no requests of experiment 'ranker-ab'"),
        (["--since", "yesterday"], "'yesterday' is not a time"),
    ],
)
def test_report_bad_input_exits_2(setup: tuple[Path, Path], extra: list[str], message: str) -> None:
    log_dir, config = setup
    args = ["feed", "experiment", "report", "--log-dir", str(log_dir), "--config", str(config)]
    result = runner.invoke(app, [*args, *extra])
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_report_on_an_empty_log_dir_and_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "feed.toml"
    config.write_text(SECTION)
    (tmp_path / "empty").mkdir()
    args = ["feed", "experiment", "report", "--log-dir", str(tmp_path / "empty")]
    result = runner.invoke(app, [*args, "--config", str(config)])
    assert result.exit_code == 2
    assert "no requests of experiment 'ranker-ab'" in result.stderr

    config.write_text(SECTION.replace("weight = 1 }", "weight = -1 }", 1))
    result = runner.invoke(app, [*args, "--config", str(config)])
    assert result.exit_code == 2
    assert "[experiments].experiment[0].arms[0].weight: expected a positive finite number" in (
        result.stderr.replace("\n", "")
    )


def test_report_on_a_missing_log_dir_says_so(tmp_path: Path) -> None:
    config = tmp_path / "feed.toml"
    config.write_text(SECTION)
    (tmp_path / "a-file").write_text("")
    for given, what in (("nope-log", "does not exist"), ("a-file", "is not a directory")):
        args = ["feed", "experiment", "report", "--log-dir", str(tmp_path / given)]
        result = runner.invoke(app, [*args, "--config", str(config)])
        assert result.exit_code == 2
        said = " ".join(result.stderr.split())
        assert f"--log-dir {tmp_path / given}: the log directory {what}" in said
        assert "no requests" not in said
    assert not (tmp_path / "nope-log").exists()


def test_size_prints_users_per_arm() -> None:
    args = ["feed", "experiment", "size", "--baseline-ctr", "0.05", "--mde", "0.05"]
    result = runner.invoke(app, [*args, "--alpha", "0.05", "--power", "0.8", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["users_per_arm"] == sample_size(0.05, 0.05) == 122124
    assert data["achieved_power"] == pytest.approx(power(0.05, 0.05, n_per_arm=122124))
    # one exposure per user by default: users are independent exposures, and it says so
    assert data["exposures_per_arm"] == data["independent_exposures_per_arm"] == 122124
    assert (data["exposures_per_user"], data["icc"], data["design_effect"]) == (1.0, 0.0, 1.0)
    assert "pass --exposures-per-user and --icc" in data["assumption"]

    result = runner.invoke(app, args)
    assert result.exit_code == 0
    assert "users per arm: 122,124" in result.stdout
    assert "pass --exposures-per-user and --icc" in " ".join(result.stdout.split())

    result = runner.invoke(app, ["feed", "experiment", "size", "--baseline-ctr", "0", "--mde", "1"])
    assert result.exit_code == 2
    assert "baseline_ctr" in result.stderr


def test_size_divides_the_exposures_among_users_by_the_design_effect() -> None:
    """11 exposures per user: 31,234 independent exposures are 2,840 users with independent
    clicks (a lower bound, it says), 4,260 with an intra-user correlation of 0.05."""
    args = ["feed", "experiment", "size", "--baseline-ctr", "0.05", "--mde", "0.1"]
    args += ["--exposures-per-user", "11"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["users_per_arm"] == 2840
    assert data["independent_exposures_per_arm"] == sample_size(0.05, 0.1) == 31234
    assert "a lower bound" in data["assumption"]

    result = runner.invoke(app, [*args, "--icc", "0.05", "--json"])
    data = json.loads(result.stdout)
    assert data["users_per_arm"] == sample_size(0.05, 0.1, exposures_per_user=11, icc=0.05)
    assert data["users_per_arm"] == 4260
    assert data["exposures_per_arm"] == 4260 * 11
    assert data["design_effect"] == pytest.approx(1.5)
    assert data["achieved_power"] == pytest.approx(0.8, abs=0.001)

    result = runner.invoke(app, [*args, "--icc", "0.05"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    assert "users per arm: 4,260 (two arms: 8,520)" in out
    assert (
        "exposures per arm: 46,860 (11 per user; 31,234 if independent, design effect 1.5)" in out
    )
    assert "assumes the report's decision test (delta-method CTR over users)" in out
    assert "intra-user click correlation 0.05" in out

    for bad, message in ((["--icc", "2"], "icc"), (["--exposures-per-user", "0"], "exposures")):
        result = runner.invoke(app, [*args[:-2], *bad])
        assert result.exit_code == 2
        assert message in result.stderr


def test_size_from_a_pilot_log(setup: tuple[Path, Path]) -> None:
    """The small log as a pilot (its arms pooled): 5 units, 10 exposures, 4 clicks."""
    log_dir, _ = setup
    pilot = read_pilot(log_dir, "ranker-ab")
    assert (pilot.units, pilot.exposures_per_user, pilot.ctr) == (5, 2.0, 0.4)
    args = ["feed", "experiment", "size", "--mde", "0.5", "--pilot-log", str(log_dir)]
    args += ["--pilot-experiment", "ranker-ab"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["baseline_ctr"] == 0.4  # the pilot's, as none was given
    assert data["pilot"]["design_effect"] == pytest.approx(pilot.design_effect)
    assert data["pilot"]["units"] == 5
    assert data["pilot"]["exposures_per_exposure"] == pytest.approx(pilot.exposures_per_exposure)
    assert data["icc"] is None  # measured, not assumed
    assert data["users_per_arm"] == sample_size(
        0.4, 0.5, exposures_per_user=2.0, design_effect=pilot.design_effect
    )
    result = runner.invoke(app, [*args, "--baseline-ctr", "0.3"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    assert f"pilot: 5 users of {log_dir} (experiment 'ranker-ab')" in out
    assert "to detect 0.3 → 0.45" in out

    for extra, message in (
        (["--icc", "0.1"], "--pilot-log measures the exposures per user"),
        (["--pilot-experiment", ""], "no requests outside any experiment"),
        (["--pilot-log", str(log_dir / "nope")], "the log directory does not exist"),
    ):
        result = runner.invoke(app, [*args, *extra])
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.stderr.split())
    bare = ["feed", "experiment", "size", "--mde", "0.5"]
    for extra, message in (
        ([], "pass --baseline-ctr, or --pilot-log to measure it"),
        (["--baseline-ctr", "0.05", "--since", "7d"], "choose the window of --pilot-log"),
    ):
        result = runner.invoke(app, [*bare, *extra])
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.stderr.split())


def test_report_with_arms_renamed_in_the_config_exits_2(setup: tuple[Path, Path]) -> None:
    log_dir, config = setup
    config.write_text(config.read_text().replace('"control"', '"a"').replace('"treatment"', '"b"'))
    args = ["feed", "experiment", "report", "--log-dir", str(log_dir), "--config", str(config)]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 2
    said = " ".join(result.stderr.split())
    assert "The log's arms are ['control', 'treatment'], the config's ['a', 'b']" in said
    assert result.stdout == ""


def test_parse_time_forms() -> None:
    now = datetime(2025, 3, 2, 12, tzinfo=UTC)
    assert parse_time("24h", now=now) == now - timedelta(hours=24)
    assert parse_time("30m", now=now) == now - timedelta(minutes=30)
    assert parse_time("2025-03-01") == datetime(2025, 3, 1, tzinfo=UTC)
    assert parse_time("2025-03-01T12:00+01:00").utcoffset() == timedelta(hours=1)
