"""What a user's and an item's online features cost in Redis, measured on a live server.

The capacity plan (:mod:`mlsd.plan.capacity`) sizes the online feature store from these
figures. They are measured rather than computed: Feast's Redis layout (one hash per entity,
a field per feature named by a hash of view and feature, each value a serialized
``ValueProto``, a timestamp field per view) and Redis's encoding of a hash (a compact listpack
for small ones, a hash table past 128 fields or 64-byte values) together decide the bytes, and
list features (a user's recent items) vary in length with the data. So
:func:`redis_bytes_per_entity` writes real rows of a materialized repository's sources, through
the same Feast write the online store is loaded with, into a project of its own on the given
server, and reads Redis's ``used_memory`` as each entity's views are written: the second half
of the rows over what their writing added (the first half takes the fixed costs, a fresh
connection's buffers and the first keys' bookkeeping, which a store of millions does not pay
per entity)::

    footprint = redis_bytes_per_entity(Path("world/feature_repo"), "127.0.0.1:6379")
    footprint.bytes_per_user, footprint.bytes_per_item

The keys it wrote are deleted afterwards (Feast's ``teardown`` of its project). The server
should be otherwise idle while it runs: another client's writes would be counted too.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mlsd.data.schema import ContractError
from mlsd.features.definitions import feature_set
from mlsd.features.store import (
    DATA_DIR,
    ITEMS_SOURCE,
    USERS_SOURCE,
    FeatureStoreConfig,
    generate_repo,
    load_config,
    online_views,
    open_store,
)
from mlsd.features.store import apply as apply_repo

DEFAULT_ROWS = 5_000
"""Entities of each kind written: enough that Redis's own bookkeeping (its key table's growth
in powers of two) averages out to within a few percent."""


@dataclass(frozen=True)
class Footprint:
    """Redis ``used_memory`` per entity of the online feature store.

    Attributes:
        bytes_per_user: a user's key with its static and dynamic views.
        bytes_per_item: an item's key with its view.
        users: users written to measure it.
        items: items written to measure it.
        views: the views each entity's key holds.
    """

    bytes_per_user: float
    bytes_per_item: float
    users: int
    items: int
    views: dict[str, list[str]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def redis_client(connection: str) -> Any:
    """A ``redis.Redis`` for Feast's connection string ``host:port[,param=value...]`` (values
    read as JSON where they parse, as Feast reads them: ``db=1``, ``ssl=true``; Feast's own
    parser is private to its online store)."""
    import redis

    nodes = [part for part in connection.split(",") if "=" not in part]
    if len(nodes) != 1 or ":" not in nodes[0]:
        raise ValueError(
            f"redis connection {connection!r}: expected one host:port (a cluster's "
            "several nodes are not measured)"
        )
    host, port = nodes[0].rsplit(":", 1)
    params: dict[str, Any] = {}
    for part in connection.split(","):
        if "=" in part:
            key, value = part.split("=", 1)
            try:
                params[key] = json.loads(value)
            except json.JSONDecodeError:
                params[key] = value
    return redis.Redis(host=host, port=int(port), **params)


def _first_rows(path: Path, rows: int) -> pd.DataFrame:
    """The first ``rows`` rows of a Parquet file, reading no more row groups than they span."""
    batches, n = [], 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=rows):
        batches.append(batch)
        n += batch.num_rows
        if n >= rows:
            break
    if not batches:
        return pd.DataFrame()
    return pa.Table.from_batches(batches).slice(0, rows).to_pandas()


def redis_bytes_per_entity(
    repo_dir: Path, redis_connection: str, *, rows: int = DEFAULT_ROWS
) -> Footprint:
    """Write up to ``rows`` users and ``rows`` items of ``repo_dir``'s materialized sources to
    the Redis at ``redis_connection`` (Feast's ``host:port[,param=value...]``) and measure what
    each costs there.

    Raises:
        ContractError: ``repo_dir`` has no materialized source, or one with fewer than 2 rows.
        ValueError: ``rows`` < 2 (the cost is the second half's).
    """
    if rows < 2:
        raise ValueError(f"redis_bytes_per_entity: rows must be >= 2, got {rows}")
    repo_dir = Path(repo_dir).resolve()
    features = feature_set(load_config(repo_dir))
    sources = {name: repo_dir / DATA_DIR / name for name in (USERS_SOURCE, ITEMS_SOURCE)}
    frames = {}
    for name, path in sources.items():
        if not path.is_file():
            raise ContractError(
                f"{path}: not found; materialize the repository first "
                "(mlsd feed features materialize)"
            )
        frames[name] = _first_rows(path, rows)
        if len(frames[name]) < 2:
            raise ContractError(f"{path}: fewer than 2 rows; nothing to measure")
    views = {
        source: [view for view, loaded_from in online_views(features) if loaded_from == source]
        for source in (USERS_SOURCE, ITEMS_SOURCE)
    }
    client = redis_client(redis_connection)

    def used_memory() -> int:
        return int(client.info("memory")["used_memory"])

    project = f"mlsd_footprint_{secrets.token_hex(4)}"
    store_config = FeatureStoreConfig("redis", redis_connection, project=project)
    with tempfile.TemporaryDirectory(prefix="mlsd-footprint-") as tmp:
        repo = generate_repo(Path(tmp) / "repo", features, store_config)
        # Feast prints to stdout; keep stdout for the caller's output (e.g. JSON).
        with contextlib.redirect_stdout(sys.stderr):
            apply_repo(repo)
            store = open_store(repo)
            try:
                used = []
                for source in (USERS_SOURCE, ITEMS_SOURCE):
                    frame = frames[source]
                    # The second half's cost: a fresh connection's buffers and the first
                    # keys' bookkeeping land in the first half, and cost nothing per entity.
                    half = len(frame) // 2
                    marks = []
                    for part in (frame.iloc[:half], frame.iloc[half:]):
                        for view in views[source]:
                            store.write_to_online_store(view, part, transform_on_write=False)
                        marks.append(used_memory())
                    used.append((marks[1] - marks[0]) / (len(frame) - half))
            finally:
                store.teardown()
                client.close()
    return Footprint(
        bytes_per_user=used[0],
        bytes_per_item=used[1],
        users=len(frames[USERS_SOURCE]),
        items=len(frames[ITEMS_SOURCE]),
        views={"user": views[USERS_SOURCE], "item": views[ITEMS_SOURCE]},
    )
