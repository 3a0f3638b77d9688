"""``mlsd plan capacity``: the requirements from the config and --set, the costs from a bench
run's JSON, one line per error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlsd.cli import run
from mlsd.config import load_feed_config, load_plan_requirements
from tests.plan.test_capacity import bench_report


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "feed.toml"
    path.write_text("[plan]\ndaily_active_users = 864_000\nprecomputed_share = 0.5\n")
    return path


def test_plan_reads_the_config_and_set_overrides_it(config: Path) -> None:
    assert load_feed_config(config).plan.daily_active_users == 864_000
    plan = load_plan_requirements(
        config, {"users": "2_000_000", "index": "flat", "peak_to_average": "2"}
    )
    assert (plan.daily_active_users, plan.precomputed_share) == (864_000, 0.5)
    assert (plan.users, plan.index, plan.peak_to_average) == (2_000_000, "flat", 2.0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"userz": "1"}, "unknown key 'userz'"),
        ({"users": "many"}, r"\[plan\]\.users: expected an integer"),
        ({"index": "ivf"}, "expected one of 'flat', 'hnsw'"),
        ({"users": "0"}, "users must be > 0"),
    ],
)
def test_a_bad_override_names_the_key(
    config: Path, overrides: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        load_plan_requirements(config, overrides)


def test_capacity_prints_the_plan_as_json(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    measured = tmp_path / "serving.json"
    measured.write_text(json.dumps(bench_report()))
    args = ["--config", str(config), "--measured", str(measured), "--set", "min_replicas=1"]
    code = run(["plan", "capacity", *args, "--json"])
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    lines = {line["name"]: line["value"] for line in plan["lines"]}
    assert lines["peak requests/s"] == pytest.approx(300.0)  # 100/s mean x 3
    online_ms = (0.978 + 0.001 + 0.027) / 199.9 * 1000
    pre_ms = (0.236 + 0.012 + 0.025) / 200.0 * 1000
    assert lines["serving cores at peak"] == pytest.approx(
        (150 * online_ms + 150 * pre_ms) / 1000 / 0.6
    )
    assert plan["measured"]["source"] == str(measured)


def test_capacity_prints_a_table_and_says_what_is_missing(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["plan", "capacity", "--config", str(config)]) == 0
    out = capsys.readouterr()
    assert "peak requests/s" in out.out
    assert "precomputed store" in out.out
    assert "--measured" in out.err


def test_capacity_errors_are_one_line(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["plan", "capacity", "--config", str(config), "--set", "users"]) == 1
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert run(["plan", "capacity", "--config", str(config), "--measured", "nope.json"]) == 1
    assert "nope.json: file not found" in capsys.readouterr().err
