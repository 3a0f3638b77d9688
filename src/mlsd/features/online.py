"""The online path: read a request's features, and write new events to the online store.

Reading (per request): one online-store read of the user (a query per view, ``user_static``
and ``user_dynamic``), the candidate items from an in-process cache of the whole
``item_history`` view, and the request-time features from :func:`mlsd.features.derive.derive`,
the same function the batch path uses, so training and serving cannot drift apart::

    online = OnlineFeatures(repo_dir, config)
    batch = online.get_online_features(user_id=7, item_ids=candidates)
    x = batch.matrix(["item_events_7d", "category_affinity", "seconds_since_last_event"])

Reads go through the online store's own ``online_read`` (Feast's provider API, the call
``FeatureStore.get_online_features`` makes underneath) and turn its value protos into Python
values here: what the SDK adds on top (resolving the feature references against the registry,
deduplicating entities, building a response proto and a dict from it) cost 0.35 ms for one
user against 0.14 ms for the read itself at 1M items, on a request path that has ~3 ms in
all. The values are the same; a test compares the two reads field by field.

Why a cache: Feast's Python SDK reads one entity in about 0.3 ms but 100 in about 6 ms, so
hydrating 500 candidates per request through it would spend the whole latency budget. Items
change only when the store is materialized (pushed events update users), and re-reading a
1M-item catalog through Feast takes about a minute of this process's CPU, so the cache is
re-read in the background only when the registry records a change (a materialization or an
``apply`` rewrites ``registry.db``, which a request checks at most every
``item_cache_check_s``) or when it is older than ``item_cache_ttl_s``, a safety net for
writers that bypass the registry. Requests keep using the old cache until the new one is
swapped in. :meth:`OnlineFeatures.refresh_item_cache` re-reads it on demand (e.g. on model
reload).

Writing (:meth:`OnlineFeatures.push_events`): new events update the user's dynamic features
incrementally, a read-modify-write of the user's stored state. Window counts only grow between
materializations: events that leave a window are dropped at the next materialization, which
recomputes every window from the log. A retried event (its item and second already in the
user's recent items) is not counted again; a late event counts only in the windows it falls in
and leaves the session alone; sessions break at gaps measured in whole seconds, as in
:mod:`mlsd.features.batch`.

Concurrent pushes (the service runs ``POST /v1/events`` on a thread pool, and replicas push
side by side) keep both requests' events for one user. On SQLite, pushes within one
``OnlineFeatures`` are serialised by a lock, and every read and write also holds a lock,
because Feast shares one connection between threads: a read never sees another thread's write
half done. On Redis a push is a compare-and-set (below), which serialises pushes of one user
whichever thread or replica sends them, and leaves other users' pushes unblocked.
Across replicas:

- Redis: a push is a compare-and-set, ``WATCH`` on its users' hashes, one read, then the new
  states in one ``MULTI``/``EXEC`` (written in Feast's hash layout, :class:`_RedisWriter`);
  when another writer changed one of them in between, each user is redone alone, retried. A
  200-user push took about 100 ms that way, as long as Feast's push (237 ms user by user). A
  Redis Cluster client has no ``WATCH``; there pushes go through Feast's push API and
  concurrent pushes of one user from two replicas are last-writer-wins (one replica's events
  can be lost until the next materialization).
- SQLite: a file for one machine; pushes from several processes (forked workers) for one user
  are last-writer-wins likewise, each write being one transaction.

A service applies its pushes in a child process (:meth:`OnlineFeatures.start_push_process`,
:mod:`mlsd.features.push_process`): the checks and the vectorised part
(:meth:`OnlineFeatures.prepare_push`) stay here, the per-user read-modify-write
(:meth:`OnlineFeatures.apply_push`) runs there, one push at a time, so what is said above of
one ``OnlineFeatures`` holds for the child.

Unknown users and items get the declared defaults and a known flag of 0; never an exception.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow.parquet as pq
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.type_map import feast_value_type_to_python_type

from mlsd import remove_feast_metrics_dir
from mlsd.data.schema import FLOAT32_MAX, ContractError
from mlsd.features import derive
from mlsd.features.definitions import (
    EVENT_TS_ALLOWANCE_S,
    NEVER,
    Feature,
    FeatureConfig,
    feature_set,
)
from mlsd.features.store import (
    DATA_DIR,
    ITEM_VIEW,
    ITEMS_SOURCE,
    REGISTRY_FILE,
    TIMESTAMP_FIELD,
    USER_DYNAMIC_VIEW,
    USER_PUSH_SOURCE,
    USER_STATIC_VIEW,
    check_config,
    open_store,
    redis_entity_key,
)

if TYPE_CHECKING:
    from mlsd.features.push_process import PushProcess

__all__ = ["FeatureBatch", "OnlineFeatures", "PreparedPush"]

logger = logging.getLogger(__name__)

remove_feast_metrics_dir()  # the folder Feast's import just made: unused here (see mlsd)

_NUMPY_DTYPES: dict[str, type[np.generic]] = {
    "int64": np.int64,
    "float32": np.float32,
    "int64_list": np.int64,
    "float32_list": np.float32,
}
_READ_BATCH = 1_000
"""Items per online-store read when the cache is refreshed."""
_US_PER_DAY = 86_400 * 1_000_000


@dataclass
class FeatureBatch:
    """The features of one request, as arrays ready for the models.

    Attributes:
        user: user features, leading dim 1: scalars ``(1,)``, lists ``(1, N)`` padded
            (``recent_item_ids`` with -1, ``recent_ts`` with 0), per-category ``(1, n_cat)``,
            strings as object arrays; plus ``user_known`` and ``recent_len`` (the real
            entries of each ``recent_item_ids`` row: -1 is also a valid item id).
        items: item features, ``(n_items,)`` each, in ``item_ids`` order; ``category_index`` is
            -1 for unknown categories; plus ``item_known`` and ``item_id``.
        derived: request-time context and cross features, ``(n_items,)`` or ``(1,)``.
        item_ids: the candidates, ``(n_items,)`` int64.
    """

    user: dict[str, np.ndarray]
    items: dict[str, np.ndarray]
    derived: dict[str, np.ndarray]
    item_ids: np.ndarray

    def matrix(self, names: Sequence[str]) -> npt.NDArray[np.float32]:
        """``(n_items, len(names))`` float32, columns in ``names`` order; user values broadcast.

        A name is looked up in ``derived``, then ``items``, then ``user``. Only numeric
        features of one value per item (or per user) fit; others raise ``ValueError``.
        """
        n = len(self.item_ids)
        out = np.empty((n, len(names)), dtype=np.float32)
        for j, name in enumerate(names):
            array = self.derived.get(name)
            if array is None:
                array = self.items.get(name)
            if array is None:
                array = self.user.get(name)
            if array is None:
                raise ValueError(f"feature {name!r}: not in this batch")
            if array.ndim != 1 or array.shape[0] not in (1, n):
                raise ValueError(f"feature {name!r}: shape {array.shape}, not one value per item")
            if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
                raise ValueError(f"feature {name!r}: dtype {array.dtype} is not numeric")
            out[:, j] = array
        return out


@dataclass
class _ItemTable:
    """Item features of the whole catalogue; row ``n`` holds the defaults of unknown items."""

    ids: npt.NDArray[np.int64]
    """Sorted item ids, ``(n,)``."""
    columns: dict[str, np.ndarray]
    """Feature name → ``(n + 1,)`` array, in ``ids`` order, defaults last."""
    dense: npt.NDArray[np.int64] | None
    """Item id → row, when the ids are small enough for a dense table."""
    registry: tuple[int, int] | None = None
    """The registry file's (mtime ns, size) when the table was read."""
    loaded_at: float = field(default_factory=time.monotonic)

    def rows(self, item_ids: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        n = len(self.ids)
        if self.dense is not None:
            inside = (item_ids >= 0) & (item_ids < len(self.dense))
            rows: npt.NDArray[np.int64] = np.where(
                inside, self.dense[np.where(inside, item_ids, 0)], n
            )
            return rows
        if n == 0:
            return np.zeros(len(item_ids), dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.ids, item_ids), n - 1)
        rows = np.where(self.ids[pos] == item_ids, pos, n)
        return rows

    def lookup(self, item_ids: npt.NDArray[np.int64]) -> dict[str, np.ndarray]:
        rows = self.rows(item_ids)
        items = {name: column[rows] for name, column in self.columns.items()}
        items["item_id"] = item_ids
        return items


def _dense_index(ids: npt.NDArray[np.int64]) -> npt.NDArray[np.int64] | None:
    """Id → row table when ids are non-negative and not much sparser than the catalogue."""
    if len(ids) == 0 or ids[0] < 0 or ids[-1] > 4 * len(ids) + (1 << 20):
        return None
    dense = np.full(int(ids[-1]) + 1, len(ids), dtype=np.int64)
    dense[ids] = np.arange(len(ids), dtype=np.int64)
    return dense


def _fail_fast(store: Any) -> None:
    """Make a Redis online store's client give up at once when Redis is unreachable.

    redis-py retries a lost connection three times with an exponential backoff from one
    second, so a request reading features while Redis is down would hang for seconds; the
    service has a fallback for exactly that (cold-start features) and must not wait. Short
    socket timeouts come from the connection string (``host:port,socket_timeout=0.05``)."""
    from feast.infra.online_stores.redis import RedisOnlineStore
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    online = store._get_provider().online_store
    if isinstance(online, RedisOnlineStore):
        client = online._get_client(store.config.online_store)
        client.set_retry(Retry(NoBackoff(), 0))


def _store_lock(online: Any) -> AbstractContextManager[Any]:
    """What a read or write of ``online`` holds: a lock for SQLite, nothing for Redis.

    Feast's SQLite store shares one connection between threads, so a read during another
    thread's write transaction would see its uncommitted half (or fail), and two writes would
    interleave their transactions. redis-py's client is thread-safe."""
    from feast.infra.online_stores.redis import RedisOnlineStore

    return contextlib.nullcontext() if isinstance(online, RedisOnlineStore) else threading.Lock()


def _write_ahead_log(store: Any) -> None:
    """Put a SQLite online store in write-ahead-log mode (a setting of the database file, so
    it holds for every connection from then on; Redis: nothing to do).

    In SQLite's default rollback-journal mode a write transaction that outgrows the page cache
    locks the file exclusively until it commits, and every read waits: a push of 10,000 users
    from the service's push process (:mod:`mlsd.features.push_process`) held the service's
    recommendations for up to 1.3 s. With the log, readers read the last committed state while
    a writer writes. The mode stays with the file, for every later connection (a
    materialization while the service runs, too). The log needs the file on a local disk, in a
    folder its readers may write (the ``-wal`` and ``-shm`` files), which a store a service
    pushes to is anyway; so only :meth:`OnlineFeatures.start_push_process` switches it.
    When another connection holds the file at that moment, the mode stays as it is (a warning)."""
    from feast.infra.online_stores.sqlite import SqliteOnlineStore

    online = store._get_provider().online_store
    if not isinstance(online, SqliteOnlineStore):
        return
    conn = online._get_conn(store.config)
    try:
        (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
        if str(mode).lower() != "wal":
            conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.OperationalError as error:
        logger.warning("online store %s: not switched to WAL mode (%s)", online, error)


_CAS_ATTEMPTS = 100
"""Compare-and-set attempts of one user's push before it fails (each retry means another
writer's push of the same user landed in between)."""


@dataclass(frozen=True)
class _RedisWriter:
    """Writes a user's dynamic view into Feast's Redis layout, for a compare-and-set push.

    Feast's Redis store keeps an entity in one hash (key: the serialized entity key and the
    project), a field per feature (the murmur3 hash of ``view:feature``, a ``Value`` proto) and
    ``_ts:view`` (the write time, a ``Timestamp`` proto): what its ``online_write_batch``
    writes, here inside the caller's MULTI. Values are converted by Feast's own function."""

    client: Any
    project: str
    key_version: int
    ts_field: bytes
    fields: tuple[tuple[str, bytes, Any], ...]  # (feature, hash field, Feast value type)
    key_ttl_s: int | None

    @classmethod
    def of(cls, store: Any, view: Any) -> _RedisWriter | None:
        """The writer of ``store``'s Redis (``None``: another store, or a Redis Cluster,
        whose client has no WATCH; pushes there are serialised within the process only)."""
        from feast.infra.online_stores.helpers import _mmh3
        from feast.infra.online_stores.redis import RedisOnlineStore, _versioned_fv_name
        from redis import Redis

        online = store._get_provider().online_store
        if not isinstance(online, RedisOnlineStore):
            return None
        client = online._get_client(store.config.online_store)
        if not isinstance(client, Redis):
            return None
        name = _versioned_fv_name(view, store.config)
        fields = tuple(
            (f.name, _mmh3(f"{name}:{f.name}"), f.dtype.to_value_type()) for f in view.features
        )
        return cls(
            client=client,
            project=store.config.project,
            key_version=store.config.entity_key_serialization_version,
            ts_field=f"_ts:{name}".encode(),
            fields=fields,
            key_ttl_s=store.config.online_store.key_ttl_seconds,
        )

    def key(self, user_id: int) -> bytes:
        return redis_entity_key(self.project, self.key_version, "user_id", user_id)

    def write(self, pipe: Any, key: bytes, row: Mapping[str, Any], written: pd.Timestamp) -> None:
        from feast.type_map import python_values_to_proto_values
        from google.protobuf.timestamp_pb2 import Timestamp

        stamp = Timestamp()
        stamp.FromDatetime(_utc(written).to_pydatetime())
        mapping: dict[bytes, bytes] = {self.ts_field: stamp.SerializeToString()}
        for name, field_key, value_type in self.fields:
            (proto,) = python_values_to_proto_values([row[name]], value_type)
            mapping[field_key] = proto.SerializeToString()
        pipe.hset(key, mapping=mapping)
        if self.key_ttl_s:
            pipe.expire(key, self.key_ttl_s)


_PLAIN_SCALARS = frozenset(
    ("int64_val", "int32_val", "double_val", "float_val", "string_val", "bool_val", "bytes_val")
)
_PLAIN_LISTS = frozenset(f"{kind[:-4]}_list_val" for kind in _PLAIN_SCALARS)


def _python(value: ValueProto | None) -> Any:
    """A stored value proto as Python (``None``: absent or null), as Feast's response has it.

    The plain scalars and lists (every feature mlsd stores but the timestamps) are read
    directly: Feast's general conversion tries a dozen other kinds first, which cost ~0.06 ms
    of CPU per user read (17 values) in batch prediction and the request path. The other kinds
    (timestamps, maps, sets, JSON, nulls) go through Feast's function; a test holds the values
    equal to Feast's own read."""
    if value is None:
        return None
    kind = value.WhichOneof("val")
    if kind in _PLAIN_SCALARS:
        return getattr(value, kind)
    if kind in _PLAIN_LISTS:
        return list(getattr(value, kind).val)
    return feast_value_type_to_python_type(value)


def _utc(ts: datetime) -> pd.Timestamp:
    """An online store's write time as a UTC timestamp (a naive one is UTC, as in Feast)."""
    stamp = pd.Timestamp(ts)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def _column(values: Sequence[Any], feature: Feature) -> np.ndarray:
    """A ``(len(values),)`` array of a scalar feature, ``None`` (not stored) → its default."""
    filled = [feature.default if v is None else v for v in values]
    if feature.dtype == "string":
        return np.array(filled, dtype=object)
    return np.array(filled, dtype=_NUMPY_DTYPES[feature.dtype])


def _epoch_s(ts: pd.Series) -> npt.NDArray[np.int64]:
    """Timestamps → whole epoch seconds (floor), as the batch path stores them."""
    us = pd.to_datetime(ts, utc=True).astype("datetime64[us, UTC]").astype("int64")
    seconds: npt.NDArray[np.int64] = np.floor_divide(us.to_numpy(), 1_000_000)
    return seconds


@dataclass(frozen=True)
class PreparedPush:
    """A push's events checked, filtered, deduplicated and in time order, as flat arrays
    (:meth:`OnlineFeatures.prepare_push`): what :meth:`OnlineFeatures.apply_push` needs and
    nothing else, so a push can cross to another process cheaply
    (:mod:`mlsd.features.push_process`)."""

    user_id: npt.NDArray[np.int64]
    item_id: npt.NDArray[np.int64]
    ts_s: npt.NDArray[np.int64]
    """Whole epoch seconds (floor), as stored in ``recent_ts``."""
    ts_ns: npt.NDArray[np.int64]
    value: npt.NDArray[np.float64]
    category_index: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.user_id)


@dataclass(frozen=True)
class _UserEvents:
    """One user's events of a push, deduplicated and in time order, as arrays: the per-user
    loop of :meth:`OnlineFeatures.push_events` reads plain numbers (a DataFrame per user cost
    ~0.6 ms a user in pandas' indexing and casts, most of a push's time)."""

    user_id: int
    item_id: npt.NDArray[np.int64]
    ts_s: npt.NDArray[np.int64]
    """Whole epoch seconds (floor), as stored in ``recent_ts``."""
    ts_ns: npt.NDArray[np.int64]
    value: npt.NDArray[np.float64]
    category_index: npt.NDArray[np.int64]

    @property
    def newest(self) -> pd.Timestamp:
        return pd.Timestamp(int(self.ts_ns[-1]), tz="UTC")


def _by_user(push: PreparedPush) -> list[_UserEvents]:
    """``push``'s events per user, users in order of their first event, each user's events in
    the push's (time) order."""
    users = push.user_id
    order = np.argsort(users, kind="stable")  # each user's rows together, in push order
    ids, starts = np.unique(users[order], return_index=True)
    ends = np.r_[starts[1:], len(order)]
    first_row = order[starts]  # where each user first appears: the groups' order
    groups = []
    for g in np.argsort(first_row, kind="stable").tolist():
        rows = order[starts[g] : ends[g]]
        groups.append(
            _UserEvents(
                int(ids[g]),
                push.item_id[rows],
                push.ts_s[rows],
                push.ts_ns[rows],
                push.value[rows],
                push.category_index[rows],
            )
        )
    return groups


def _refuse_missing(frame: pd.DataFrame) -> None:
    """ContractError naming the first row of ``frame`` whose ``user_id``, ``item_id``, ``ts``
    or ``value`` is missing or not usable: an id that is not a finite whole number (a null id
    would become user -2**63), a time that is not one (NaT), a value that is not finite (a NaN
    would poison the per-category means)."""
    for column in ("user_id", "item_id", "ts", "value"):
        values = frame[column]
        if column == "ts":
            bad = pd.to_datetime(values, utc=True, errors="coerce").isna().to_numpy()
            what = "no time (missing or not a timestamp)"
        else:
            numbers = pd.to_numeric(values, errors="coerce").to_numpy(
                dtype=np.float64, na_value=np.nan
            )
            finite = np.isfinite(numbers)
            bad = ~finite | (np.abs(np.where(finite, numbers, 0.0)) > FLOAT32_MAX)
            what = "no value (missing, or not a finite number float32 holds)"
            if column != "value":
                bad |= finite & (numbers != np.round(numbers))
                what = "no id (missing or not a whole number)"
        if not bad.any():
            continue
        first = int(np.argmax(bad))
        raise ContractError(
            f"push_events: {int(bad.sum())} event(s) have {what} in {column!r}, e.g. row "
            f"{frame.index[first]!r}: {column}={values.iloc[first]}; nothing was applied. "
            f"Drop those events, or fill {column!r}, before pushing"
        )


def _refuse_future(frame: pd.DataFrame, now: float) -> None:
    """ContractError naming the first row of ``frame`` (``ts_s``: epoch seconds) dated more than
    :data:`EVENT_TS_ALLOWANCE_S` after ``now``."""
    future = frame["ts_s"].to_numpy() > now + EVENT_TS_ALLOWANCE_S
    if not future.any():
        return
    first = frame.iloc[int(np.argmax(future))]
    clock = datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds")
    raise ContractError(
        f"push_events: {int(future.sum())} event(s) dated more than {EVENT_TS_ALLOWANCE_S:.0f} s "
        f"after the clock ({clock}), e.g. row {first.name!r}: user {first['user_id']}, item "
        f"{first['item_id']} at {first['ts'].isoformat()}; nothing was applied. Send events "
        "when they happen, or pass `now` when replaying a simulated clock"
    )


class OnlineFeatures:
    """Online reads and pushes against a generated, materialized repository.

    Args:
        repo_dir: the repository of :func:`mlsd.features.store.generate_repo`.
        config: the feature configuration; must be the repository's.
        item_cache_ttl_s: seconds after which the item cache is re-read in the background
            even when the registry shows no new materialization.
        item_cache_check_s: a request looks at the registry file's modification time at most
            this often (a ``stat``: microseconds).

    Safe to share between threads: the cache is swapped in one assignment and refreshed by one
    thread at a time; pushes are serialised (module docstring).
    """

    def __init__(
        self,
        repo_dir: Path,
        config: FeatureConfig,
        *,
        item_cache_ttl_s: float = 3600.0,
        item_cache_check_s: float = 1.0,
    ) -> None:
        self.repo_dir = Path(repo_dir).resolve()
        check_config(self.repo_dir, config)
        self.config = config
        self.item_cache_ttl_s = item_cache_ttl_s
        self.item_cache_check_s = item_cache_check_s
        self._registry_checked = time.monotonic()
        self.features = feature_set(config)
        self._feature_names = frozenset(f.name for f in self.features.features)
        self._store = open_store(self.repo_dir)
        _fail_fast(self._store)
        self._static = self.features.group("user_static")
        self._dynamic = self.features.group("user_dynamic")
        self._item_features = self.features.group("item")
        user_views = {
            USER_STATIC_VIEW: [f.name for f in self._static],
            USER_DYNAMIC_VIEW: [f.name for f in self._dynamic],
        }
        # No user attributes: no static view in the repository.
        self._user_views = {view: names for view, names in user_views.items() if names}
        self._item_views = {ITEM_VIEW: [f.name for f in self._item_features]}
        self._provider = self._store._get_provider()
        # Looked up once: check_config above pins the views to this config, so a later apply
        # of the same repository keeps their names and entities.
        self._views = {
            name: self._store.get_feature_view(name)
            for name in (*self._user_views, *self._item_views)
        }
        self._category_index = {c: i for i, c in enumerate(config.categories)}
        self._items: _ItemTable | None = None
        self._refresh_lock = threading.Lock()
        self._refresher: threading.Thread | None = None
        self._push_lock = threading.Lock()
        self._store_lock = _store_lock(self._provider.online_store)
        self._redis = _RedisWriter.of(self._store, self._views[USER_DYNAMIC_VIEW])
        self._pusher: PushProcess | None = None

    def start_push_process(self, *, timeout_s: float = 30.0) -> None:
        """Apply pushes in a child process from now on (:mod:`mlsd.features.push_process`):
        :meth:`push_events` checks and prepares the events here and waits for the child's
        read-modify-write, so this process's threads keep the GIL for their requests; a push
        neither taken nor answered within ``timeout_s`` raises ``TimeoutError``. A SQLite store
        is switched to write-ahead logging first, so that this process's reads do not wait for
        the child's writes (:func:`_write_ahead_log`). Idempotent; :meth:`close` stops it."""
        from mlsd.features.push_process import PushProcess

        if self._pusher is None:
            _write_ahead_log(self._store)
            self._pusher = PushProcess(self.repo_dir, self.config, timeout_s=timeout_s)

    def close(self) -> None:
        """Stop the push process, if any (:meth:`start_push_process`; pushes apply in this
        process again), and close the SQLite connection (the next read opens another): the
        last connection to close folds a write-ahead log back into the database and deletes
        it, where one left open at exit leaves the log for the next opener to replay (87 MB
        after a few large pushes). Idempotent."""
        pusher, self._pusher = self._pusher, None
        if pusher is not None:
            pusher.close()
        online = self._provider.online_store
        with self._store_lock:
            conn = getattr(online, "_conn", None)
            if conn is not None:
                online._conn = None
                conn.close()

    def after_fork(self) -> None:
        """In a forked child: drop the online store's SQLite connection, which must not cross
        ``fork()`` (sqlite.org/howtocorrupt.html, 2.6); the next read opens the child's own.
        Redis connections need nothing: redis-py reconnects when it sees a new pid. Fork with
        no item-cache refresh running (:meth:`wait_for_refresh`): its lock would stay held.
        A push process (:meth:`start_push_process`) stays the parent's: the child pushes in
        its own process."""
        self._pusher = None
        online = self._provider.online_store
        if getattr(online, "_conn", None) is not None:
            online._conn = None

    # --- items ---------------------------------------------------------------------------

    def refresh_item_cache(self) -> int:
        """Re-read every item's features from the online store; return the items found.

        The item ids come from the materialized source (``data/items.parquet``); they are read
        in batches of 1,000 and the new table replaces the old one in one assignment, so
        concurrent requests see either the old or the new cache.
        """
        with self._refresh_lock:
            return self._refresh_locked()

    def _registry_marker(self) -> tuple[int, int] | None:
        """(mtime ns, size) of ``registry.db``; every registry commit rewrites the file."""
        try:
            stat = (self.repo_dir / REGISTRY_FILE).stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def _refresh_locked(self) -> int:
        marker = self._registry_marker()  # before the read: a later change triggers another
        path = self.repo_dir / DATA_DIR / ITEMS_SOURCE
        if path.is_file():
            ids = pq.read_table(path, columns=["item_id"]).column(0).to_numpy()
        else:
            ids = np.zeros(0, dtype=np.int64)
        ids = np.unique(ids.astype(np.int64))
        values: dict[str, list[Any]] = {f.name: [] for f in self._item_features}
        for start in range(0, len(ids), _READ_BATCH):
            chunk = ids[start : start + _READ_BATCH].tolist()
            response, _ = self._read(self._item_views, "item_id", chunk)
            for name, column in values.items():
                column.extend(response[name])
        self._items = self._item_table(ids, values, marker)
        return int(self._items.columns["item_known"][:-1].sum())

    def _item_table(
        self,
        ids: npt.NDArray[np.int64],
        values: dict[str, list[Any]],
        marker: tuple[int, int] | None,
    ) -> _ItemTable:
        n = len(ids)
        columns: dict[str, np.ndarray] = {}
        known = np.zeros(n + 1, dtype=np.int64)
        for feature in self._item_features:
            stored = values[feature.name]
            known[:n] |= np.fromiter((v is not None for v in stored), dtype=bool, count=n)
            columns[feature.name] = _column([*stored, None], feature)
        columns["category_index"] = np.array(
            [self._category_index.get(c, -1) for c in columns["category"]], dtype=np.int64
        )
        columns["item_known"] = known
        return _ItemTable(ids=ids, columns=columns, dense=_dense_index(ids), registry=marker)

    def _stale(self, items: _ItemTable | None) -> bool:
        if items is None:
            return True
        now = time.monotonic()
        if now - items.loaded_at > self.item_cache_ttl_s:
            return True
        if now - self._registry_checked < self.item_cache_check_s:
            return False
        self._registry_checked = now
        return self._registry_marker() != items.registry

    def _item_cache(self) -> _ItemTable:
        """The cache; a stale one is served while a background thread re-reads it.

        Only the very first request waits for the read. Re-reading 1M items takes seconds, so
        doing it inside a request (whichever one found the cache stale) would stall it.
        """
        items = self._items
        if items is None:
            with self._refresh_lock:
                if self._items is None:
                    self._refresh_locked()
            items = self._items
            assert items is not None
        elif self._stale(items) and self._refresh_lock.acquire(blocking=False):
            self._refresher = threading.Thread(
                target=self._refresh_in_background, name="item-cache-refresh", daemon=True
            )
            self._refresher.start()
        return items

    def _refresh_in_background(self) -> None:
        """Runs holding ``_refresh_lock``, taken by the request that found the cache stale."""
        try:
            self._refresh_locked()
        except Exception:  # the stale cache keeps serving; the next stale request retries
            logger.exception("item cache refresh failed; serving the previous cache")
        finally:
            self._refresh_lock.release()

    def wait_for_refresh(self, timeout: float | None = None) -> None:
        """Block until a background refresh in progress (if any) has finished."""
        refresher = self._refresher
        if refresher is not None:
            refresher.join(timeout)

    # --- users ---------------------------------------------------------------------------

    def _read_users(
        self, user_ids: Sequence[int]
    ) -> tuple[dict[str, list[Any]], npt.NDArray[np.bool_]]:
        """Stored user features (``None`` when absent) and known flags."""
        values, _ = self._read(self._user_views, "user_id", user_ids)
        known = np.zeros(len(user_ids), dtype=bool)
        for feature in (*self._static, *self._dynamic):
            known |= np.fromiter((v is not None for v in values[feature.name]), dtype=bool)
        return values, known

    def _read_dynamic(
        self, user_ids: Sequence[int]
    ) -> tuple[dict[str, list[Any]], list[pd.Timestamp | None]]:
        """What a push starts from: the users' dynamic features (``None`` when absent) and
        the dynamic view's write times (what a push must beat)."""
        views = {USER_DYNAMIC_VIEW: self._user_views[USER_DYNAMIC_VIEW]}
        values, written = self._read(views, "user_id", user_ids)
        stored_ts = [
            None if value is None or ts is None else _utc(ts)
            for ts, value in zip(written[USER_DYNAMIC_VIEW], values["last_event_ts"], strict=True)
        ]
        return values, stored_ts

    def _read(
        self, views: Mapping[str, Sequence[str]], join_key: str, ids: Sequence[int]
    ) -> tuple[dict[str, list[Any]], dict[str, list[datetime | None]]]:
        """Feature name → the stored value of each id (``None``: not stored), and view name →
        each row's write time, one online-store read per view (module docstring)."""
        keys = [
            EntityKeyProto(join_keys=[join_key], entity_values=[ValueProto(int64_val=int(i))])
            for i in ids
        ]
        values: dict[str, list[Any]] = {}
        written: dict[str, list[datetime | None]] = {}
        for view, names in views.items():
            with self._store_lock:
                rows = self._provider.online_read(
                    config=self._store.config,
                    table=self._views[view],
                    entity_keys=keys,
                    requested_features=list(names),
                )
            for name in names:
                values[name] = [
                    _python(None if data is None else data.get(name)) for _, data in rows
                ]
            written[view] = [ts for ts, _ in rows]
        return values, written

    def _user_arrays(
        self, values: dict[str, list[Any]], known: npt.ArrayLike
    ) -> dict[str, np.ndarray]:
        """Users' features, one row per user, padded as :func:`derive.derive` expects."""
        dynamic = {f.name: values[f.name] for f in self._dynamic}
        flags = np.asarray(known, dtype=np.int64).reshape(-1)
        user = derive.user_arrays(dynamic, self.config, known=flags)
        for feature in self._static:
            user[feature.name] = _column(values[feature.name], feature)
        return user

    # --- the read path -------------------------------------------------------------------

    def get_online_features(
        self,
        user_id: int,
        item_ids: npt.ArrayLike,
        context: Mapping[str, Any] | None = None,
        *,
        now: pd.Timestamp | None = None,
    ) -> FeatureBatch:
        """All features of one request: ``user_id`` against the candidates ``item_ids``.

        Args:
            user_id: the user; unknown users get defaults and ``user_known`` 0.
            item_ids: ``(n_items,)`` candidate ids; unknown items get defaults, ``item_known`` 0.
            context: request context (e.g. ``session_id``); each scalar is broadcast into
                ``derived``, except a key that names a feature (stored, derived, or any other
                of the feature set): it is ignored, so the stored value stands.
            now: the request time (default: the wall clock), for ages and hour/weekday.
        """
        return self.features_for(self.user_features(user_id), item_ids, context, now=now)

    def user_features(self, user_id: int) -> dict[str, np.ndarray]:
        """One user's stored features (one online-store read), leading dim 1, as
        :attr:`FeatureBatch.user`; an unknown user gets the defaults and ``user_known`` 0.

        The request path reads the user first (the candidate sources need the recent items),
        then :meth:`features_for` its candidates, which reads nothing from the store."""
        values, known = self._read_users([int(user_id)])
        return self._user_arrays(values, known)

    def users_features(self, user_ids: Sequence[int]) -> dict[str, np.ndarray]:
        """:meth:`user_features` of many users in one online-store read, one row per user (in
        ``user_ids`` order): what batch prediction reads."""
        values, known = self._read_users([int(u) for u in user_ids])
        return self._user_arrays(values, known)

    def default_user(self) -> dict[str, np.ndarray]:
        """The features of a user the store does not know (or cannot be asked about)."""
        empty: dict[str, list[Any]] = {f.name: [None] for f in (*self._static, *self._dynamic)}
        return self._user_arrays(empty, [0])

    def item_features(self, item_ids: npt.ArrayLike) -> dict[str, np.ndarray]:
        """The items' stored features from the in-process cache, ``(n,)`` each (unknown items:
        defaults and ``item_known`` 0), plus ``item_id``."""
        return self._item_cache().lookup(np.asarray(item_ids, dtype=np.int64).reshape(-1))

    def features_for(
        self,
        user: Mapping[str, np.ndarray],
        item_ids: npt.ArrayLike,
        context: Mapping[str, Any] | None = None,
        *,
        now: pd.Timestamp | None = None,
    ) -> FeatureBatch:
        """The request's features from already-read ``user`` features: the candidates' from
        the item cache, the derived ones at ``now`` (default: the wall clock), and the scalar
        ``context`` values whose keys name no feature (:meth:`get_online_features`)."""
        now = pd.Timestamp.now(tz="UTC") if now is None else pd.Timestamp(now)
        ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        user = dict(user)
        items = self.item_features(ids)
        now_s = now.value // 1_000_000_000  # whole epoch seconds, as stored timestamps are
        derived = derive.derive(user, items, now_s=now_s, config=self.config)
        for name, value in (context or {}).items():
            if name in self._feature_names or name in user or name in items or name in derived:
                continue  # a stored or derived feature's value is never overridden
            if np.ndim(value) == 0:
                dtype = object if isinstance(value, str) else None
                derived[name] = np.full(len(ids), value, dtype=dtype)
        return FeatureBatch(user=user, items=items, derived=derived, item_ids=ids)

    # --- the write path ------------------------------------------------------------------

    def push_events(self, events: pd.DataFrame, *, now: float | None = None) -> int:
        """Apply new events to their users' dynamic features; return the events applied.

        ``events`` has ``user_id``, ``item_id``, ``ts``, ``event``, ``value`` (the contract's
        events columns). Events whose type is not counted (``config.event_types``) are skipped,
        and so are duplicates: repeated (user, item, ts, event) rows of ``events``, and an event
        whose item and time (whole seconds) are already in the user's stored ``recent_item_ids``
        / ``recent_ts`` (a retried POST; validation drops such rows from the training log too).
        The event type is not stored, so two types of event on one item in one second, pushed
        in separate calls, count once; a retry older than the N stored recent events is not
        recognised.

        Per user, in time order: the item is inserted into ``recent_item_ids``/``recent_ts`` at
        its place in time (N kept). An event at or after ``last_event_ts`` moves it forward and
        counts on ``session_events`` (or restarts it at 1 after a gap longer than
        ``session_gap_s``, in whole seconds as the batch path); a late event leaves both alone.
        Window ``w``'s ``events``, ``cat_count`` and ``cat_mean`` take an event in when its time
        is within ``w`` days of the user's state after the push (the later of the stored
        state's time and the newest event), as the batch computation at that time would; counts
        only grow (expiry catches up at the next materialization). The result is written with
        Feast's push API (on Redis, by a compare-and-set in Feast's layout); the next read sees
        it. Returns the events applied: duplicates and skipped types are not counted.

        Concurrent pushes of one user (the read-modify-write would otherwise lose events) are
        serialised by a lock on SQLite and by a compare-and-set on Redis; see the module
        docstring for pushes from several processes.

        Args:
            events: the events to apply.
            now: the clock, Unix seconds (default: the system clock). Events more than
                :data:`EVENT_TS_ALLOWANCE_S` after it are refused, and with them the whole call.

        Raises:
            ContractError: a column is missing; an event's ``user_id``, ``item_id``, ``ts``
                or ``value`` is missing or not finite (ids: not whole numbers); or an event is
                dated in the future. Nothing is written.
        """
        prepared = self.prepare_push(events, now=now)
        if prepared is None:
            return 0
        if self._pusher is not None:
            return self._pusher.push(prepared)
        return self.apply_push(prepared)

    def prepare_push(
        self, events: pd.DataFrame, *, now: float | None = None
    ) -> PreparedPush | None:
        """The checks and vectorised part of :meth:`push_events`: the events of counted types,
        deduplicated, in time order, with their items' categories; ``None`` when none is left.

        Raises:
            ContractError: as :meth:`push_events`.
        """
        missing = [c for c in ("user_id", "item_id", "ts", "event", "value") if c not in events]
        if missing:
            raise ContractError(f"push_events: column(s) {missing} missing from the events")
        frame = events
        if self.config.event_types is not None:
            frame = frame[frame["event"].isin(self.config.event_types)]
        if frame.empty:
            return None
        _refuse_missing(frame)
        frame = frame.assign(ts_s=_epoch_s(frame["ts"]), ts=pd.to_datetime(frame["ts"], utc=True))
        _refuse_future(frame, time.time() if now is None else now)
        frame = frame.drop_duplicates(["user_id", "item_id", "ts", "event"])
        frame = frame.sort_values("ts", kind="stable")
        item_ids = frame["item_id"].to_numpy(np.int64)
        return PreparedPush(
            user_id=frame["user_id"].to_numpy(np.int64),
            item_id=item_ids,
            ts_s=frame["ts_s"].to_numpy(np.int64),
            ts_ns=frame["ts"].astype("datetime64[ns, UTC]").astype("int64").to_numpy(),
            value=frame["value"].to_numpy(np.float64),
            category_index=self._item_cache().lookup(item_ids)["category_index"].astype(np.int64),
        )

    def apply_push(self, push: PreparedPush) -> int:
        """The read-modify-write of :meth:`push_events` for its :meth:`prepare_push`'d events;
        returns the events applied. The per-user part runs in Python: a service hands it to a
        child process (:meth:`start_push_process`)."""
        if not len(push):
            return 0
        groups = _by_user(push)
        if self._redis is not None:  # WATCH sees every other writer, this process's threads too
            return self._push_cas(self._redis, groups)
        with self._push_lock:
            return self._push_locked(groups)

    def _push_cas(self, redis: _RedisWriter, groups: list[_UserEvents]) -> int:
        """A push to Redis as a compare-and-set: WATCH the users' hashes, read them (one
        read), write their new states in one MULTI/EXEC, which fails when another writer
        (another replica, another thread) changed any of them after the WATCH. Then one user
        alone is read and applied again; several users are redone one by one, so that a busy
        user does not hold back the others' writes."""
        for _ in range(_CAS_ATTEMPTS):
            applied = self._try_cas(redis, groups)
            if applied is not None:
                return applied
            if len(groups) > 1:
                return sum(self._push_cas(redis, [group]) for group in groups)
        raise RuntimeError(
            f"push_events: user {groups[0].user_id}'s state changed under each of {_CAS_ATTEMPTS} "
            "attempts to write it"
        )

    def _try_cas(self, redis: _RedisWriter, groups: list[_UserEvents]) -> int | None:
        """One attempt of :meth:`_push_cas`: the events applied, or ``None`` when another
        writer got in between (nothing written)."""
        from redis.exceptions import WatchError

        keys = [redis.key(group.user_id) for group in groups]
        with redis.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(*keys)
                states, applied = self._next_states(groups)
                if not states:
                    pipe.unwatch()
                    return 0
                pipe.multi()
                for i, row, written in states:
                    redis.write(pipe, keys[i], row, written)
                pipe.execute()
                return applied
            except WatchError:
                return None

    def _next_state(
        self, current: dict[str, Any], group: _UserEvents, stored_ts: pd.Timestamp | None
    ) -> tuple[dict[str, Any], int, pd.Timestamp] | None:
        """One user's new dynamic features, the events applied and the write time (newer than
        the stored one: Redis keeps only a newer write); ``None`` when nothing is new."""
        newest = group.newest
        as_of = newest if stored_ts is None else max(newest, stored_ts)
        row, n = self._apply_events(current, group, as_of)
        if n == 0:
            return None  # every event was already stored: nothing to write
        if stored_ts is not None and newest <= stored_ts:
            newest = stored_ts + pd.Timedelta(microseconds=1)
        return row, n, newest

    def _next_states(
        self, groups: list[_UserEvents]
    ) -> tuple[list[tuple[int, dict[str, Any], pd.Timestamp]], int]:
        """Read the users of ``groups`` (each user's deduplicated, time-ordered events) in one
        read; return ``(i, new dynamic features, write time)`` of each ``groups[i]`` that
        changes (:meth:`_next_state`), and the events applied."""
        values, stored_ts = self._read_dynamic([group.user_id for group in groups])
        states, applied = [], 0
        for i, group in enumerate(groups):
            current = {f.name: values[f.name][i] for f in self._dynamic}
            state = self._next_state(current, group, stored_ts[i])
            if state is not None:
                row, n, written = state
                states.append((i, row, written))
                applied += n
        return states, applied

    def _push_locked(self, groups: list[_UserEvents]) -> int:
        """:meth:`push_events` of each user's deduplicated, time-ordered events (``groups``)
        through Feast's push API, holding ``_push_lock``."""
        states, applied = self._next_states(groups)
        rows = [
            {**row, "user_id": groups[i].user_id, TIMESTAMP_FIELD: written}
            for i, row, written in states
        ]
        if rows:
            with self._store_lock:
                self._store.push(USER_PUSH_SOURCE, pd.DataFrame(rows))
        return applied

    def _apply_events(
        self, current: dict[str, Any], group: _UserEvents, as_of: pd.Timestamp
    ) -> tuple[dict[str, Any], int]:
        """One user's dynamic features after ``group`` (time ordered; ``None`` → default), and
        the events of ``group`` applied (the others were already stored). Window ``w`` counts
        an event at or after ``as_of - w`` days (:meth:`push_events`)."""
        n_cat = len(self.config.categories)
        state: dict[str, Any] = {
            f.name: (f.default if current[f.name] is None else current[f.name])
            for f in self._dynamic
        }
        stored = list(zip(state["recent_item_ids"], state["recent_ts"], strict=True))
        known = {(int(item), int(ts)) for item, ts in stored}
        new: list[tuple[int, int]] = []
        last = int(state["last_event_ts"])
        session = int(state["session_events"])
        windows = self.config.windows_days
        as_of_us = _utc(as_of).value // 1_000  # ns → µs
        window_start = {w: as_of_us - w * _US_PER_DAY for w in windows}
        counts = {w: np.zeros(n_cat) + np.asarray(state[f"cat_count_{w}d"]) for w in windows}
        sums = {w: counts[w] * np.asarray(state[f"cat_mean_{w}d"]) for w in windows}
        events = {w: float(state[f"events_{w}d"]) for w in windows}
        ts_us = group.ts_ns // 1_000
        for item_id, ts, t_us, value, cat in zip(
            group.item_id.tolist(),
            group.ts_s.tolist(),
            ts_us.tolist(),
            group.value.tolist(),
            group.category_index.tolist(),
            strict=True,
        ):
            if (int(item_id), int(ts)) in known:
                continue  # a retry of a stored event
            new.append((int(item_id), int(ts)))
            if last == NEVER or ts >= last:  # a late event leaves the session alone
                session = (
                    1 if last == NEVER or ts - last > self.config.session_gap_s else session + 1
                )
                last = int(ts)
            for w in windows:
                if t_us < window_start[w]:
                    continue
                events[w] += 1.0
                if cat >= 0:
                    counts[w][cat] += 1.0
                    sums[w][cat] += value
        # Newest first (of equal times, the later event first); a late event lands at its
        # place in time. The sort is stable, so that is all it changes.
        recent = sorted(new[::-1] + stored, key=lambda pair: -pair[1])
        recent = recent[: self.config.history_len]
        row: dict[str, Any] = {
            "recent_item_ids": [item for item, _ in recent],
            "recent_ts": [ts for _, ts in recent],
            "last_event_ts": last,
            "session_events": session,
        }
        for w in windows:
            mean = np.divide(sums[w], counts[w], out=np.zeros(n_cat), where=counts[w] > 0)
            row[f"events_{w}d"] = float(np.float32(events[w]))
            row[f"cat_count_{w}d"] = counts[w].astype(np.float32).tolist()
            row[f"cat_mean_{w}d"] = mean.astype(np.float32).tolist()
        return row, len(new)
