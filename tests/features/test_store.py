"""The Feast repository: generated from the definitions, applied, materialized equal to batch."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from feast.types import Array, Float32, Int64

from mlsd.data.schema import ContractError
from mlsd.features import batch
from mlsd.features.definitions import FeatureConfig, feature_set
from mlsd.features.store import (
    Engine,
    FeatureStoreConfig,
    apply,
    generate_repo,
    item_source_schema,
    materialize,
    open_store,
    user_source_schema,
)

AS_OF = pd.Timestamp("2024-01-15 12:00:00", tz="UTC")

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("redis", id="redis", marks=pytest.mark.integration),
]


def store_config(request: pytest.FixtureRequest, backend: str) -> FeatureStoreConfig:
    """A fresh project per test, so tests sharing one Redis do not see each other's keys."""
    project = f"t_{uuid.uuid4().hex[:10]}"
    if backend == "redis":
        connection = request.getfixturevalue("redis_server")
        return FeatureStoreConfig(
            online_store="redis", redis_connection=connection, project=project
        )
    return FeatureStoreConfig(project=project)


def online_values(repo: Path, refs: list[str], key: str, ids: list[int]) -> dict[str, list[Any]]:
    response: dict[str, list[Any]] = (
        open_store(repo).get_online_features(features=refs, entity_rows={key: ids}).to_dict()
    )
    return response


def assert_same(name: str, stored: list[Any], expected: pd.Series) -> None:
    """Exact equality, lists included; float32 values compare as float32."""
    for got, want in zip(stored, expected, strict=True):
        if isinstance(want, str):
            assert got == want, name
        else:
            want_array = np.asarray(want)
            got_array = np.asarray(got, dtype=want_array.dtype)
            assert got_array.shape == want_array.shape, f"{name}: {got} != {want}"
            assert np.array_equal(got_array, want_array), f"{name}: {got} != {want}"


def test_generate_repo_writes_the_declared_views(tmp_path: Path, config: FeatureConfig) -> None:
    features = feature_set(config)
    repo = generate_repo(tmp_path / "repo", features, FeatureStoreConfig())
    assert "type: sqlite" in (repo / "feature_store.yaml").read_text()
    assert str(repo / "online.db") in (repo / "feature_store.yaml").read_text()
    assert (repo / ".feastignore").is_file()
    apply(repo)
    store = open_store(repo)
    views = {view.name: view for view in store.list_feature_views()}
    assert set(views) == {"user_static", "user_dynamic", "item_history"}
    dynamic = {f.name: str(f.dtype) for f in views["user_dynamic"].features}
    assert dynamic.keys() == set(features.names("user_dynamic"))
    assert dynamic["recent_item_ids"] == str(Array(Int64))
    assert dynamic["cat_count_7d"] == str(Array(Float32))
    assert dynamic["last_event_ts"] == str(Int64)
    assert [f.name for f in views["user_static"].features] == list(config.user_attributes)
    assert views["user_dynamic"].stream_source.name == "user_dynamic_push"
    assert [f.name for f in views["item_history"].features] == features.names("item")


def test_redis_config_is_written(tmp_path: Path, config: FeatureConfig) -> None:
    store = FeatureStoreConfig(online_store="redis", redis_connection="10.0.0.1:6380,db=2")
    repo = generate_repo(tmp_path / "repo", feature_set(config), store)
    text = (repo / "feature_store.yaml").read_text()
    assert "type: redis" in text
    assert '"10.0.0.1:6380,db=2"' in text


@pytest.mark.parametrize("engine", ["direct", "feast"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_materialized_values_equal_the_batch_computation(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    world: Path,
    config: FeatureConfig,
    backend: str,
    engine: Engine,
) -> None:
    features = feature_set(config)
    repo = generate_repo(tmp_path / "repo", features, store_config(request, backend))
    apply(repo)
    report = materialize(world, repo, as_of=AS_OF, config=config, engine=engine)
    users_source = pq.read_table(repo / "data" / "users.parquet").to_pandas()
    items_source = pq.read_table(repo / "data" / "items.parquet").to_pandas()
    assert report.n_users == len(users_source) > 0
    assert report.n_items == len(items_source) > 0
    assert report.seconds >= report.materialize_seconds > 0

    rng = np.random.default_rng(0)
    user_ids = sorted(rng.choice(users_source["user_id"], 60, replace=False).tolist())
    item_ids = sorted(rng.choice(items_source["item_id"], 40, replace=False).tolist())
    known = assert_online_is_batch(repo, config, world, AS_OF, user_ids, item_ids)
    assert known > 10  # the sample holds users with history


def assert_online_is_batch(
    repo: Path,
    config: FeatureConfig,
    dataset: Path,
    as_of: pd.Timestamp,
    user_ids: list[int],
    item_ids: list[int],
) -> int:
    """The online store holds the batch computation's stored features of ``dataset`` as of
    ``as_of`` for these users and items; returns how many of the users have history."""
    features = feature_set(config)
    expected_users = batch.stored_user_features(
        dataset, pd.DataFrame({"user_id": user_ids, "ts": as_of}), config
    )
    refs = [f"user_static:{n}" for n in features.names("user_static")]
    refs += [f"user_dynamic:{n}" for n in features.names("user_dynamic")]
    stored = online_values(repo, refs, "user_id", user_ids)
    for name in features.names("user_static") + features.names("user_dynamic"):
        assert_same(name, stored[name], expected_users[name])
    expected_items = batch.stored_item_features(
        dataset, pd.DataFrame({"item_id": item_ids, "ts": as_of}), config
    )
    refs = [f"item_history:{n}" for n in features.names("item")]
    stored = online_values(repo, refs, "item_id", item_ids)
    for name in features.names("item"):
        assert_same(name, stored[name], expected_items[name])
    return int(expected_users["user_known"].sum())


def test_rematerializing_later_moves_the_values(
    tmp_path: Path, world: Path, config: FeatureConfig
) -> None:
    repo = generate_repo(tmp_path / "repo", feature_set(config), FeatureStoreConfig())
    apply(repo)
    materialize(world, repo, as_of=AS_OF, config=config)
    later = AS_OF + pd.Timedelta(days=2)
    materialize(world, repo, as_of=later, config=config)
    user_ids = pq.read_table(repo / "data" / "users.parquet").column("user_id").to_pylist()[:50]
    expected = batch.stored_user_features(
        world, pd.DataFrame({"user_id": user_ids, "ts": later}), config
    )
    stored = online_values(repo, ["user_dynamic:last_event_ts"], "user_id", user_ids)
    assert stored["last_event_ts"] == expected["last_event_ts"].tolist()
    assert max(stored["last_event_ts"]) >= AS_OF.timestamp()


@pytest.mark.parametrize("engine", ["direct", "feast"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rematerializing_over_changed_data_replaces_the_values_and_newer_ones_stay_on_redis(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    world: Path,
    config: FeatureConfig,
    backend: str,
    engine: Engine,
) -> None:
    """Feast's Redis write skips an entity whose stored write time is not older than the row's:
    a materialization at the same as_of over changed data must still leave its snapshot's
    values, on Redis as on SQLite. Values newer than as_of (a later snapshot's here, as a push
    since would be) stay on Redis and are counted; SQLite replaces them."""
    features = feature_set(config)
    repo = generate_repo(tmp_path / "repo", features, store_config(request, backend))
    apply(repo)
    changed = tmp_path / "changed"
    shutil.copytree(world, changed)
    events = pq.read_table(world / "events.parquet")
    pq.write_table(events.take(np.arange(0, events.num_rows, 3)), changed / "events.parquet")

    def assert_online_is(dataset: Path, as_of: pd.Timestamp) -> None:
        user_ids = pq.read_table(repo / "data" / "users.parquet")["user_id"].to_pylist()[:80]
        item_ids = pq.read_table(repo / "data" / "items.parquet")["item_id"].to_pylist()[:50]
        assert_online_is_batch(repo, config, dataset, as_of, user_ids, item_ids)

    first = materialize(world, repo, as_of=AS_OF, config=config, engine=engine)
    assert first.kept_newer == 0
    again = materialize(changed, repo, as_of=AS_OF, config=config, engine=engine)
    assert again.kept_newer == 0
    assert_online_is(changed, AS_OF)  # the same as_of over other data: replaced

    later = AS_OF + pd.Timedelta(days=3)
    materialize(world, repo, as_of=later, config=config, engine=engine)
    earlier = materialize(changed, repo, as_of=AS_OF, config=config, engine=engine)
    if backend == "redis":  # every view of every entity is newer: kept, and said so
        views = 3 if features.group("user_static") else 2
        assert earlier.kept_newer == earlier.n_users * (views - 1) + earlier.n_items
        assert_online_is(world, later)
    else:
        assert earlier.kept_newer == 0
        assert_online_is(changed, AS_OF)


@pytest.mark.integration
def test_a_push_landing_while_a_materialization_makes_way_keeps_its_newer_values(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    world: Path,
    config: FeatureConfig,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Between the materialization's read of the stored write times and its nudge of those at
    as_of, a push writes a newer time: the nudge must leave it, so the snapshot keeps it."""
    from redis.client import Pipeline

    from mlsd.features.online import OnlineFeatures

    repo = generate_repo(tmp_path / "repo", feature_set(config), store_config(request, "redis"))
    apply(repo)
    materialize(world, repo, as_of=AS_OF, config=config)
    online = OnlineFeatures(repo, config)
    user = int(pd.read_parquet(repo / "data" / "users.parquet")["user_id"].iloc[0])
    event = {"user_id": user, "item_id": 77, "event": "click", "value": 1.0}
    pushed = pd.DataFrame([{**event, "ts": AS_OF + pd.Timedelta(minutes=5)}])
    later = (AS_OF + pd.Timedelta(hours=1)).timestamp()
    original = Pipeline.execute
    fired: list[int] = []

    def execute(self: Pipeline, *args: Any, **kwargs: Any) -> Any:
        reads = bool(self.command_stack) and all(
            command[0] == "HGET" and b"user_dynamic" in command[2]
            for command, _ in self.command_stack
        )
        out = original(self, *args, **kwargs)
        if reads and not fired:  # the write times are read: a push lands now
            fired.append(online.push_events(pushed, now=later))
        return out

    monkeypatch.setattr(Pipeline, "execute", execute)
    materialize(world, repo, as_of=AS_OF, config=config)  # the same as_of again
    monkeypatch.undo()
    assert fired == [1]
    stored = online_values(repo, ["user_dynamic:recent_item_ids"], "user_id", [user])
    assert stored["recent_item_ids"][0][0] == 77  # the push's item, newest first
    online.close()


def write_source(path: Path, schema: pa.Schema, *, drop: str = "", retype: str = "") -> None:
    """One valid-looking row of ``schema``, minus ``drop``, with ``retype`` as a string column."""
    columns: dict[str, pa.Array] = {}
    for field in schema:
        if field.name == drop:
            continue
        if field.name == retype:
            columns[field.name] = pa.array(["oops"])
        elif pa.types.is_timestamp(field.type):
            columns[field.name] = pa.array([AS_OF], type=field.type)
        elif pa.types.is_list(field.type):
            columns[field.name] = pa.array([[]], type=field.type)
        elif pa.types.is_string(field.type):
            columns[field.name] = pa.array(["x"])
        else:
            columns[field.name] = pa.array([0], type=field.type)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


@pytest.mark.parametrize(
    ("source", "drop", "retype"),
    [
        ("users.parquet", "last_event_ts", ""),
        ("users.parquet", "", "recent_item_ids"),
        ("items.parquet", "item_mean_value", ""),
        ("items.parquet", "", "item_first_ts"),
    ],
)
def test_a_wrong_source_schema_fails_apply_naming_the_column(
    tmp_path: Path, config: FeatureConfig, source: str, drop: str, retype: str
) -> None:
    features = feature_set(config)
    repo = generate_repo(tmp_path / "repo", features, FeatureStoreConfig())
    apply(repo)  # no sources yet: nothing to check
    schema = (
        user_source_schema(features) if source == "users.parquet" else item_source_schema(features)
    )
    write_source(repo / "data" / source, schema)
    apply(repo)  # a valid source passes
    write_source(repo / "data" / source, schema, drop=drop, retype=retype)
    column = drop or retype
    with pytest.raises(ContractError, match=rf"{source}: column '{column}'"):
        apply(repo)


@pytest.mark.parametrize(
    ("side", "column", "bad"),
    [
        ("users", "last_event_ts", None),
        ("users", "session_events", "many"),
        ("items", "category", None),
        ("items", "item_events_7d", "lots"),
    ],
)
def test_a_wrong_snapshot_fails_materialize_naming_the_column(
    tmp_path: Path,
    world: Path,
    config: FeatureConfig,
    monkeypatch: pytest.MonkeyPatch,
    side: str,
    column: str,
    bad: str | None,
) -> None:
    repo = generate_repo(tmp_path / "repo", feature_set(config), FeatureStoreConfig())
    apply(repo)
    real_snapshot = batch.snapshot

    def broken(
        dataset_dir: Path, as_of: pd.Timestamp, config: FeatureConfig
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        users, items = real_snapshot(dataset_dir, as_of, config)
        frame = users if side == "users" else items
        frame = frame.drop(columns=[column]) if bad is None else frame.assign(**{column: bad})
        return (frame, items) if side == "users" else (users, frame)

    monkeypatch.setattr(batch, "snapshot", broken)
    with pytest.raises(ContractError, match=f"column '{column}'"):
        materialize(world, repo, as_of=AS_OF, config=config)


def test_another_config_is_refused(tmp_path: Path, world: Path, config: FeatureConfig) -> None:
    repo = generate_repo(tmp_path / "repo", feature_set(config), FeatureStoreConfig())
    other = FeatureConfig(
        history_len=config.history_len + 1,
        windows_days=config.windows_days,
        categories=config.categories,
        user_attributes=config.user_attributes,
    )
    with pytest.raises(ContractError, match="history_len"):
        materialize(world, repo, as_of=AS_OF, config=other)
