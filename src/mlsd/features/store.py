"""The Feast feature repository: generate it from the feature definitions, apply it, materialize.

The repository is generated, never written by hand, so :mod:`mlsd.features.definitions` stays
the single source of truth::

    repo = generate_repo(Path("repo"), feature_set(config), FeatureStoreConfig())
    apply(repo)
    report = materialize(dataset_dir, repo, as_of=pd.Timestamp("2024-03-01", tz="UTC"),
                         config=config)

Layout of ``repo_dir``:

- ``feature_store.yaml``: provider ``local``, registry ``registry.db``, offline store ``file``,
  online store SQLite (``online.db``, the embedded default) or Redis (production).
- ``features_repo.py``: the generated Feast objects: entities ``user`` (``user_id``) and
  ``item`` (``item_id``); Parquet sources ``data/users.parquet`` and ``data/items.parquet``;
  feature views ``user_static``, ``user_dynamic`` (with the push source ``user_dynamic_push``,
  the online write path) and ``item_history``.
- ``.feastignore``: for ``feast`` CLI users; Feast imports every ``.py`` of a repository.
- ``mlsd_features.json``: the :class:`FeatureConfig` the repository was generated for, so a
  reader with another configuration gets a clear error instead of misaligned vectors.

The Parquet sources hold one row per entity, the snapshot as of the materialization time, with
``event_timestamp`` equal to it (Feast's offline store for training-time joins, and what the
online store is loaded from). Their schema is checked against the declarations before Feast
sees them: a missing column or a wrong type raises :class:`ContractError` naming the column.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mlsd import remove_feast_metrics_dir
from mlsd.data.schema import TS_TYPE, ContractError, replace_atomically
from mlsd.features.definitions import DType, Feature, FeatureConfig, FeatureSet, feature_set

__all__ = [
    "ITEM_VIEW",
    "USER_DYNAMIC_VIEW",
    "USER_PUSH_SOURCE",
    "USER_STATIC_VIEW",
    "Engine",
    "FeatureStoreConfig",
    "MaterializeReport",
    "apply",
    "check_config",
    "generate_repo",
    "item_source_schema",
    "load_config",
    "materialize",
    "online_views",
    "open_store",
    "user_source_schema",
    "validate_source",
]

USER_STATIC_VIEW = "user_static"
USER_DYNAMIC_VIEW = "user_dynamic"
ITEM_VIEW = "item_history"
USER_PUSH_SOURCE = "user_dynamic_push"
TIMESTAMP_FIELD = "event_timestamp"

STORE_YAML = "feature_store.yaml"
DEFINITIONS_MODULE = "features_repo.py"
CONFIG_FILE = "mlsd_features.json"
DATA_DIR = "data"
USERS_SOURCE = "users.parquet"
ITEMS_SOURCE = "items.parquet"
REGISTRY_FILE = "registry.db"
"""Feast's file registry, in the repository; rewritten by every registry commit."""

ARROW_TYPES: dict[DType, pa.DataType] = {
    "int64": pa.int64(),
    "float32": pa.float32(),
    "string": pa.string(),
    "int64_list": pa.list_(pa.int64()),
    "float32_list": pa.list_(pa.float32()),
}
"""The Parquet type of each declared dtype."""

FEAST_TYPES: dict[DType, str] = {
    "int64": "Int64",
    "float32": "Float32",
    "string": "String",
    "int64_list": "Array(Int64)",
    "float32_list": "Array(Float32)",
}
"""The ``feast.types`` expression of each declared dtype, as written in the generated module."""


@dataclass(frozen=True)
class FeatureStoreConfig:
    """Where the online features live.

    Attributes:
        online_store: ``sqlite`` (embedded, ``repo_dir/online.db``) or ``redis`` (production).
        redis_connection: Feast's Redis ``connection_string``, ``host:port[,param=value...]``.
        project: the Feast project name (letters, digits, underscores); it namespaces the keys
            of a shared Redis.
    """

    online_store: Literal["sqlite", "redis"] = "sqlite"
    redis_connection: str = "127.0.0.1:6379"
    project: str = "mlsd"

    def __post_init__(self) -> None:
        if self.online_store not in ("sqlite", "redis"):
            raise ValueError(
                f"FeatureStoreConfig.online_store={self.online_store!r}: "
                "expected 'sqlite' or 'redis'"
            )
        if not self.project.replace("_", "").isalnum():
            raise ValueError(
                f"FeatureStoreConfig.project={self.project!r}: use letters, digits and '_'"
            )


@dataclass(frozen=True)
class MaterializeReport:
    """What :func:`materialize` wrote; times in seconds."""

    as_of: pd.Timestamp
    n_users: int
    n_items: int
    snapshot_seconds: float
    """Computing the batch snapshot and writing the Parquet sources."""
    materialize_seconds: float
    """Loading the online store from the sources."""
    seconds: float
    kept_newer: int = 0
    """Entities (per view) whose stored values were newer than ``as_of`` and were kept, not
    replaced (Redis: pushed since, or written by a later snapshot; :func:`_make_way`)."""


# --- schemas ------------------------------------------------------------------------------


def _schema(key: str, features: Iterable[Feature]) -> pa.Schema:
    fields = [pa.field(key, pa.int64(), nullable=False)]
    fields += [pa.field(f.name, ARROW_TYPES[f.dtype]) for f in features]
    fields.append(pa.field(TIMESTAMP_FIELD, TS_TYPE, nullable=False))
    return pa.schema(fields)


def user_source_schema(features: FeatureSet) -> pa.Schema:
    """Columns of ``data/users.parquet``: ``user_id``, static and dynamic features, timestamp."""
    return _schema("user_id", features.group("user_static") + features.group("user_dynamic"))


def item_source_schema(features: FeatureSet) -> pa.Schema:
    """Columns of ``data/items.parquet``: ``item_id``, item features, timestamp."""
    return _schema("item_id", features.group("item"))


def _compatible(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Same type, ignoring list field names and the timestamp unit (any UTC timestamp works)."""
    if pa.types.is_timestamp(expected):
        return bool(pa.types.is_timestamp(actual) and actual.tz in ("UTC", "+00:00", "Etc/UTC"))
    if pa.types.is_list(expected):
        is_list = pa.types.is_list(actual) or pa.types.is_large_list(actual)
        return bool(is_list and actual.value_type == expected.value_type)
    if pa.types.is_string(expected):
        return bool(pa.types.is_string(actual) or pa.types.is_large_string(actual))
    return bool(actual == expected)


def validate_source(schema: pa.Schema, expected: pa.Schema, where: str) -> None:
    """Raise :class:`ContractError` naming the first missing or mistyped column of ``schema``."""
    for field in expected:
        index = schema.get_field_index(field.name)
        if index < 0:
            raise ContractError(
                f"{where}: column {field.name!r} is missing; expected {field.type} as declared "
                "in mlsd.features.definitions. Re-run the materialization to rewrite the source."
            )
        actual = schema.field(index).type
        if not _compatible(actual, field.type):
            raise ContractError(
                f"{where}: column {field.name!r} has type {actual}, expected {field.type} "
                "as declared in mlsd.features.definitions."
            )


def _to_source_table(frame: pd.DataFrame, expected: pa.Schema, where: str) -> pa.Table:
    """Select and cast ``frame``'s columns to ``expected``; a column that does not fit is named."""
    arrays = []
    for field in expected:
        if field.name not in frame.columns:
            raise ContractError(
                f"{where}: column {field.name!r} is missing; expected {field.type} as declared "
                "in mlsd.features.definitions."
            )
        try:
            array = pa.array(frame[field.name], type=field.type, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
            raise ContractError(
                f"{where}: column {field.name!r} (dtype {frame[field.name].dtype}) cannot be "
                f"stored as {field.type}: {exc}"
            ) from exc
        if array.null_count:
            raise ContractError(
                f"{where}: column {field.name!r} has {array.null_count} missing values; "
                "stored features take their declared default instead."
            )
        arrays.append(array)
    return pa.Table.from_arrays(arrays, schema=expected)


# --- the generated repository ---------------------------------------------------------------


def _store_yaml(repo_dir: Path, store_config: FeatureStoreConfig) -> str:
    if store_config.online_store == "redis":
        online = (
            f"  type: redis\n  connection_string: {json.dumps(store_config.redis_connection)}\n"
        )
    else:
        online = f"  type: sqlite\n  path: {json.dumps(str(repo_dir / 'online.db'))}\n"
    return (
        "# Generated by mlsd.features.store.generate_repo; re-run it instead of editing.\n"
        f"project: {store_config.project}\n"
        f"registry: {json.dumps(str(repo_dir / REGISTRY_FILE))}\n"
        "provider: local\n"
        "offline_store:\n  type: file\n"
        f"online_store:\n{online}"
        "entity_key_serialization_version: 3\n"
    )


def _q(text: str) -> str:
    """A double-quoted Python string literal (JSON's escapes are Python's)."""
    return json.dumps(text)


def _fields(key: str, features: Iterable[Feature]) -> str:
    lines = [f"        Field(name={_q(key)}, dtype=Int64),"]
    for f in features:
        lines += [
            f"        Field(name={_q(f.name)}, dtype={FEAST_TYPES[f.dtype]},",
            f"              description={_q(f.description)}),",
        ]
    return "\n".join(lines)


def _view(name: str, entity: str, key: str, source: str, features: Iterable[Feature]) -> str:
    return (
        f"{name} = FeatureView(\n"
        f"    name={_q(name)},\n"
        f"    entities=[{entity}],\n"
        "    ttl=timedelta(0),  # forever: a stored value is as of its materialization\n"
        f"    source={source},\n"
        "    online=True,\n"
        "    schema=[\n"
        f"{_fields(key, features)}\n"
        "    ],\n"
        ")\n"
    )


def _definitions_module(repo_dir: Path, features: FeatureSet) -> str:
    data = repo_dir / DATA_DIR
    parts = [
        '"""Generated by mlsd.features.store.generate_repo from mlsd.features.definitions.\n\n'
        'Do not edit: re-run generate_repo instead."""\n\n'
        "from datetime import timedelta\n\n"
        "from feast import Entity, FeatureView, Field, FileSource, PushSource\n"
        "from feast.types import Array, Float32, Int64, String\n"
        "from feast.value_type import ValueType\n\n"
        'user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64)\n'
        'item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64)\n\n'
        "users_source = FileSource(\n"
        '    name="users_source",\n'
        f"    path={_q(str(data / USERS_SOURCE))},\n"
        f"    timestamp_field={_q(TIMESTAMP_FIELD)},\n"
        ")\n"
        "items_source = FileSource(\n"
        '    name="items_source",\n'
        f"    path={_q(str(data / ITEMS_SOURCE))},\n"
        f"    timestamp_field={_q(TIMESTAMP_FIELD)},\n"
        ")\n"
        f"{USER_PUSH_SOURCE} = PushSource(name={_q(USER_PUSH_SOURCE)}, "
        "batch_source=users_source)\n"
    ]
    static = features.group("user_static")
    if static:  # a view without features would make Feast infer them from the whole source
        parts.append(_view(USER_STATIC_VIEW, "user", "user_id", "users_source", static))
    parts.append(
        _view(
            USER_DYNAMIC_VIEW,
            "user",
            "user_id",
            USER_PUSH_SOURCE,
            features.group("user_dynamic"),
        )
    )
    parts.append(_view(ITEM_VIEW, "item", "item_id", "items_source", features.group("item")))
    return "\n\n".join(parts)


def _config_to_json(config: FeatureConfig) -> str:
    return json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True) + "\n"


def load_config(repo_dir: Path) -> FeatureConfig:
    """The :class:`FeatureConfig` that ``repo_dir`` was generated for."""
    path = Path(repo_dir) / CONFIG_FILE
    if not path.is_file():
        raise ContractError(
            f"{path}: not found. Is {repo_dir} a feature repository? Create one with "
            "`mlsd feed features apply --dataset DIR`."
        )
    raw: dict[str, Any] = json.loads(path.read_text())
    event_types = raw.get("event_types")
    return FeatureConfig(
        history_len=int(raw["history_len"]),
        windows_days=tuple(int(w) for w in raw["windows_days"]),
        session_gap_s=int(raw["session_gap_s"]),
        categories=tuple(raw["categories"]),
        user_attributes=tuple(raw["user_attributes"]),
        event_types=None if event_types is None else tuple(event_types),
    )


def check_config(repo_dir: Path, config: FeatureConfig) -> None:
    """Raise :class:`ContractError` when ``repo_dir`` was generated for another configuration."""
    stored = load_config(repo_dir)
    if stored != config:
        diff = [
            f"{f.name}: repository {getattr(stored, f.name)!r}, given {getattr(config, f.name)!r}"
            for f in dataclasses.fields(FeatureConfig)
            if getattr(stored, f.name) != getattr(config, f.name)
        ]
        raise ContractError(
            f"{repo_dir}: generated for another FeatureConfig ({'; '.join(diff)}). "
            "Re-run generate_repo, apply and materialize with this configuration."
        )


def generate_repo(repo_dir: Path, features: FeatureSet, store_config: FeatureStoreConfig) -> Path:
    """Write the Feast repository of ``features`` to ``repo_dir`` (idempotent); return it.

    Only definitions are written; the Parquet sources come from :func:`materialize`.
    """
    repo_dir = Path(repo_dir).resolve()
    (repo_dir / DATA_DIR).mkdir(parents=True, exist_ok=True)
    (repo_dir / STORE_YAML).write_text(_store_yaml(repo_dir, store_config))
    (repo_dir / DEFINITIONS_MODULE).write_text(_definitions_module(repo_dir, features))
    # `feast apply` imports every .py file under the repository; .feastignore has no negation,
    # so it keeps Feast out of every sub-folder and the generated module is the only root file.
    (repo_dir / ".feastignore").write_text("*/\n")
    (repo_dir / CONFIG_FILE).write_text(_config_to_json(features.config))
    return repo_dir


def _feast_objects(repo_dir: Path) -> list[Any]:
    """Import the generated module (outside ``sys.modules``) and return its Feast objects."""
    from feast import Entity, FeatureView
    from feast.data_source import DataSource

    remove_feast_metrics_dir()  # the folder Feast's import made, unused (see mlsd)
    path = repo_dir / DEFINITIONS_MODULE
    if not path.is_file():
        raise ContractError(f"{path}: not found; run generate_repo first.")
    spec = importlib.util.spec_from_file_location(f"_mlsd_feast_repo_{id(path)}", path)
    if spec is None or spec.loader is None:
        raise ContractError(f"{path}: cannot be imported.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kinds = (Entity, DataSource, FeatureView)
    return [value for value in vars(module).values() if isinstance(value, kinds)]


def _validate_sources(repo_dir: Path, features: FeatureSet) -> None:
    for name, expected in (
        (USERS_SOURCE, user_source_schema(features)),
        (ITEMS_SOURCE, item_source_schema(features)),
    ):
        path = repo_dir / DATA_DIR / name
        if path.is_file():
            validate_source(pq.read_schema(path), expected, str(path))


def open_store(repo_dir: Path) -> Any:
    """A ``feast.FeatureStore`` on ``repo_dir``."""
    from feast import FeatureStore

    remove_feast_metrics_dir()
    return FeatureStore(repo_path=str(Path(repo_dir).resolve()))


def apply(repo_dir: Path) -> None:
    """Register the generated objects in the registry and create the online tables.

    Parquet sources already present are validated against the declarations first.
    """
    repo_dir = Path(repo_dir).resolve()
    features = feature_set(load_config(repo_dir))
    _validate_sources(repo_dir, features)
    open_store(repo_dir).apply(_feast_objects(repo_dir))


def _write_parquet(table: pa.Table, path: Path) -> None:
    """Write atomically, so a reader never sees half a source."""
    replace_atomically(path, lambda tmp: pq.write_table(table, tmp))


Engine = Literal["direct", "feast"]
"""How :func:`materialize` loads the online store; see there."""

_WRITE_BATCH_ROWS = 50_000


def online_views(features: FeatureSet) -> list[tuple[str, str]]:
    """The feature views the online store holds, each with the Parquet source it is loaded
    from: ``user_static`` (when there are static user features), ``item_history`` and
    ``user_dynamic``."""
    views = [(ITEM_VIEW, ITEMS_SOURCE), (USER_DYNAMIC_VIEW, USERS_SOURCE)]
    if features.group("user_static"):
        views.insert(0, (USER_STATIC_VIEW, USERS_SOURCE))
    return views


REDIS_SCAN_KEYS = 10_000
"""Entities whose stored write time one pipelined Redis round trip reads (:func:`_make_way`)."""


_SET_IF_UNCHANGED = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
    return redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
end
return 0
"""
"""Set hash field ARGV[1] of KEYS[1] to ARGV[3] only while it still holds ARGV[2] (atomic)."""


def redis_entity_key(project: str, key_version: int, join_key: str, entity_id: int) -> bytes:
    """The key of one entity's hash in a project's Redis online store, as Feast writes it
    (``key_version``: the store's ``entity_key_serialization_version``)."""
    from feast.infra.online_stores.helpers import _redis_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

    entity = EntityKeyProto(join_keys=[join_key], entity_values=[ValueProto(int64_val=entity_id)])
    key: bytes = _redis_key(project, entity, entity_key_serialization_version=key_version)
    return key


def _make_way(store: Any, repo_dir: Path, features: FeatureSet, as_of: pd.Timestamp) -> int:
    """On Redis, let the snapshot replace every entity it holds whose stored values are not
    newer than ``as_of``; returns how many (per view) are newer and are kept.

    Feast's Redis write skips an entity whose stored write time is not older than the row's,
    so a materialization at the same ``as_of`` over changed data would silently keep the old
    values. Such an entity's write time is set 1 µs before ``as_of`` (its values stay in
    place: a reader never finds it missing; a script sets it only while it still holds
    ``as_of``, so a push landing in between keeps its newer time), and the write then
    replaces it. A newer one was pushed since (a push writes its newest event's time) or
    written by a later snapshot: it is kept, as Feast keeps it, and counted. SQLite replaces
    every entity.
    """
    from feast.infra.online_stores.redis import RedisOnlineStore, _versioned_fv_name
    from google.protobuf.timestamp_pb2 import Timestamp

    online = store._get_provider().online_store
    if not isinstance(online, RedisOnlineStore):
        return 0
    client = online._get_client(store.config.online_store)
    nudge = client.register_script(_SET_IF_UNCHANGED)
    snapshot_ns = as_of.value
    earlier = Timestamp()
    earlier.FromNanoseconds(snapshot_ns - 1_000)
    back = earlier.SerializeToString()
    project, version = store.config.project, store.config.entity_key_serialization_version
    kept = 0
    for view_name, source in online_views(features):
        view = store.get_feature_view(view_name)
        ts_field = f"_ts:{_versioned_fv_name(view, store.config)}".encode()
        (join_key,) = view.join_keys
        ids = pq.read_table(repo_dir / DATA_DIR / source, columns=[join_key]).column(0)
        for begin in range(0, len(ids), REDIS_SCAN_KEYS):
            keys = [
                redis_entity_key(project, version, join_key, i)
                for i in ids.slice(begin, REDIS_SCAN_KEYS).to_pylist()
            ]
            with client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hget(key, ts_field)
                stored = pipe.execute()
            equal = []
            for key, raw in zip(keys, stored, strict=True):
                if raw is None:
                    continue
                stamp = Timestamp()
                stamp.ParseFromString(raw)
                written_ns = stamp.ToNanoseconds()
                kept += written_ns > snapshot_ns
                if written_ns == snapshot_ns:
                    equal.append((key, raw))
            if equal:
                with client.pipeline(transaction=False) as pipe:
                    for key, raw in equal:  # unless a push wrote a newer time since the read
                        nudge(keys=[key], args=[ts_field, raw, back], client=pipe)
                    pipe.execute()
    return kept


def _load_online(store: Any, repo_dir: Path, features: FeatureSet, as_of: pd.Timestamp) -> None:
    """Write the Parquet sources to the online store through Feast, in bounded batches.

    The same online write Feast's materialization ends with (``write_to_online_store``), minus
    its offline read: the file offline store is Dask, whose tokenizer pickles every list cell
    several times (7x the whole write for 5K users). The interval is then recorded in the
    registry, as ``feast materialize`` does.
    """
    end = as_of + timedelta(seconds=1)
    for view, source in online_views(features):
        parquet = pq.ParquetFile(repo_dir / DATA_DIR / source)
        for record_batch in parquet.iter_batches(batch_size=_WRITE_BATCH_ROWS):
            frame = record_batch.to_pandas()
            if len(frame):
                store.write_to_online_store(view, frame, transform_on_write=False)
        store.registry.apply_materialization(
            store.get_feature_view(view),
            store.project,
            as_of.to_pydatetime(),
            end.to_pydatetime(),
        )


def materialize(
    dataset_dir: Path,
    repo_dir: Path,
    *,
    as_of: pd.Timestamp,
    config: FeatureConfig,
    engine: Engine = "direct",
) -> MaterializeReport:
    """Compute the batch snapshot as of ``as_of``, write the sources, load the online store.

    Every stored feature of every user and item is computed from events strictly before
    ``as_of`` (:func:`mlsd.features.batch.snapshot`) and written to the Parquet sources with
    ``event_timestamp`` = ``as_of``. Then the online store is loaded from them:

    - ``engine="direct"`` (default): the sources are read with pyarrow and written through
      Feast's ``write_to_online_store`` (see :func:`_load_online`); ~7x faster.
    - ``engine="feast"``: ``FeatureStore.materialize`` over ``[as_of, as_of + 1 s)``, the
      path of ``feast materialize``, through Feast's Dask file offline store.

    Both leave the same values in the online store. SQLite replaces every user's and item's
    stored features with the snapshot's. Redis replaces those not newer than ``as_of`` (also
    at the same ``as_of`` over changed data) and keeps a newer one, pushed since or written by
    a later snapshot (counted in :attr:`MaterializeReport.kept_newer`): to go back to an
    earlier snapshot there, clear the online store first. Users and items absent from the
    snapshot are left as they are, on both stores.
    """
    from mlsd.features import batch

    repo_dir = Path(repo_dir).resolve()
    check_config(repo_dir, config)
    features = feature_set(config)
    as_of = pd.Timestamp(as_of)
    as_of = as_of.tz_localize("UTC") if as_of.tzinfo is None else as_of.tz_convert("UTC")

    start = time.perf_counter()
    users, items = batch.snapshot(Path(dataset_dir), as_of, config)
    users = users.assign(**{TIMESTAMP_FIELD: as_of})
    items = items.assign(**{TIMESTAMP_FIELD: as_of})
    user_table = _to_source_table(users, user_source_schema(features), "user snapshot")
    item_table = _to_source_table(items, item_source_schema(features), "item snapshot")
    (repo_dir / DATA_DIR).mkdir(parents=True, exist_ok=True)
    _write_parquet(user_table, repo_dir / DATA_DIR / USERS_SOURCE)
    _write_parquet(item_table, repo_dir / DATA_DIR / ITEMS_SOURCE)
    _validate_sources(repo_dir, features)
    snapshot_seconds = time.perf_counter() - start

    store = open_store(repo_dir)
    feast_start = time.perf_counter()
    kept_newer = _make_way(store, repo_dir, features, as_of)
    # Feast prints its progress to stdout; keep stdout for the caller's output (e.g. JSON).
    with contextlib.redirect_stdout(sys.stderr):
        if engine == "feast":
            store.materialize(
                start_date=as_of.to_pydatetime(),
                end_date=(as_of + timedelta(seconds=1)).to_pydatetime(),
            )
        elif engine == "direct":
            _load_online(store, repo_dir, features, as_of)
        else:
            raise ValueError(f"materialize: engine={engine!r}, expected 'direct' or 'feast'")
    materialize_seconds = time.perf_counter() - feast_start
    return MaterializeReport(
        as_of=as_of,
        n_users=user_table.num_rows,
        n_items=item_table.num_rows,
        snapshot_seconds=snapshot_seconds,
        materialize_seconds=materialize_seconds,
        seconds=time.perf_counter() - start,
        kept_newer=kept_newer,
    )
