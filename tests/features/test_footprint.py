"""The online feature store's bytes per entity: measured on a sample, they predict what loading
every user and item takes on a live Redis, and leave nothing behind."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from mlsd.data.schema import ContractError
from mlsd.data.sources.synthetic import WorldConfig, synthesize
from mlsd.features import batch
from mlsd.features.definitions import FeatureConfig, feature_set
from mlsd.features.footprint import _first_rows, redis_bytes_per_entity, redis_client
from mlsd.features.store import FeatureStoreConfig, apply, generate_repo, materialize

AS_OF = pd.Timestamp("2024-01-15 12:00:00", tz="UTC")


def used_memory(client: redis.Redis) -> int:
    info = client.info("memory")
    assert isinstance(info, dict)
    return int(info["used_memory"])


@pytest.fixture(scope="module")
def larger_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FeatureConfig]:
    """More users and items than the module's usual world: a sample of 1,000 of each."""
    out = tmp_path_factory.mktemp("larger-world")
    world = WorldConfig(n_users=2_000, n_items=1_000, n_events=40_000, days=20)
    synthesize(world, out, progress=False)
    return out, batch.feature_config_for(out)


@pytest.fixture
def sqlite_repo(tmp_path: Path, larger_world: tuple[Path, FeatureConfig]) -> Path:
    world, config = larger_world
    repo = generate_repo(tmp_path / "repo", feature_set(config), FeatureStoreConfig())
    apply(repo)
    materialize(world, repo, as_of=AS_OF, config=config)
    return repo


@pytest.mark.integration
def test_a_sample_predicts_the_whole_store_and_leaves_no_key(
    sqlite_repo: Path,
    redis_server: str,
    larger_world: tuple[Path, FeatureConfig],
    tmp_path: Path,
) -> None:
    world, config = larger_world
    client = redis_client(redis_server)
    keys_before = client.dbsize()
    footprint = redis_bytes_per_entity(sqlite_repo, redis_server, rows=1_000)
    assert (footprint.users, footprint.items) == (1_000, 1_000)
    assert footprint.views == {"user": ["user_static", "user_dynamic"], "item": ["item_history"]}
    assert client.dbsize() == keys_before  # its project's keys are deleted
    # Every one of the world's users and items, loaded through materialize.
    project = f"t_{uuid.uuid4().hex[:10]}"
    store = FeatureStoreConfig("redis", redis_server, project=project)
    repo = generate_repo(tmp_path / "redis-repo", feature_set(config), store)
    apply(repo)
    before = used_memory(client)
    report = materialize(world, repo, as_of=AS_OF, config=config)
    used = used_memory(client) - before
    per_user, per_item = footprint.bytes_per_user, footprint.bytes_per_item
    predicted = report.n_users * per_user + report.n_items * per_item
    assert (report.n_users, report.n_items) == (2_000, 1_000)
    assert predicted == pytest.approx(used, rel=0.05)  # measured here: 1% apart
    assert footprint.bytes_per_user > footprint.bytes_per_item  # recent items vs a few counts


def test_an_unmaterialized_repository_is_named(tmp_path: Path, config: FeatureConfig) -> None:
    repo = generate_repo(tmp_path / "repo", feature_set(config), FeatureStoreConfig())
    with pytest.raises(ContractError, match=r"users\.parquet: not found; materialize"):
        redis_bytes_per_entity(repo, "127.0.0.1:1")
    with pytest.raises(ValueError, match="rows must be >= 2"):
        redis_bytes_per_entity(repo, "127.0.0.1:1", rows=1)


def test_the_connection_string_is_read_as_feast_reads_it() -> None:
    client = redis_client("10.0.0.1:6380,db=2,password=secret")
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["password"]) == (
        "10.0.0.1",
        6380,
        2,
        "secret",
    )
    with pytest.raises(ValueError, match="one host:port"):
        redis_client("10.0.0.1:6380,10.0.0.2:6380")
    with pytest.raises(ValueError, match="one host:port"):
        redis_client("localhost")


def test_the_sample_is_the_first_rows_across_row_groups(tmp_path: Path) -> None:
    path = tmp_path / "users.parquet"
    table = pa.table({"user_id": np.arange(1_000, dtype=np.int64)})
    pq.write_table(table, path, row_group_size=300)
    assert _first_rows(path, 500)["user_id"].tolist() == list(range(500))
    assert len(_first_rows(path, 5_000)) == 1_000
