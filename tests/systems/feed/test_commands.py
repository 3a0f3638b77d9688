"""``mlsd feed features apply|materialize``: from a dataset to a filled online store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlsd.cli import run
from mlsd.data.schema import read_info
from mlsd.data.sources.synthetic import WorldConfig, synthesize
from mlsd.features.batch import feature_config_for, stored_user_features
from mlsd.features.online import OnlineFeatures


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    synthesize(WorldConfig(n_users=200, n_items=80, n_events=10_000, days=15, seed=3), out)
    return out


def _online_store_matches_batch(dataset: Path, repo: Path) -> None:
    config = feature_config_for(dataset)
    online = OnlineFeatures(repo, config)
    as_of = pd.Timestamp(read_info(dataset).ts_max) + pd.Timedelta(microseconds=1)
    batch = stored_user_features(dataset, pd.DataFrame({"user_id": [1, 2, 3], "ts": as_of}), config)
    for row in batch.itertuples():
        got = online.get_online_features(row.user_id, np.array([1, 2]), now=as_of)
        recent = got.user["recent_item_ids"][0]
        assert recent[recent >= 0].tolist() == list(row.recent_item_ids)
        assert int(got.user["last_event_ts"][0]) == row.last_event_ts
        assert got.derived["user_known"].tolist() == [1, 1]


def test_apply_then_materialize_fills_sqlite(world: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert run(["feed", "features", "apply", "--dataset", str(world), "--repo", str(repo)]) == 0
    assert (repo / "feature_store.yaml").is_file()
    assert (
        run(["feed", "features", "materialize", "--dataset", str(world), "--repo", str(repo)]) == 0
    )
    _online_store_matches_batch(world, repo)


@pytest.mark.integration
def test_config_file_selects_redis(world: Path, tmp_path: Path, redis_server: str) -> None:
    config = tmp_path / "feed.toml"
    config.write_text(
        f'[feature_store]\nonline_store = "redis"\nredis_connection = "{redis_server}"\n'
        'project = "cli_test"\n'
    )
    repo = tmp_path / "repo"
    common = ["--dataset", str(world), "--repo", str(repo), "--config", str(config)]
    assert run(["feed", "features", "apply", *common]) == 0
    assert "redis" in (repo / "feature_store.yaml").read_text()
    assert run(["feed", "features", "materialize", *common]) == 0
    _online_store_matches_batch(world, repo)


def test_bad_online_store_is_a_one_line_error(
    world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["feed", "features", "apply", "--dataset", str(world), "--online-store", "dynamo"]
    assert run([*args, "--repo", str(tmp_path / "r")]) == 1
    assert "expected one of 'sqlite', 'redis'" in capsys.readouterr().err
