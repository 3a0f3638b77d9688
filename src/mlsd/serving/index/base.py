"""The ``VectorIndex`` protocol: maximum inner product search (MIPS) over item embeddings.

A retrieval model scores an item for a query (a user) by the inner product of their
embeddings, so every backend answers "the ``k`` items with the largest ``query · item``",
best first. The shared checks (shapes, dtypes, ids, dimension, padding) live here, so a
backend implements only ``_build``/``_search``/``save``/``load``/``memory_bytes``::

    index = FlatIndex().build(item_ids, item_embeddings)      # (n,) int64, (n, dim) float32
    ids, scores = index.search(user_embeddings, k=100)        # (n_q, 100) each, best first

Cosine similarity is MIPS on unit vectors: pass :func:`l2_normalize` d item and query
embeddings. The backends never normalise on their own, because a two-tower or ALS model's
item norms carry signal (popular items get longer vectors) that cosine would discard.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]

PAD_ID = -1
"""Item id filling a result row that has fewer than ``k`` items (as ``PAD_ITEM`` in retrieval)."""

TIE_MARGIN = 4_096
"""How far past ``k`` an exact index searches to settle a tie at its ``k``-th place (a zero
query ties every item: its search stops there)."""

META_FILE = "index.json"
"""Every saved index directory holds this JSON: backend name, config, dim, ntotal."""

FORMAT_VERSION = 1


class VectorIndex(ABC):
    """Inner-product top-``k`` search over a fixed set of item embeddings.

    Subclasses set ``backend`` (their key in ``INDEX_BACKENDS``) and implement the hooks;
    ``build``/``search`` here validate inputs once for all of them.
    """

    backend: ClassVar[str] = "base"

    def __init__(self) -> None:
        self._dim: int | None = None
        self._ntotal = 0

    # -- the public API -------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Embedding dimension; ``0`` before :meth:`build`."""
        return self._dim or 0

    @property
    def ntotal(self) -> int:
        """Number of indexed items."""
        return self._ntotal

    @property
    def exact(self) -> bool:
        """Whether :meth:`search` returns the true top ``k``, so that a search for fewer
        items gives the first of a wider search's (up to equal scores). Approximate indexes
        may answer a wider search differently."""
        return False

    def build(self, item_ids: npt.ArrayLike, item_embeddings: npt.ArrayLike) -> Self:
        """Index ``item_embeddings`` under ``item_ids``, replacing anything indexed before.

        Args:
            item_ids: ``(n,)`` distinct int64 ids (not :data:`PAD_ID`); search returns these.
            item_embeddings: ``(n, dim)`` float32 (other float dtypes are converted), finite.

        Returns:
            ``self``.
        """
        ids, embeddings = check_items(item_ids, item_embeddings)
        self._build(ids, embeddings)
        self._dim = embeddings.shape[1]
        self._ntotal = len(ids)
        return self

    def search(self, queries: npt.ArrayLike, k: int) -> tuple[IntArray, FloatArray]:
        """The ``k`` items with the largest inner product with each query.

        Args:
            queries: ``(n_q, dim)`` float32 query embeddings (a ``(dim,)`` vector is one query).
            k: results per query, >= 1; beyond :attr:`ntotal` rows are padded.

        Returns:
            ``item_ids`` ``(n_q, k)`` int64, best first, :data:`PAD_ID` at padding;
            ``scores`` ``(n_q, k)`` float32 inner products, non-increasing, ``-inf`` at padding.
            Equal scores go to the lower item id, also for the last places of the list, as
            offline top-k lists give them (:func:`~mlsd.models.retrieval.topk.top_k_items`):
            a search of any width, and a wider one cut to ``k``, agree (exact indexes).
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"{type(self).__name__}.search: k={k!r}; expected an int >= 1")
        if self._dim is None or self._ntotal == 0:
            raise ValueError(
                f"{type(self).__name__} is empty: call build(item_ids, item_embeddings) "
                "(or load a saved index) before search"
            )
        q = check_queries(queries, self._dim, where=f"{type(self).__name__}.search")
        k = int(k)
        if len(q) == 0:
            return np.empty((0, k), np.int64), np.empty((0, k), np.float32)
        ids, scores = self._ties_to_lower_ids(q, min(k, self._ntotal))
        return pad_results(ids, scores, k)

    def _ties_to_lower_ids(self, queries: FloatArray, n: int) -> tuple[IntArray, FloatArray]:
        """:meth:`_search` for ``n`` items a query, equal scores going to the lower item id.

        A backend's heap keeps and orders tied items by its own storage order, and a wider
        search keeps others (ALS gives every item without training events the same zero
        vector: they all score 0). So an exact index searches each query one item wider, and
        a query whose last item still ties its ``n``-th again, :data:`TIE_MARGIN` items wider
        (or every item: one more pass over the vectors, where doubling the width would cost
        one pass each time); the rows are then sorted by (score descending, item id) and cut
        to ``n``. An approximate index may find other items in a wider search anyway: it
        orders the tied items it found.
        """
        n_q = len(queries)
        out_ids = np.empty((n_q, n), dtype=np.int64)
        out_scores = np.empty((n_q, n), dtype=np.float32)
        rows = np.arange(n_q)
        limit = min(self._ntotal, n + TIE_MARGIN) if self.exact else n
        width = min(n + 1, limit)
        first = True
        while len(rows):
            ids, scores = self._search(queries[rows], width)
            self._searched(rows, n_q, first=first)
            scores = np.where(ids == PAD_ID, -np.inf, scores).astype(np.float32, copy=False)
            nth = scores[:, n - 1]
            open_ = (scores[:, -1] == nth) & np.isfinite(nth) & (width < limit)
            done = ~open_
            order = np.lexsort((ids[done], -scores[done]), axis=1)[:, :n]
            out_ids[rows[done]] = np.take_along_axis(ids[done], order, axis=1)
            out_scores[rows[done]] = np.take_along_axis(scores[done], order, axis=1)
            rows, width, first = rows[open_], limit, False
        return out_ids, out_scores

    def _searched(self, rows: IntArray, n_queries: int, *, first: bool) -> None:  # noqa: B027
        """After each :meth:`_search` of one :meth:`search`, with the queries it searched
        (``rows`` of ``n_queries``): a backend keeping per-query figures of a search merges
        them here (nothing by default)."""

    @abstractmethod
    def memory_bytes(self) -> int:
        """Estimated bytes the index holds in memory (vectors, graph or codes, id map)."""

    @abstractmethod
    def save(self, path: Path) -> None:
        """Write the index into the directory ``path`` (created if missing); no pickle."""

    @classmethod
    @abstractmethod
    def load(cls, path: Path) -> Self:
        """Read an index written by :meth:`save` of the same backend."""

    # -- the hooks ------------------------------------------------------------------------

    @abstractmethod
    def _build(self, item_ids: IntArray, item_embeddings: FloatArray) -> None:
        """Index checked inputs: ids ``(n,)`` int64 distinct, embeddings ``(n, dim)`` float32."""

    @abstractmethod
    def _search(self, queries: FloatArray, k: int) -> tuple[IntArray, FloatArray]:
        """Top-``k`` (``k <= ntotal``) of checked queries; ids may hold :data:`PAD_ID`."""

    # -- helpers for save/load ------------------------------------------------------------

    def _meta(self, config: dict[str, Any]) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "backend": self.backend,
            "dim": self.dim,
            "ntotal": self.ntotal,
            "config": config,
        }

    @classmethod
    def _read_meta(cls, path: Path) -> dict[str, Any]:
        meta_path = Path(path) / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: {path} is not a saved vector index")
        meta: dict[str, Any] = json.loads(meta_path.read_text())
        if meta.get("backend") != cls.backend:
            raise ValueError(
                f"{meta_path}: backend {meta.get('backend')!r}, but {cls.__name__}.load reads "
                f"{cls.backend!r}; use mlsd.serving.index.load_index to dispatch on the file"
            )
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{meta_path}: format_version {meta.get('format_version')!r}, expected "
                f"{FORMAT_VERSION}; rebuild the index with this version of mlsd"
            )
        return meta


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    """Write ``index.json`` into the directory ``path`` (created if missing)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def check_items(
    item_ids: npt.ArrayLike, item_embeddings: npt.ArrayLike
) -> tuple[IntArray, FloatArray]:
    """Validated ``(n,)`` int64 ids and C-contiguous ``(n, dim)`` float32 embeddings."""
    ids = np.asarray(item_ids)
    embeddings = np.asarray(item_embeddings)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"item_ids: shape {ids.shape} dtype {ids.dtype}; expected (n,) integers")
    if embeddings.ndim != 2 or not np.issubdtype(embeddings.dtype, np.floating):
        raise ValueError(
            f"item_embeddings: shape {embeddings.shape} dtype {embeddings.dtype}; "
            "expected (n_items, dim) floats"
        )
    if len(ids) != len(embeddings):
        raise ValueError(
            f"item_ids has {len(ids)} ids but item_embeddings has {len(embeddings)} rows; "
            "expected one id per row"
        )
    if len(ids) == 0 or embeddings.shape[1] == 0:
        raise ValueError(
            f"item_embeddings has shape {embeddings.shape}: cannot build an index of no items "
            "or of zero-dimensional embeddings"
        )
    ids = ids.astype(np.int64, copy=False)
    if (ids == PAD_ID).any():
        raise ValueError(f"item_ids contains {PAD_ID}, the padding id of search results")
    unique, counts = np.unique(ids, return_counts=True)
    if len(unique) != len(ids):
        raise ValueError(f"item_ids are not distinct; repeated: {unique[counts > 1][:5].tolist()}")
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if not np.isfinite(embeddings).all():
        bad = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
        raise ValueError(f"item_embeddings has NaN/inf in rows {bad[:5].tolist()}")
    return ids, embeddings


def check_queries(queries: npt.ArrayLike, dim: int, *, where: str) -> FloatArray:
    """C-contiguous ``(n_q, dim)`` float32 queries; a ``(dim,)`` vector becomes one row."""
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != dim or not np.issubdtype(q.dtype, np.number):
        raise ValueError(
            f"{where}: queries have shape {q.shape} dtype {q.dtype}; expected "
            f"(n_queries, {dim}) floats, the index's embedding dimension is {dim}"
        )
    q = np.ascontiguousarray(q, dtype=np.float32)
    if not np.isfinite(q).all():
        raise ValueError(f"{where}: queries contain NaN or inf")
    return q


def pad_results(ids: IntArray, scores: FloatArray, k: int) -> tuple[IntArray, FloatArray]:
    """Widen ``(n_q, <=k)`` results to ``(n_q, k)``; padding is :data:`PAD_ID` / ``-inf``."""
    n_q, width = ids.shape
    out_ids = np.full((n_q, k), PAD_ID, dtype=np.int64)
    out_scores = np.full((n_q, k), -np.inf, dtype=np.float32)
    out_ids[:, :width] = ids
    out_scores[:, :width] = np.where(ids == PAD_ID, -np.inf, scores)
    return out_ids, out_scores


def l2_normalize(embeddings: npt.ArrayLike) -> FloatArray:
    """Rows scaled to unit length (zero rows stay zero): MIPS on the result is cosine search."""
    x = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def recall_at_k(approx_ids: npt.ArrayLike, exact_ids: npt.ArrayLike, k: int) -> float:
    """Share of the exact top-``k`` that the approximate top-``k`` found, averaged over queries.

    Padding (:data:`PAD_ID`) in ``exact_ids`` is not counted as a relevant item, so a query
    with fewer than ``k`` items has a recall out of what exists. Higher is better; 1.0 is exact.

    Args:
        approx_ids: ``(n_q, >=k)`` ids from the index under test, best first.
        exact_ids: ``(n_q, >=k)`` ids from exact search, best first.
    """
    approx = np.asarray(approx_ids)[:, :k]
    exact = np.asarray(exact_ids)[:, :k]
    if approx.shape[0] != exact.shape[0] or approx.shape[1] < k or exact.shape[1] < k:
        raise ValueError(
            f"recall_at_k: approx_ids {np.shape(approx_ids)} and exact_ids "
            f"{np.shape(exact_ids)} must both be (n_queries, >= {k})"
        )
    hits = 0
    relevant = 0
    for found, truth in zip(approx, exact, strict=True):
        truth_set = set(truth[truth != PAD_ID].tolist())
        relevant += len(truth_set)
        hits += len(truth_set.intersection(found.tolist()))
    return hits / relevant if relevant else 1.0
