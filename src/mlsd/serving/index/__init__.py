"""The ANN index of the serving path: top-``k`` inner-product search over item embeddings.

Backends are chosen from an explicit registry (:data:`INDEX_BACKENDS`), each with its typed
config beside it::

    from mlsd.serving.index import choose_index, load_index
    index = choose_index(len(item_ids), dim).build(item_ids, item_embeddings)
    index.save(path)                       # a directory; no pickle
    ids, scores = load_index(path).search(user_embeddings, k=100)

Faiss (``flat``, ``hnsw``, ``ivf``) runs in process, the embedded default; ``milvus`` is the
production vector database (milvus-lite on a local ``.db`` file, the same client API as a
server). ``bench/ann.py`` measures them on 1M ALS item embeddings.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import numpy.typing as npt

from mlsd.serving.index.base import (
    META_FILE,
    PAD_ID,
    VectorIndex,
    l2_normalize,
    recall_at_k,
)
from mlsd.serving.index.faiss_index import (
    FlatConfig,
    FlatIndex,
    HNSWConfig,
    HNSWIndex,
    IVFConfig,
    IVFIndex,
)
from mlsd.serving.index.milvus_index import MilvusConfig, MilvusIndex

__all__ = [
    "FLAT_MAX_ITEMS",
    "HNSW_MAX_ITEMS",
    "INDEX_BACKENDS",
    "PAD_ID",
    "TIERED_MAX_SCAN",
    "FlatConfig",
    "FlatIndex",
    "HNSWConfig",
    "HNSWIndex",
    "IVFConfig",
    "IVFIndex",
    "MilvusConfig",
    "MilvusIndex",
    "VectorIndex",
    "choose_index",
    "default_pq_m",
    "index_for_queries",
    "l2_normalize",
    "load_index",
    "recall_at_k",
]

INDEX_BACKENDS: dict[str, type[VectorIndex]] = {
    "flat": FlatIndex,
    "hnsw": HNSWIndex,
    "ivf": IVFIndex,
    "milvus": MilvusIndex,
}
"""Backend name (``index.json``'s ``backend``) → implementation."""

FLAT_MAX_ITEMS = 50_000
"""Exact search up to here. Measured by ``bench/ann.py`` (``flat_scaling``, dim 64, one
thread): one query against 50K items takes p50 0.31 ms / p99 0.51 ms, inside a 1 ms budget
with no build, no tuning and recall 1; at 100K items p99 is 1.22 ms, over the budget."""

HNSW_MAX_ITEMS = 5_000_000
"""HNSW up to here, IVF-PQ beyond: a memory decision. On 1M items of dim 64 (``bench/ann.py``)
HNSW m=32 reaches recall@100 0.95 at p99 0.44 ms but holds 536 MB (full vectors + graph), so
~2.7 GB at 5M; IVF-PQ with 16 bytes/item holds 32 MB per million. IVF-PQ costs recall (0.82
at best on the ALS vectors, re-ranked): measure it on your embeddings before relying on it."""


def choose_index(
    n_items: int,
    dim: int,
    *,
    flat_max_items: int = FLAT_MAX_ITEMS,
    hnsw_max_items: int = HNSW_MAX_ITEMS,
    flat: FlatConfig | None = None,
    hnsw: HNSWConfig | None = None,
    ivf: IVFConfig | None = None,
) -> VectorIndex:
    """An unbuilt index suited to ``n_items`` embeddings of ``dim``.

    Flat (exact) below ``flat_max_items``, HNSW below ``hnsw_max_items``, IVF-PQ above (with
    ``pq_m = dim // 4`` sub-vectors and exact re-ranking unless ``ivf`` says otherwise). The
    thresholds' measured reasons are on :data:`FLAT_MAX_ITEMS` and :data:`HNSW_MAX_ITEMS`.

    Embeddings whose norms are long-tailed (ALS / matrix factorisation: popular items get
    long vectors) are the exception to measure for: there ``FlatIndex(FlatConfig(norm_tiers=
    True))`` found the exact top 100 of all 1,000 test queries at 1M items with p99 0.90 ms
    (0.48 ms with ``max_scan=50_000``, still recall 1.0 there), while HNSW and IVF stall near
    0.955 and 0.91 recall@100.
    """
    if n_items < 1 or dim < 1:
        raise ValueError(f"choose_index: n_items={n_items}, dim={dim}; both must be >= 1")
    if n_items < flat_max_items:
        return FlatIndex(flat or FlatConfig())
    if n_items < hnsw_max_items:
        return HNSWIndex(hnsw or HNSWConfig())
    if ivf is None:
        ivf = IVFConfig(pq_m=default_pq_m(dim), refine_factor=4)
    elif ivf.pq_m is None:
        ivf = dataclasses.replace(ivf, pq_m=default_pq_m(dim))
    return IVFIndex(ivf)


TIERED_MAX_SCAN = 100_000
"""Exact norm-tiered search when a sample of real queries scans at most this many items at
p99: about 1 ms of one core, the budget :data:`FLAT_MAX_ITEMS` keeps. On the 1M-item ALS
vectors of the serving benchmark's world (dim 32, k = 256: a request's 200 candidates plus a
history of up to 50 items), 73% of the queries need only the first 16K items and 99% at most
70K: 0.19 ms a query against HNSW's 0.44 (0.115 against 0.43 ms in batches), and exact where
HNSW found ~93% of the true top 200."""


def index_for_queries(
    item_ids: npt.ArrayLike,
    item_embeddings: npt.ArrayLike,
    queries: npt.ArrayLike,
    *,
    k: int = 256,
    sample: int = 512,
    max_scan: int = TIERED_MAX_SCAN,
    flat_max_items: int = FLAT_MAX_ITEMS,
    hnsw_max_items: int = HNSW_MAX_ITEMS,
    tiers: FlatConfig | None = None,
    seed: int = 0,
) -> VectorIndex:
    """A built index for these items, chosen by how known queries search them.

    When the query vectors are known at build time (a factor model's user vectors), exact
    search over the items in decreasing-norm tiers (:class:`FlatConfig` ``norm_tiers``) is
    tried on ``sample`` of them at top-``k``: if 99% of them stop within ``max_scan`` items, it
    is the index (exact, and on long-tailed norms faster than a graph). Otherwise, or for a
    catalog small enough for plain exact search, :func:`choose_index` decides by size.

    Args:
        item_ids, item_embeddings: what :meth:`VectorIndex.build` takes.
        queries: ``(n, dim)`` query vectors the index will see, or a representative sample.
        k: results per query of the trial (a serving request asks for its candidates plus
            its history's length).
        tiers: the tiered index's config (default ``FlatConfig(norm_tiers=True)``).
    """
    config = tiers if tiers is not None else FlatConfig(norm_tiers=True)
    if not config.norm_tiers:
        raise ValueError("index_for_queries: tiers must have norm_tiers=True")
    ids = np.asarray(item_ids, dtype=np.int64)
    vectors = np.asarray(item_embeddings, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"index_for_queries: item_embeddings of shape {vectors.shape}")
    n_items, dim = vectors.shape
    by_size = choose_index(
        max(n_items, 1), max(dim, 1), flat_max_items=flat_max_items, hnsw_max_items=hnsw_max_items
    )
    known = np.asarray(queries, dtype=np.float32).reshape(-1, dim)
    if isinstance(by_size, FlatIndex) or len(known) == 0:
        return by_size.build(ids, vectors)
    rng = np.random.default_rng(seed)
    trial = known[rng.choice(len(known), min(sample, len(known)), replace=False)]
    tiered = FlatIndex(config).build(ids, vectors)
    tiered.search(trial, min(k, n_items))
    if float(np.percentile(tiered.last_scanned_, 99)) <= max_scan:
        return tiered
    return by_size.build(ids, vectors)


def default_pq_m(dim: int) -> int:
    """Largest divisor of ``dim`` that is at most ``dim // 4`` (4-dim sub-vectors), >= 1."""
    return max(m for m in range(1, max(dim // 4, 1) + 1) if dim % m == 0)


def load_index(path: Path) -> VectorIndex:
    """Load a saved index of any backend, dispatching on ``index.json``'s ``backend``."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: {path} is not a saved vector index")
    backend = json.loads(meta_path.read_text()).get("backend")
    if backend not in INDEX_BACKENDS:
        raise ValueError(
            f"{meta_path}: unknown backend {backend!r}; known: {sorted(INDEX_BACKENDS)}"
        )
    return INDEX_BACKENDS[backend].load(Path(path))
