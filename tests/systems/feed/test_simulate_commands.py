"""``mlsd feed simulate`` against the real service on loopback (world and oracle preferences)."""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

import mlsd.systems.feed.simulate_commands  # noqa: F401  registers `simulate` on the feed app
from mlsd.cli import run
from mlsd.data.schema import read_info
from mlsd.data.sources.synthetic import WorldConfig, synthesize
from mlsd.serving.app import create_app
from mlsd.serving.popular import PopularRecommender
from mlsd.serving.settings import ServiceSettings
from tests.serving.test_app import running_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("simulate") / "world"
    config = WorldConfig(n_users=200, n_items=100, n_events=5_000, days=10, drift_at="2024-01-06")
    synthesize(config, out, progress=False)
    return out


@pytest.fixture(scope="module")
def url(world_dir: Path) -> Iterator[str]:
    model = PopularRecommender.from_dataset(world_dir, version="popular:cli")
    with running_server(create_app(lambda: model, settings=ServiceSettings())) as base_url:
        yield base_url


def simulate_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    assert run(["feed", "simulate", *args, "--json"]) == 0, capsys.readouterr().err
    result: dict[str, object] = json.loads(capsys.readouterr().out)
    return result


def test_world_preferences_and_json(
    url: str, world_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--url", url, "--dataset", str(world_dir), "--users", "30", "--requests", "40"]
    result = simulate_json(capsys, *args, "--k", "5", "--start", "2024-01-05", "--seed", "3")
    assert result["preferences"] == "world"
    assert (result["requests"], result["answered"], result["errors"]) == (40, 40, 0)
    assert result["total"] == result["by_model_version"]["popular:cli"]  # type: ignore[index]
    assert len(result["clicks_by_position"]) == 5  # type: ignore[arg-type]
    assert result["start"] == "2024-01-05T00:00:00Z"

    after = simulate_json(capsys, *args, "--after-drift", "--experiment", "exp1")
    assert after["preferences"] == "world (after drift)"
    assert after["experiment"] == "exp1"
    # Without --start the clock starts at the dataset's last event.
    assert pd.Timestamp(str(after["start"])) == pd.Timestamp(read_info(world_dir).ts_max)


def test_oracle_when_the_dataset_has_no_world(
    url: str, world_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = tmp_path / "plain"
    shutil.copytree(world_dir, plain, ignore=shutil.ignore_patterns("world.*"))
    args = ["--url", url, "--dataset", str(plain), "--users", "20", "--requests", "20"]
    result = simulate_json(capsys, *args, "--concurrency", "2")
    assert str(result["preferences"]).startswith("oracle")
    assert result["answered"] == 20

    assert run(["feed", "simulate", *args, "--after-drift"]) == 1
    assert "holds no simulated world" in capsys.readouterr().err


def test_summary_table_and_unreachable_service(
    url: str, world_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--dataset", str(world_dir), "--users", "10", "--requests", "10"]
    assert run(["feed", "simulate", "--url", url, *args]) == 0
    out = capsys.readouterr().out
    for expected in ("simulation", "CTR", "by model version", "popular:cli", "by position"):
        assert expected in out

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    assert run(["feed", "simulate", "--url", dead, *args]) == 1
    captured = capsys.readouterr()
    assert "ConnectError: 10" in captured.out
    assert f"no request was answered (ConnectError x10); is the service running at {dead}?" in (
        captured.err.replace("\n", "")
    )
