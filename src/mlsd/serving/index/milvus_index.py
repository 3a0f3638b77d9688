"""Milvus backend: the item embeddings live in a Milvus collection, searched with inner product.

``MilvusConfig.uri`` picks the deployment: a local path ending in ``.db`` runs milvus-lite
inside this process (pymilvus starts its gRPC server on a loopback port), an ``http://``
address is a Milvus server. The client code is the same for both. Item ids are the
collection's int64 primary keys, so no id map is kept here.

``build`` follows Milvus's bulk-load order: create the collection without an index, insert
in batches, flush, create the index, wait for it, load. Building the index after the data is
in sealed segments means ``load`` returns with every segment indexed (milvus-lite 3.2 would
otherwise index freshly flushed segments in a background thread and brute-force them until
then). ``save`` writes only ``index.json`` (uri, collection, config, build id); the vectors
stay in Milvus. A milvus-lite database is opened at its absolute path (a relative ``uri`` is
resolved against the working directory when the index first connects), and ``save`` records
that path relative to the save directory when the database lies inside it, else absolute:
an index saved next to its database (``export_source`` puts it in the index directory) loads
from any working directory and moves with its directory. Each build stamps its collection
with a fresh id (the collection property ``mlsd.build_id``) and ``load`` checks it, so a saved
index never answers from a collection another build has since replaced under the same name,
even one of the same size.

Index types: ``FLAT``, ``HNSW``, ``IVF_FLAT``, ``IVF_SQ8`` everywhere; ``IVF_PQ`` on a
Milvus server only (milvus-lite 3.2 does not build it). Build parameters are sent in the
``params`` JSON field, the form both milvus-lite and Milvus servers read (milvus-lite 3.2
ignores the flattened ``M=...`` form that ``IndexParams.add_index`` would otherwise send).
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np

from mlsd.serving.index.base import PAD_ID, FloatArray, IntArray, VectorIndex, write_meta

ID_FIELD = "id"
VECTOR_FIELD = "embedding"
LITE_KEEPALIVE_MS = 3_600_000
MAX_TOP_K = 16_384
"""Milvus's largest ``limit`` per search."""

MILVUS_INDEX_TYPES: dict[str, tuple[dict[str, int], dict[str, int]]] = {
    "FLAT": ({}, {}),
    "HNSW": ({"M": 32, "efConstruction": 200}, {"ef": 128}),
    "IVF_FLAT": ({"nlist": 1024}, {"nprobe": 32}),
    "IVF_SQ8": ({"nlist": 1024}, {"nprobe": 32}),
    "IVF_PQ": ({"nlist": 1024, "m": 16, "nbits": 8}, {"nprobe": 32}),
}
"""Supported index type → (default build params, default search params). An IVF type's
default ``nlist`` is the catalog's (:func:`~mlsd.serving.index.faiss_index.default_nlist`, as
the Faiss backend sizes it) at build time, and ``nprobe`` at most that: a fixed 1,024 cells
left a 500-item catalog's cells mostly empty, and a search of 32 of them returned 32 items
where 100 were asked for."""

LITE_SUFFIX = ".db"
"""A ``uri`` ending so is a milvus-lite database file; anything else a Milvus server."""

URI_IN_INDEX_DIR = "uri_in_index_dir"
"""``index.json`` key: true when ``config.uri`` is relative to the saved index's directory."""

BUILD_PROPERTY = "mlsd.build_id"
"""Collection property holding the id of the build that created it (checked by ``load``)."""


@dataclass(frozen=True)
class MilvusConfig:
    """Where the collection lives and how it is indexed.

    Attributes:
        uri: ``"path/items.db"`` (milvus-lite; a relative path is resolved against the working
            directory when the index connects) or ``"http://host:19530"`` (a Milvus server).
        collection: collection name; ``build`` drops and recreates it (indexes that must live
            side by side need names of their own).
        index_type: one of :data:`MILVUS_INDEX_TYPES`.
        params: build parameters (e.g. ``{"M": 32, "efConstruction": 200}``); ``None``: the
            index type's defaults.
        search_params: per-search parameters (e.g. ``{"ef": 128}``, ``{"nprobe": 32}``);
            ``None``: the defaults. HNSW's ``ef`` is raised to ``k`` when smaller.
        insert_batch: rows per insert request (Milvus caps a request at 64 MB).
        index_timeout_s: seconds to wait for a server to finish building the index.
    """

    uri: str = "milvus_items.db"
    collection: str = "item_embeddings"
    index_type: str = "HNSW"
    params: dict[str, int] | None = None
    search_params: dict[str, int] | None = None
    insert_batch: int = 10_000
    index_timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.index_type not in MILVUS_INDEX_TYPES:
            raise ValueError(
                f"MilvusConfig.index_type={self.index_type!r}; expected one of "
                f"{sorted(MILVUS_INDEX_TYPES)}"
            )
        if self.insert_batch < 1:
            raise ValueError(f"MilvusConfig.insert_batch={self.insert_batch}: must be >= 1")

    @property
    def build_params(self) -> dict[str, int]:
        return dict(MILVUS_INDEX_TYPES[self.index_type][0] if self.params is None else self.params)

    @property
    def query_params(self) -> dict[str, int]:
        defaults = MILVUS_INDEX_TYPES[self.index_type][1]
        return dict(defaults if self.search_params is None else self.search_params)


def absolute(path: Path | str) -> Path:
    """``path`` made absolute against the working directory, ``..`` folded (no symlink is
    followed: the path stays the one given)."""
    return Path(os.path.abspath(path))


class MilvusIndex(VectorIndex):
    """Inner-product search in a Milvus collection (milvus-lite or a server)."""

    backend = "milvus"

    def __init__(self, config: MilvusConfig | None = None) -> None:
        super().__init__()
        self.config = config or MilvusConfig()
        self._client: Any = None
        self._build_id: str | None = None

    def _connect(self) -> Any:
        """The pymilvus client, created on first use (constructing an index opens nothing)."""
        if self._client is not None:
            return self._client
        from pymilvus import MilvusClient

        if not self.config.uri.endswith(LITE_SUFFIX):  # a Milvus server
            self._client = MilvusClient(uri=self.config.uri)
            return self._client
        # The database this index uses, wherever the process goes next (save records it).
        database = absolute(self.config.uri)
        self.config = dataclasses.replace(self.config, uri=str(database))
        database.parent.mkdir(parents=True, exist_ok=True)
        # milvus-lite's in-process server builds indexes inside the create_index / load call
        # (minutes at 1M items) and answers pymilvus's 10 s keepalive pings with GOAWAY
        # "too_many_pings"; pymilvus then retries create_index, which fails with "index
        # already exists". A loopback connection needs no keepalive.
        self._client = MilvusClient(
            uri=self.config.uri, grpc_options={"grpc.keepalive_time_ms": LITE_KEEPALIVE_MS}
        )
        return self._client

    def _build(self, item_ids: IntArray, item_embeddings: FloatArray) -> None:
        from pymilvus import DataType, MilvusClient

        self.config = self._sized(len(item_ids))  # before anything is written
        client, name = self._connect(), self.config.collection
        if client.has_collection(name):
            client.drop_collection(name)
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(ID_FIELD, DataType.INT64, is_primary=True)
        schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=item_embeddings.shape[1])
        build_id = uuid.uuid4().hex
        client.create_collection(name, schema=schema, properties={BUILD_PROPERTY: build_id})
        self._build_id = build_id
        batch = self.config.insert_batch
        for start in range(0, len(item_ids), batch):
            rows = zip(
                item_ids[start : start + batch], item_embeddings[start : start + batch], strict=True
            )
            client.insert(name, [{ID_FIELD: int(i), VECTOR_FIELD: v} for i, v in rows])
        client.flush(name)
        index_params = client.prepare_index_params()
        index_params.add_index(
            field_name=VECTOR_FIELD,
            index_type=self.config.index_type,
            metric_type="IP",
            params={"params": self.config.build_params},
        )
        client.create_index(name, index_params)
        self._wait_for_index(len(item_ids))
        client.load_collection(name)

    def _wait_for_index(self, n_items: int) -> None:
        """Poll until the server reports every row indexed (immediate on milvus-lite)."""
        client, name = self._connect(), self.config.collection
        deadline = time.monotonic() + self.config.index_timeout_s
        while True:
            info = client.describe_index(name, VECTOR_FIELD)
            if info.get("indexed_rows", n_items) >= n_items and not info.get("pending_index_rows"):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Milvus at {self.config.uri}: index on {name!r} not finished after "
                    f"{self.config.index_timeout_s} s ({info}); raise index_timeout_s"
                )
            time.sleep(0.5)

    def _search(self, queries: FloatArray, k: int) -> tuple[IntArray, FloatArray]:
        if k > MAX_TOP_K:
            raise ValueError(f"MilvusIndex.search: k={k} exceeds Milvus's limit of {MAX_TOP_K}")
        params = self.config.query_params
        if "ef" in params:
            params["ef"] = max(params["ef"], k)
        results = self._connect().search(
            self.config.collection,
            data=queries,
            limit=k,
            anns_field=VECTOR_FIELD,
            search_params={"metric_type": "IP", "params": params},
            output_fields=[ID_FIELD],
        )
        ids = np.full((len(queries), k), PAD_ID, dtype=np.int64)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        for row, hits in enumerate(results):
            ids[row, : len(hits)] = [hit["id"] for hit in hits]
            scores[row, : len(hits)] = [hit["distance"] for hit in hits]
        return ids, scores

    def set_search(self, **search_params: int) -> Self:
        """Replace the per-search parameters (e.g. ``ef=256``, ``nprobe=64``); returns ``self``."""
        self.config = dataclasses.replace(self.config, search_params=dict(search_params))
        return self

    def _sized(self, n_items: int) -> MilvusConfig:
        """The config with an IVF type's defaults sized for ``n_items`` (the saved index keeps
        them); explicit params are checked, as the Faiss backend checks them."""
        config = self.config
        build, search = config.build_params, config.query_params
        if "nlist" not in build:
            return config
        if config.params is None:
            from mlsd.serving.index.faiss_index import default_nlist

            build["nlist"] = default_nlist(n_items)
        if build["nlist"] > n_items:
            raise ValueError(
                f"MilvusConfig.params nlist={build['nlist']} exceeds the {n_items} items to index"
            )
        if config.search_params is None:
            search["nprobe"] = min(search["nprobe"], build["nlist"])
        return dataclasses.replace(config, params=build, search_params=search)

    def memory_bytes(self) -> int:
        """Estimated bytes of the index in Milvus's memory (vectors, graph or codes, keys)."""
        n, dim, params = self.ntotal, self.dim, self.config.build_params
        per_item = {
            "FLAT": 4 * dim,
            "HNSW": 4 * dim + 8 * params.get("M", 16) + 12,
            "IVF_FLAT": 4 * dim + 8,
            "IVF_SQ8": dim + 8,
            "IVF_PQ": params.get("m", 16) * params.get("nbits", 8) // 8 + 8,
        }[self.config.index_type]
        centroids = 4 * dim * params.get("nlist", 0)
        return n * (per_item + 8) + centroids  # + 8: the int64 primary key

    def close(self) -> None:
        """Close the client connection (milvus-lite's server stops when the process exits)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def save(self, path: Path) -> None:
        """Write ``index.json`` (uri, collection, config, build id) into directory ``path``.

        A milvus-lite database inside ``path`` is recorded relative to it (``load`` resolves
        it against the directory it reads), one elsewhere by its absolute path."""
        if self.ntotal == 0:
            raise ValueError("MilvusIndex is empty: build it before save")
        config = dataclasses.asdict(self.config)
        inside = False
        if self.config.uri.endswith(LITE_SUFFIX):
            database, directory = absolute(self.config.uri), absolute(path)
            inside = database.is_relative_to(directory)
            config["uri"] = str(database.relative_to(directory) if inside else database)
        meta = self._meta(config) | {"build_id": self._build_id, URI_IN_INDEX_DIR: inside}
        write_meta(Path(path), meta)

    @classmethod
    def load(cls, path: Path) -> Self:
        """Reconnect to the collection named in ``path/index.json`` and check that it is the
        one that build saved (its build id) and holds as many items. A uri saved relative to
        the index directory is resolved against ``path``; an older ``index.json``'s relative
        uri, against the working directory, as it was written."""
        meta = cls._read_meta(Path(path))
        config = dict(meta["config"])
        if meta.get(URI_IN_INDEX_DIR):
            config["uri"] = str(absolute(path) / config["uri"])
        loaded = cls(MilvusConfig(**config))
        client, name = loaded._connect(), loaded.config.collection
        if not client.has_collection(name):
            raise ValueError(
                f"{path}: collection {name!r} not found at {loaded.config.uri}; rebuild the index"
            )
        built = meta.get("build_id")
        found = client.describe_collection(name).get("properties", {}).get(BUILD_PROPERTY)
        if built is not None and found != built:
            raise ValueError(
                f"{path}: collection {name!r} at {loaded.config.uri} is build {found!r}, not "
                f"the saved build {built!r}: another index was built under that name since "
                "save; rebuild this index (or give each index a collection of its own)"
            )
        client.load_collection(name)
        n_rows = int(client.get_collection_stats(name)["row_count"])
        if n_rows != meta["ntotal"]:
            raise ValueError(
                f"{path}: index.json says {meta['ntotal']} items, collection {name!r} at "
                f"{loaded.config.uri} holds {n_rows}; it changed since save, rebuild the index"
            )
        loaded._dim = int(meta["dim"])
        loaded._ntotal = n_rows
        loaded._build_id = built
        return loaded
