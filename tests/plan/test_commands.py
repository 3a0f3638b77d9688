"""``mlsd plan capacity``: the requirements from the config and --set, the costs from a bench
run's JSON, one line per error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlsd.cli import run
from mlsd.config import load_feed_config
from mlsd.plan.capacity import VectorSource
from mlsd.plan.commands import vector_sources
from tests.plan.test_capacity import bench_report


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "feed.toml"
    path.write_text("[plan]\ndaily_active_users = 864_000\nprecomputed_share = 0.5\n")
    return path


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
    online_ms = (
        0.978 / 199.9 * 1000
    )  # the replicas' CPU; Redis's and nginx's have lines of their own
    pre_ms = 0.236 / 200.0 * 1000
    assert lines["service cores at peak"] == pytest.approx(
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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "users"], "--set 'users': expected KEY=VALUE"),
        (["--set", "users=0"], "with --set: [plan]: users must be > 0, got 0"),
        (["--set", "userz=1"], "with --set: [plan] has unknown key 'userz'"),
        (["--measured", "nope.json"], "nope.json: file not found"),
    ],
)
def test_capacity_errors_are_one_line_naming_the_key(
    config: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert run(["plan", "capacity", "--config", str(config), *args]) == 1
    err = capsys.readouterr().err
    assert message in " ".join(err.split())  # the console may wrap a long line
    assert err.startswith(f"config: {config}\nerror: ")  # which config, then the one error
    assert "Traceback" not in err


def test_the_vector_sources_are_the_configs(tmp_path: Path) -> None:
    path = tmp_path / "feed.toml"
    path.write_text(
        '[retrieval]\nsources = ["popularity", "als", "two_tower"]\n'
        "[retrieval.als]\nfactors = 32\n[retrieval.two_tower]\ndim = 48\n"
    )
    assert vector_sources(load_feed_config(path)) == {
        "als": VectorSource(32, user_vectors=True),
        "two_tower": VectorSource(48),
    }
