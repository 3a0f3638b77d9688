"""Candidate sources in serving form: one request, answered from a safe artifact.

Offline, a retriever's ``recommend`` reads each user's history *as of fit time*. Online, a
:class:`CandidateSource` reads a :class:`UserQuery`, what the feature store knows at request
time, and recomputes the offline ranks and scores the ranker learned from. Given the fit-time
history (every event before the cutoff, in time order) and ``now_s`` = the cutoff, a fit-time
user gets the offline answer:

- ``popular``, ``covisitation``, ``ease``: the same items and float32 scores (the same sparse
  products in the same order). Co-visitation ranks the history by position (newest last);
  offline, two events of a user at the very same time are ordered by the events table. With a
  ``half_life_days``, EASE decays to ``now_s`` in whole seconds (offline: µs): float32 rounding.
- ``factors`` (ALS, BPR; ``name`` says which): fit-time users search the index with their
  stored factor (events since the fit do not move it); ``two_tower`` runs the user tower on
  the query (hour and weekday averaged, as ``recommend`` does, unless ``request_context``).
  Faiss and BLAS sum in other orders, so scores agree to float32 rounding and near-ties may
  swap; an approximate index (HNSW, IVF) adds its recall.
- A query with nothing to go on (no catalog item in the history, for EASE and the ALS fold-in
  no history item with training events, no attribute the tower reads, not a fit-time ALS/BPR
  user) gets the fitted fallback, time-decayed popularity: the offline cold-user answer.
  Except ALS, which *folds in* an unknown user's history with ``implicit``'s closed form
  ``x = (YᵀY + λI + Σ (c_i − 1) y_i y_iᵀ)⁻¹ Σ c_i y_i``, ``c_i = alpha × events``; offline
  that user was cold, so there is nothing to match. BPR has no closed form.
- ``segment_popularity``: the offline list of the query's attributes, bit for bit, for any
  combination of them, including one no fit-time user had.

Each source is exact only for the history it is given: EASE and the ALS fold-in count every
event, co-visitation reads the last ``last_n`` distinct items, the two-tower the last
``history_len`` events. ``exclude`` is the caller's (offline: everything seen before the cutoff).

Batch prediction asks each source for many queries at once (:func:`candidates_matrix`:
``(n, k)`` rows padded with ``PAD_ID``, each row the query's own answer; an index is searched
once per request width, as approximate indexes answer a wider search differently). Membership
tests use :func:`isin` and :func:`~mlsd.serving.rerank.rows_isin` (binary searches) rather than
``np.isin``, which fills a table as wide as the id range (5x slower per request at 1M items)
and takes one call per row of a batch. A request's co-visitation scores are the history's
rows summed with numpy (:meth:`CovisitationSource.history_product`: scipy's float32 sums in
scipy's order) rather than by a scipy product, whose row slicing and two sparse matrices per
request cost ~4x the arithmetic.

Artifact layout, a directory written by ``mlsd.models.retrieval.export.export_source``; no
pickle: JSON, ``.npz`` read with ``allow_pickle=False``, a :mod:`mlsd.serving.index` directory,
a torch state dict read with ``weights_only=True``::

    source.json        format_version, kind, name, the kind's parameters
    fallback.npz       item_ids, scores: cold-user popularity, best first   (all but popular)
    popular.npz        item_ids, scores, best first                         (popular)
    covisitation.npz   item_ids, indptr, indices, data: item × item CSR     (covisitation)
    factors.npz        user_ids, user_factors, item_ids, item_factors       (factors)
    ease.npz           item_ids, active_items, weights                      (ease)
    two_tower.npz      item_ids; user_tower.pt: the user tower state dict   (two_tower)
    segments.npz       profile_levels, top_ids, top_scores: each profile's list; item_ids,
                       tables, table_starts: per-column score tables        (segment_popularity)
    index/             item factors / item embeddings in a VectorIndex      (factors, two_tower)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pickle
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
import torch

from mlsd.models.retrieval.segment_popularity import mean_of_tables
from mlsd.models.retrieval.two_tower import FeatureSizes, TwoTowerConfig, UserFeatures, UserTower
from mlsd.serving.index import PAD_ID, VectorIndex, load_index
from mlsd.serving.index.base import FloatArray, IntArray
from mlsd.serving.rerank import first_k, rows_isin

FORMAT_VERSION = 1
SOURCE_FILE = "source.json"
FALLBACK_FILE = "fallback.npz"
POPULAR_FILE = "popular.npz"
SEGMENT_FILE = "segments.npz"
SEGMENT_TOP_N = 2_000
"""Items kept per attribute profile: the lists serve k + len(history) items at most."""
COVISITATION_FILE = "covisitation.npz"
FACTORS_FILE = "factors.npz"
EASE_FILE = "ease.npz"
TWO_TOWER_FILE = "two_tower.npz"
USER_TOWER_FILE = "user_tower.pt"
INDEX_DIR = "index"
SECONDS_PER_DAY = 86_400.0


@dataclass(frozen=True, eq=False)
class UserQuery:
    """What the online feature store knows about the user at request time.

    Attributes:
        user_id: the user, ``None`` for an anonymous visitor.
        history: ``(n,)`` int64 recent item ids, oldest → newest (repeats kept).
        history_ts: ``(n,)`` int64 epoch seconds of each history event.
        attributes: static user attributes (``users.parquet`` columns, as strings).
        now_s: the request time, epoch seconds.
    """

    user_id: int | None
    history: IntArray
    history_ts: IntArray
    attributes: Mapping[str, str]
    now_s: int

    def __post_init__(self) -> None:
        history = np.asarray(self.history, dtype=np.int64).reshape(-1)
        history_ts = np.asarray(self.history_ts, dtype=np.int64).reshape(-1)
        if history.shape != history_ts.shape:
            raise ValueError(
                f"UserQuery: {len(history)} history items but {len(history_ts)} history_ts; "
                "expected one timestamp (epoch seconds) per item"
            )
        object.__setattr__(self, "history", history)
        object.__setattr__(self, "history_ts", history_ts)


@runtime_checkable
class CandidateSource(Protocol):
    """One candidate source of the request path."""

    name: str

    def candidates(
        self, query: UserQuery, k: int, *, exclude: npt.ArrayLike = ()
    ) -> tuple[IntArray, FloatArray]:
        """Up to ``k`` items for ``query``, best first, never an item of ``exclude``.

        Returns:
            ``item_ids`` ``(m,)`` int64 and ``scores`` ``(m,)`` float32, ``m <= k``.
        """
        ...


@dataclass(frozen=True)
class RankedItems:
    """A fixed list, best first: ``item_ids`` ``(n,)`` int64, ``scores`` ``(n,)`` float32."""

    item_ids: IntArray
    scores: FloatArray

    @classmethod
    def from_scores(cls, item_ids: npt.ArrayLike, scores: npt.ArrayLike) -> RankedItems:
        """Order by score, ties by item id (as offline ``top_k_items``); drop non-finite."""
        ids = np.asarray(item_ids, dtype=np.int64)
        values = np.asarray(scores, dtype=np.float32)
        keep = np.isfinite(values)
        order = np.lexsort((ids[keep], -values[keep]))
        return cls(ids[keep][order], values[keep][order])

    def top(self, k: int, exclude: IntArray) -> tuple[IntArray, FloatArray]:
        """The first ``k`` items not in ``exclude``; reads at most ``k + len(exclude)``."""
        n = min(k + len(exclude), len(self.item_ids))
        keep = np.flatnonzero(~isin(self.item_ids[:n], exclude))[:k]
        return self.item_ids[keep], self.scores[keep]

    def top_many(self, k: int, excludes: Sequence[IntArray]) -> tuple[IntArray, FloatArray]:
        """:meth:`top` of many exclude lists as ``(n, k)`` rows padded with ``PAD_ID`` and
        ``-inf``. A row never reads past ``k + len(exclude)`` items, so reading the longest
        exclude's head for every row changes nothing."""
        longest = max((len(e) for e in excludes), default=0)
        head = min(k + longest, len(self.item_ids))
        ids = np.broadcast_to(self.item_ids[:head], (len(excludes), head))
        scores = np.broadcast_to(self.scores[:head], (len(excludes), head))
        return first_k(ids, scores, ~rows_isin(ids, excludes), k)


def best(ids: IntArray, scores: FloatArray, k: int) -> tuple[IntArray, FloatArray]:
    """Top ``k`` of finite ``scores``, ties by item id (every tie at the k-th score competes)."""
    if len(scores) > k > 0:
        kth = np.partition(scores, len(scores) - k)[len(scores) - k]
        keep = np.flatnonzero(scores >= kth)
        ids, scores = ids[keep], scores[keep]
    order = np.lexsort((ids, -scores))[:k]
    return ids[order], scores[order].astype(np.float32, copy=False)


def catalog_rows(item_ids: IntArray, catalog: IntArray) -> IntArray:
    """Position of each id in the sorted ``catalog``, -1 when absent."""
    if len(catalog) == 0:
        return np.full(item_ids.shape, -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(catalog, item_ids), len(catalog) - 1)
    return np.where(catalog[pos] == item_ids, pos, -1).astype(np.int64)


def isin(values: IntArray, members: IntArray) -> npt.NDArray[np.bool_]:
    """``np.isin`` by binary search in the sorted ``members``: a request's few hundred ids
    against its history, spread over a catalog-wide id range, where ``np.isin`` fills a
    lookup table as wide as the range (5x slower at 1M items)."""
    if len(members) == 0:
        return np.zeros(values.shape, dtype=bool)
    ordered = np.sort(members)
    found = np.minimum(np.searchsorted(ordered, values), len(ordered) - 1)
    return np.asarray(ordered[found] == values)


def unpadded(ids: IntArray, scores: FloatArray) -> list[tuple[IntArray, FloatArray]]:
    """``(n, k)`` padded rows back into each row's ``(ids, scores)`` arrays (padding dropped:
    rows are filled from the left)."""
    lengths = (ids != PAD_ID).sum(axis=1).tolist()
    return [(ids[r, :m], scores[r, :m]) for r, m in enumerate(lengths)]


def summed_history(
    query: UserQuery, catalog: IntArray, half_life_days: float | None
) -> tuple[IntArray, FloatArray]:
    """Catalog positions (ascending) of the history and the float32 sum of each one's events,
    each weighted ``2 ** (-age_days / half_life_days)`` as of ``now_s`` (1 if ``None``); an
    item whose sum underflows to 0 drops out, as the offline matrix drops it."""
    rows = catalog_rows(query.history, catalog)
    known = rows >= 0
    weights = np.ones(int(known.sum()), dtype=np.float32)
    if half_life_days is not None:
        age_days = (query.now_s - query.history_ts[known]).astype(np.float64) / SECONDS_PER_DAY
        weights = np.exp2(-age_days / half_life_days).astype(np.float32)
    cols, inverse = np.unique(rows[known], return_inverse=True)
    values = np.zeros(len(cols), dtype=np.float32)
    np.add.at(values, inverse.ravel(), weights)  # float32 sums, as the offline matrix holds
    kept = values > 0
    return cols[kept], values[kept]


def _ids(exclude: npt.ArrayLike) -> IntArray:
    return np.asarray(exclude, dtype=np.int64).reshape(-1)


def _check_k(k: int) -> int:
    if k < 0:
        raise ValueError(f"k must be >= 0 candidates, got {k}")
    return int(k)


def _search(
    index: VectorIndex, vector: FloatArray, k: int, exclude: IntArray
) -> tuple[IntArray, FloatArray]:
    """Top ``k`` of the index minus ``exclude``: asks for ``k + len(exclude)``, filters."""
    ids, scores = index.search(vector[None, :], min(k + len(exclude), index.ntotal))
    keep = (ids[0] != PAD_ID) & ~isin(ids[0], exclude)
    return ids[0][keep][:k], scores[0][keep][:k]


class PopularSource:
    """The same ranked list for everyone, minus ``exclude``."""

    def __init__(self, ranked: RankedItems, *, name: str = "popularity") -> None:
        self.ranked, self.name = ranked, name

    def candidates(
        self, query: UserQuery, k: int, *, exclude: npt.ArrayLike = ()
    ) -> tuple[IntArray, FloatArray]:
        return self.ranked.top(_check_k(k), _ids(exclude))

    def candidates_matrix(
        self, queries: Sequence[UserQuery], k: int, *, excludes: Sequence[IntArray]
    ) -> tuple[IntArray, FloatArray]:
        """:meth:`candidates` of many queries as ``(n, k)`` padded rows."""
        return self.ranked.top_many(_check_k(k), excludes)

    @classmethod
    def load(cls, path: Path, meta: Mapping[str, Any]) -> PopularSource:
        return cls(read_ranked(path / POPULAR_FILE), name=str(meta["name"]))


class CovisitationSource:
    """Co-visitation rows of the recent history, then popularity backfill (scores ``[-1, 0]``).

    Args:
        item_ids: ``(n_items,)`` sorted catalog ids, the rows and columns of ``covisitation``.
        covisitation: ``(n_items, n_items)`` float32 CSR pair weights, normalised.
        fallback: the popularity list; an empty history gets it, others its backfill form.
        last_n: most recent distinct items that vote; ``recency_decay``: their weight ratio.
    """

    def __init__(
        self,
        item_ids: IntArray,
        covisitation: sp.csr_matrix,
        fallback: RankedItems,
        *,
        last_n: int,
        recency_decay: float,
        name: str = "covisitation",
    ) -> None:
        self.item_ids, self.covisitation, self.fallback = item_ids, covisitation, fallback
        self.last_n, self.recency_decay, self.name = last_n, recency_decay, name
        top = float(fallback.scores.max(initial=0.0))
        # Offline: popularity / top - 1 in float32, below every co-visited item (scores > 0).
        backfill = fallback.scores / top - 1.0 if top > 0 else fallback.scores - 1.0
        self.backfill = RankedItems.from_scores(fallback.item_ids, backfill)

    def recent_weights(self, query: UserQuery) -> tuple[IntArray, FloatArray]:
        """Catalog positions (ascending) of the last ``last_n`` distinct items, ``decay**rank``."""
        rows = catalog_rows(query.history, self.item_ids)
        newest_first = rows[rows >= 0][::-1]
        _, first = np.unique(newest_first, return_index=True)
        latest = newest_first[np.sort(first)][: self.last_n]
        rank = np.arange(len(latest), dtype=np.float64)
        order = np.argsort(latest)
        return latest[order], (self.recency_decay**rank).astype(np.float32)[order]

    def recent_weights_many(
        self, queries: Sequence[UserQuery]
    ) -> tuple[IntArray, IntArray, FloatArray]:
        """:meth:`recent_weights` of every query as CSR parts ``(indptr, cols, weights)``,
        with a few array operations for the whole batch instead of several per query (0.02 ms
        less per user at 1M items). A single request keeps :meth:`recent_weights`, which is
        about 0.025 ms cheaper for one query; a test holds the two equal."""
        n = len(queries)
        lengths = np.fromiter((len(q.history) for q in queries), dtype=np.int64, count=n)
        if not lengths.any():
            return np.zeros(n + 1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        history = np.concatenate([np.asarray(q.history, dtype=np.int64) for q in queries])
        owner = np.repeat(np.arange(n, dtype=np.int64), lengths)
        # Newest first within each query, known items only.
        order = np.lexsort((-np.arange(len(history)), owner))
        rows, owner = catalog_rows(history[order], self.item_ids), owner[order]
        known = rows >= 0
        rows, owner = rows[known], owner[known]
        # The newest event of each (query, item), in newest-first order.
        _, first = np.unique(owner * len(self.item_ids) + rows, return_index=True)
        first.sort()
        rows, owner = rows[first], owner[first]
        starts = np.searchsorted(owner, np.arange(n))
        rank = np.arange(len(owner)) - starts[owner]
        recent = rank < self.last_n
        rows, owner, rank = rows[recent], owner[recent], rank[recent]
        weights = (self.recency_decay ** rank.astype(np.float64)).astype(np.float32)
        by_column = np.lexsort((rows, owner))
        indptr = np.r_[0, np.cumsum(np.bincount(owner, minlength=n))].astype(np.int64)
        return indptr, rows[by_column], weights[by_column]

    def candidates(
        self, query: UserQuery, k: int, *, exclude: npt.ArrayLike = ()
    ) -> tuple[IntArray, FloatArray]:
        k, excluded = _check_k(k), _ids(exclude)
        cols, weights = self.recent_weights(query)
        if len(cols) == 0:
            return self.fallback.top(k, excluded)
        targets, scores = self.history_product(cols, weights)
        positive = scores > 0
        return self._answer(self.item_ids[targets[positive]], scores[positive], k, excluded)

    def history_product(self, cols: IntArray, weights: FloatArray) -> tuple[IntArray, FloatArray]:
        """The offline product (history row @ matrix) on the columns the history's rows reach:
        ascending catalog positions and their float32 scores.

        What scipy's sparse product computes, element for element: each target sums
        ``weight * value`` over the rows in ``cols`` order, in the product's dtype. Done with
        numpy on the rows' slices, since slicing the rows and building two sparse matrices a
        request cost ~4x more than the arithmetic (and an n_items-wide buffer is out)."""
        matrix = self.covisitation
        starts, ends = matrix.indptr[cols], matrix.indptr[cols + 1]
        lengths = ends - starts
        # Positions of every entry of the rows, row after row.
        entries = np.arange(int(lengths.sum())) + np.repeat(
            starts - np.cumsum(lengths) + lengths, lengths
        )
        targets, inverse = np.unique(matrix.indices[entries], return_inverse=True)
        values = matrix.data[entries] * np.repeat(weights, lengths)
        sums = np.zeros(len(targets), dtype=values.dtype)
        np.add.at(sums, inverse.ravel(), values)  # in entry order: scipy's order of the sums
        return targets.astype(np.int64, copy=False), sums.astype(np.float32, copy=False)

    def _answer(
        self, covisited: IntArray, scores: FloatArray, k: int, excluded: IntArray
    ) -> tuple[IntArray, FloatArray]:
        """The top ``k`` co-visited items not excluded, then the popularity backfill."""
        keep = ~isin(covisited, excluded)
        ids, values = best(covisited[keep], scores[keep], k)
        if len(ids) < k:
            skip = np.concatenate([excluded, covisited])
            more_ids, more = self.backfill.top(k - len(ids), skip)
            ids, values = np.concatenate([ids, more_ids]), np.concatenate([values, more])
        return ids, values

    def candidates_many(
        self, queries: Sequence[UserQuery], k: int, *, excludes: Sequence[IntArray]
    ) -> list[tuple[IntArray, FloatArray]]:
        """:meth:`candidates` of many queries with one sparse product for all histories."""
        return unpadded(*self.candidates_matrix(queries, k, excludes=excludes))

    def candidates_matrix(
        self, queries: Sequence[UserQuery], k: int, *, excludes: Sequence[IntArray]
    ) -> tuple[IntArray, FloatArray]:
        """:meth:`candidates` of many queries as ``(n, k)`` padded rows, with one sparse product
        for all histories."""
        k, n = _check_k(k), len(queries)
        excluded = [_ids(e) for e in excludes]
        indptr, cols, weights = self.recent_weights_many(queries)
        lengths = np.diff(indptr)
        history = sp.csr_matrix((weights, cols, indptr), shape=(n, len(self.item_ids)))
        # Rows left in the product's column order: the row-at-a-time path's (np.unique) order
        # does not matter, as _answer ranks by (score, id) and excludes by membership (sorting
        # them cost ~0.03 ms of CPU per user).
        product = (history @ self.covisitation).tocsr()
        out_ids = np.full((n, k), PAD_ID, dtype=np.int64)
        out_scores = np.full((n, k), -np.inf, dtype=np.float32)
        # Per row: a partition of ~1K scores is cheaper than one sort of every row's entries.
        for row in range(n):
            if lengths[row] == 0:
                ids, scores = self.fallback.top(k, excluded[row])
            else:
                lo, hi = product.indptr[row], product.indptr[row + 1]
                values = product.data[lo:hi].astype(np.float32, copy=False)
                positive = values > 0
                targets = self.item_ids[product.indices[lo:hi][positive]]
                ids, scores = self._answer(targets, values[positive], k, excluded[row])
            out_ids[row, : len(ids)], out_scores[row, : len(ids)] = ids, scores
        return out_ids, out_scores

    @classmethod
    def load(cls, path: Path, meta: Mapping[str, Any]) -> CovisitationSource:
        file = path / COVISITATION_FILE
        a = read_npz(file, ("item_ids", "indptr", "indices", "data"))
        n = len(a["item_ids"])
        try:
            matrix = sp.csr_matrix((a["data"], a["indices"], a["indptr"]), shape=(n, n))
        except ValueError as exc:
            raise ValueError(f"{file}: not a CSR matrix over {n} items ({exc})") from exc
        return cls(
            a["item_ids"],
            matrix,
            read_ranked(path / FALLBACK_FILE),
            last_n=int(meta["last_n"]),
            recency_decay=float(meta["recency_decay"]),
            name=str(meta["name"]),
        )


class _IndexSource:
    """A source that searches ``index`` with a user vector; no vector: the ``fallback`` list."""

    index: VectorIndex
    fallback: RankedItems

    def user_vector(self, query: UserQuery) -> FloatArray | None:
        raise NotImplementedError

    def candidates(
        self, query: UserQuery, k: int, *, exclude: npt.ArrayLike = ()
    ) -> tuple[IntArray, FloatArray]:
        k, excluded = _check_k(k), _ids(exclude)
        vector = self.user_vector(query) if k else None
        if vector is None:
            return self.fallback.top(k, excluded)
        return _search(self.index, vector, k, excluded)

    def candidates_many(
        self, queries: Sequence[UserQuery], k: int, *, excludes: Sequence[IntArray]
    ) -> list[tuple[IntArray, FloatArray]]:
        """:meth:`candidates` of many queries with one index search per result width."""
        return unpadded(*self.candidates_matrix(queries, k, excludes=excludes))

    def candidates_matrix(
        self, queries: Sequence[UserQuery], k: int, *, excludes: Sequence[IntArray]
    ) -> tuple[IntArray, FloatArray]:
        """:meth:`candidates` of many queries as ``(n, k)`` padded rows.

        A request searches for ``k + len(exclude)`` items, and an approximate index (HNSW:
        ``efSearch >= k``) may answer a wider search differently, so the queries are grouped
        by that width and each group is one search: each user gets the request's answer. An
        exact index answers every query in one search at the widest width, each row cut to
        its own width (the same items; ~0.02 ms less per user at 1M items)."""
        k, n = _check_k(k), len(queries)
        excluded = [_ids(e) for e in excludes]
        vectors = [self.user_vector(q) if k else None for q in queries]
        out_ids = np.full((n, k), PAD_ID, dtype=np.int64)
        out_scores = np.full((n, k), -np.inf, dtype=np.float32)
        cold = [r for r, v in enumerate(vectors) if v is None]
        if cold:
            ids, scores = self.fallback.top_many(k, [excluded[r] for r in cold])
            out_ids[cold], out_scores[cold] = ids, scores
        warm = np.array([r for r, v in enumerate(vectors) if v is not None], dtype=np.int64)
        widths = np.array([min(k + len(excluded[r]), self.index.ntotal) for r in warm.tolist()])
        if self.index.exact and len(warm):
            found, values = self.index.search(np.stack([vectors[r] for r in warm]), widths.max())
            keep = (np.arange(found.shape[1]) < widths[:, None]) & (found != PAD_ID)
            keep &= ~rows_isin(found, [excluded[r] for r in warm.tolist()])
            out_ids[warm], out_scores[warm] = first_k(found, values, keep, k)
            return out_ids, out_scores
        for width in np.unique(widths).tolist():
            group = warm[widths == width].tolist()
            found, values = self.index.search(np.stack([vectors[r] for r in group]), width)
            keep = (found != PAD_ID) & ~rows_isin(found, [excluded[r] for r in group])
            out_ids[group], out_scores[group] = first_k(found, values, keep, k)
        return out_ids, out_scores


def candidates_matrix(
    source: CandidateSource, queries: Sequence[UserQuery], k: int, *, excludes: Sequence[IntArray]
) -> tuple[IntArray, FloatArray]:
    """Each query's :meth:`~CandidateSource.candidates` as ``(n, k)`` rows padded with
    ``PAD_ID`` and ``-inf``: what batch prediction merges. Popularity, co-visitation and the
    vector-index sources answer all queries at once, the others one query at a time."""
    if len(queries) != len(excludes):
        raise ValueError(f"{len(queries)} queries but {len(excludes)} exclude lists")
    matrix = getattr(source, "candidates_matrix", None)
    if matrix is not None:
        answer: tuple[IntArray, FloatArray] = matrix(queries, k, excludes=excludes)
        return answer
    k = _check_k(k)
    out_ids = np.full((len(queries), k), PAD_ID, dtype=np.int64)
    out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    for row, (ids, scores) in enumerate(candidates_many(source, queries, k, excludes=excludes)):
        out_ids[row, : len(ids)], out_scores[row, : len(ids)] = ids[:k], scores[:k]
    return out_ids, out_scores


def candidates_many(
    source: CandidateSource, queries: Sequence[UserQuery], k: int, *, excludes: Sequence[IntArray]
) -> list[tuple[IntArray, FloatArray]]:
    """Each query's :meth:`~CandidateSource.candidates`; sources that search a vector index
    answer all queries with one search (batch prediction), the others one query at a time."""
    if len(queries) != len(excludes):
        raise ValueError(f"{len(queries)} queries but {len(excludes)} exclude lists")
    many = getattr(source, "candidates_many", None)
    if many is not None:
        answers: list[tuple[IntArray, FloatArray]] = many(queries, k, excludes=excludes)
        return answers
    return [source.candidates(q, k, exclude=e) for q, e in zip(queries, excludes, strict=True)]


@dataclass(frozen=True)
class FoldIn:
    """ALS's closed-form user solve against fixed item factors (``implicit``'s formula).

    Attributes:
        item_ids: ``(n_items,)`` sorted catalog ids; ``item_factors``: ``(n_items, d)`` float32.
        gram: ``(d, d)`` float64 ``YᵀY``.
        regularization: λ; ``alpha``: confidence per event; ``half_life_days``: event decay.
        learned: ``(n_items,)`` whether the item's factor row is non-zero. ``implicit``'s ALS
            sets the row of an item without training events (none, or all decayed to 0) to 0,
            so this is the items the model learned from, read off the factors themselves
            (artifacts of any age carry them); such an item adds nothing to the solve.
    """

    item_ids: IntArray
    item_factors: FloatArray
    gram: npt.NDArray[np.float64]
    regularization: float
    alpha: float
    half_life_days: float | None
    learned: npt.NDArray[np.bool_] = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "learned", np.any(self.item_factors != 0, axis=1))

    def user_factor(self, query: UserQuery) -> FloatArray | None:
        """``(d,)`` float32 factor of the history; ``None`` (the fallback answers) when no
        history item is in the catalog with a learned factor. A history of items without
        training events only would fold in to the zero vector, which ties every item; offline
        such a user is cold and gets the fallback."""
        cols, values = summed_history(query, self.item_ids, self.half_life_days)
        if not self.learned[cols].any():
            return None
        y = self.item_factors[cols].astype(np.float64)
        confidence = self.alpha * values.astype(np.float64)
        a = self.gram + self.regularization * np.eye(len(self.gram))
        a += (y * (confidence - 1.0)[:, None]).T @ y
        return np.linalg.solve(a, confidence @ y).astype(np.float32)


class FactorSource(_IndexSource):
    """ALS / BPR: the user's factor against the item factors in a vector index.

    Fit-time users use their stored factor; others are folded in (``fold_in``, ALS) or get
    ``fallback`` (BPR, or no history item the model learned a factor for).
    """

    def __init__(
        self,
        index: VectorIndex,
        user_ids: IntArray,
        user_factors: FloatArray,
        fallback: RankedItems,
        *,
        fold_in: FoldIn | None = None,
        name: str = "als",
    ) -> None:
        self.index, self.user_ids, self.user_factors = index, user_ids, user_factors
        self.fallback, self.fold_in, self.name = fallback, fold_in, name

    def user_vector(self, query: UserQuery) -> FloatArray | None:
        """``(d,)`` query vector, or ``None`` when the fallback answers."""
        if query.user_id is not None:
            row = int(catalog_rows(np.array([query.user_id], np.int64), self.user_ids)[0])
            if row >= 0:
                vector: FloatArray = self.user_factors[row]
                return vector
        return None if self.fold_in is None else self.fold_in.user_factor(query)

    @classmethod
    def load(cls, path: Path, meta: Mapping[str, Any]) -> FactorSource:
        fold = bool(meta["fold_in"])
        a = read_npz(path / FACTORS_FILE, ("user_ids", "user_factors", "item_ids", "item_factors"))
        fold_in = None
        if fold:
            y = a["item_factors"].astype(np.float64)
            half_life = meta["half_life_days"]
            fold_in = FoldIn(
                a["item_ids"],
                a["item_factors"],
                y.T @ y,
                float(meta["regularization"]),
                float(meta["alpha"]),
                None if half_life is None else float(half_life),
            )
        index, fallback = read_index(path / INDEX_DIR), read_ranked(path / FALLBACK_FILE)
        return cls(index, a["user_ids"], a["user_factors"], fallback, fold_in=fold_in,
                   name=str(meta["name"]))  # fmt: skip


class EASESource:
    """EASE: scores ``x · B`` over the active items, 0 for the rest; small catalogs only.

    A history without an active item (empty, or only items without training events) gets
    ``fallback``: its scores would all be 0, and offline such a user is cold.

    Args:
        item_ids: ``(n_items,)`` sorted catalog ids.
        active_items: ``(n_active,)`` catalog positions that had training events.
        weights: ``(n_active, n_active)`` float32 ``B``.
        half_life_days: ``x`` sums ``2 ** (-age_days / half_life_days)`` per event; else counts.
    """

    def __init__(
        self,
        item_ids: IntArray,
        active_items: IntArray,
        weights: FloatArray,
        fallback: RankedItems,
        *,
        half_life_days: float | None = None,
        name: str = "ease",
    ) -> None:
        self.item_ids, self.active_items, self.weights = item_ids, active_items, weights
        self.fallback, self.half_life_days, self.name = fallback, half_life_days, name
        self.active_of = np.full(len(item_ids), -1, dtype=np.int64)
        self.active_of[active_items] = np.arange(len(active_items))

    def candidates(
        self, query: UserQuery, k: int, *, exclude: npt.ArrayLike = ()
    ) -> tuple[IntArray, FloatArray]:
        k, excluded = _check_k(k), _ids(exclude)
        cols, values = summed_history(query, self.item_ids, self.half_life_days)
        if len(cols) == 0:
            return self.fallback.top(k, excluded)
        active = self.active_of[cols]
        on = active >= 0
        if not on.any():  # no item the model learned from: offline, a cold user
            return self.fallback.top(k, excluded)
        shape = (1, len(self.active_items))
        x = sp.csr_matrix((values[on], active[on], [0, int(on.sum())]), shape=shape)
        scores = np.zeros(len(self.item_ids), dtype=np.float32)
        scores[self.active_items] = np.asarray(x @ self.weights).ravel()  # the offline product
        keep = ~np.isin(self.item_ids, excluded)
        return best(self.item_ids[keep], scores[keep], k)

    @classmethod
    def load(cls, path: Path, meta: Mapping[str, Any]) -> EASESource:
        file = path / EASE_FILE
        a = read_npz(file, ("item_ids", "active_items", "weights"))
        n_active = len(a["active_items"])
        if a["weights"].shape != (n_active, n_active):
            raise ValueError(f"{file}: weights {a['weights'].shape}, {n_active} active items")
        half_life = meta["half_life_days"]
        fallback = read_ranked(path / FALLBACK_FILE)
        return cls(a["item_ids"], a["active_items"], a["weights"], fallback,
                   half_life_days=None if half_life is None else float(half_life),
                   name=str(meta["name"]))  # fmt: skip


@dataclass(frozen=True)
class TowerSpec:
    """What the user tower was built for and reads (kept in ``source.json``).

    Attributes:
        config: the model's hyperparameters; ``sizes``: its vocabulary sizes.
        attribute_names: the ``users`` columns it reads; code ``c`` of ``attribute_names[j]``
            is ``attribute_levels[j][c - 1]``, 0 = missing or unseen.
    """

    config: TwoTowerConfig
    sizes: FeatureSizes
    attribute_names: tuple[str, ...]
    attribute_levels: tuple[tuple[str, ...], ...]

    def encode(self, attributes: Mapping[str, Any]) -> IntArray:
        """``(1, n_attributes)`` codes of raw attributes, as ``Encoding.encode_attributes``."""
        codes = np.zeros((1, len(self.attribute_names)), dtype=np.int64)
        for j, name in enumerate(self.attribute_names):
            value, levels = attributes.get(name), self.attribute_levels[j]
            if value is not None and str(value) in levels:
                codes[0, j] = levels.index(str(value)) + 1
        return codes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (lists for tuples)."""
        sizes = dataclasses.asdict(self.sizes) | {
            "attribute_levels": list(self.sizes.attribute_levels)
        }
        names, levels = list(self.attribute_names), [list(v) for v in self.attribute_levels]
        return {"config": self.config.to_dict(), "sizes": sizes, "attribute_names": names,
                "attribute_levels": levels}  # fmt: skip

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TowerSpec:
        s = raw["sizes"]
        levels = tuple(int(n) for n in s["attribute_levels"])
        sizes = FeatureSizes(int(s["n_items"]), int(s["n_categories"]), levels)
        config = TwoTowerConfig.from_dict(dict(raw["config"]))
        names = tuple(str(n) for n in raw["attribute_names"])
        return cls(config, sizes, names, tuple(tuple(v) for v in raw["attribute_levels"]))


class TwoTowerSource(_IndexSource):
    """The user tower on the query's history and attributes; item embeddings in an index.

    Args:
        user_tower: the trained tower; ``spec``: what it was built for.
        index: the item embeddings (popularity as of the cutoff) under their item ids.
        item_ids: ``(n_items,)`` sorted catalog ids; an item's token is its position + 1.
        fallback: the answer when the query has neither history nor a known attribute.
        request_context: read hour and weekday from ``now_s``; offline ``recommend`` averages
            them (the default here), so only ``False`` reproduces its scores.
    """

    def __init__(
        self,
        user_tower: UserTower,
        spec: TowerSpec,
        index: VectorIndex,
        item_ids: IntArray,
        fallback: RankedItems,
        *,
        request_context: bool = False,
        name: str = "two_tower",
    ) -> None:
        self.user_tower, self.spec, self.index = user_tower.eval(), spec, index
        self.item_ids, self.fallback, self.name = item_ids, fallback, name
        self.request_context = request_context

    def user_features(self, query: UserQuery) -> UserFeatures:
        """One row of tower inputs, built as ``TwoTowerRetriever.encode_users`` builds it."""
        length = self.spec.config.history_len
        rows = catalog_rows(query.history, self.item_ids)
        rows = rows[rows >= 0][-length:]
        tokens = np.zeros((1, length), dtype=np.int64)
        tokens[0, length - len(rows) :] = rows + 1
        hour = weekday = np.full(1, -1, dtype=np.int64)
        if self.request_context:
            hour = np.array([(query.now_s // 3600) % 24], dtype=np.int64)
            weekday = np.array([(query.now_s // 86_400 + 3) % 7], dtype=np.int64)  # Thu 1970
        codes = self.spec.encode(query.attributes)
        return UserFeatures(*map(torch.from_numpy, (tokens, codes, hour, weekday)))

    def user_vector(self, query: UserQuery) -> FloatArray | None:
        """``(dim,)`` unit vector, or ``None`` (no history, no attribute): the fallback."""
        features = self.user_features(query)
        if not (features.history.any() or features.attributes.any()):
            return None
        with torch.inference_mode():
            vector: FloatArray = self.user_tower(features)[0].numpy()
        return vector

    @classmethod
    def load(cls, path: Path, meta: Mapping[str, Any]) -> TwoTowerSource:
        spec = TowerSpec.from_dict(meta)
        tower = UserTower(spec.config, spec.sizes)
        file = path / USER_TOWER_FILE
        try:
            tower.load_state_dict(torch.load(file, weights_only=True, map_location="cpu"))
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
            raise ValueError(f"{file}: cannot read the user tower weights ({exc})") from exc
        item_ids = read_npz(path / TWO_TOWER_FILE, ("item_ids",))["item_ids"]
        index, fallback = read_index(path / INDEX_DIR), read_ranked(path / FALLBACK_FILE)
        return cls(tower, spec, index, item_ids, fallback, name=str(meta["name"]))


class SegmentPopularSource:
    """Segment popularity: the offline score of the requester's attributes, any combination.

    Offline, a user scores ``mean_of_tables``: the mean over the segment columns of each
    column's table row for the user's level (a missing or unknown attribute: the table's last
    row, the global share). Serving computes the same float32 arithmetic, so a requester gets
    the offline list bit for bit however their attributes combine:

    - a combination some fit-time user had (a *profile*): its stored list, best first (the
      first ``SEGMENT_TOP_N`` items). A request the list cannot fill with ``k`` items once
      the excludes are skipped is scored from the tables instead;
    - any other combination with at least one known attribute, e.g. a new signup's or one with
      an attribute missing: scored from the tables, one pass over the catalog (``n_columns``
      row additions and a partition: about 8 ms at 1M items and four columns, on one core);
    - no known attribute: the global list, ``fallback`` (offline: a cold user's answer).

    Memory: the tables hold ``Σ (n_levels + 1)`` rows of ``n_items`` float32 (ML-100K's age
    bucket, gender, occupation and region: 45 rows, 0.3 MB; 180 MB at 1M items), besides the
    lists' ``n_profiles × SEGMENT_TOP_N`` ids and scores. An artifact exported before the
    tables were (no ``tables`` in ``segments.npz``) answers as it did: a profile's list, or
    the global list for every other combination.

    Args:
        columns: the segment columns; ``levels``: per column, each level's value as a string.
        profiles: ``(n_profiles, n_columns)`` levels of each profile (-1: missing).
        top_ids, top_scores: ``(n_profiles, n)`` each profile's list, best first.
        fallback: the global list.
        item_ids: ``(n_items,)`` sorted catalog ids, the columns of the tables.
        tables: per column, ``(n_levels + 1, n_items)`` float32, the last row the global share;
            ``None``: an old artifact without them.
    """

    def __init__(
        self,
        columns: Sequence[str],
        levels: Sequence[Sequence[str]],
        profiles: IntArray,
        top_ids: IntArray,
        top_scores: FloatArray,
        fallback: RankedItems,
        *,
        item_ids: IntArray | None = None,
        tables: Sequence[FloatArray] | None = None,
        name: str = "segment_popularity",
    ) -> None:
        self.name = name
        self.columns = tuple(columns)
        self.codes = [{value: i for i, value in enumerate(vs)} for vs in levels]
        self.row_of = {tuple(int(v) for v in row): p for p, row in enumerate(profiles)}
        self.lists = [RankedItems(top_ids[p], top_scores[p]) for p in range(len(top_ids))]
        self.fallback = fallback
        # Without segment columns the one profile's scores are the global share: the
        # fallback, whose list holds the whole catalog.
        self.scoring: tuple[IntArray, tuple[FloatArray, ...]] | None = None
        if tables is not None and item_ids is not None and self.columns:
            self.scoring = (item_ids, tuple(tables))

    def levels_of(self, query: UserQuery) -> tuple[int, ...]:
        """The level of each segment column for the query's attributes, -1 when unknown."""
        return tuple(
            codes.get(str(query.attributes[c]), -1) if c in query.attributes else -1
            for c, codes in zip(self.columns, self.codes, strict=True)
        )

    def candidates(
        self, query: UserQuery, k: int, *, exclude: npt.ArrayLike = ()
    ) -> tuple[IntArray, FloatArray]:
        k, excluded = _check_k(k), _ids(exclude)
        key = self.levels_of(query)
        row, scoring = self.row_of.get(key) if self.columns else None, self.scoring
        if row is not None:
            ranked = self.lists[row]
            ids, scores = ranked.top(k, excluded)
            if len(ids) == k or scoring is None or len(ranked.item_ids) >= len(scoring[0]):
                return ids, scores  # the list is the ranking's head: its top k are the answer
            return table_top(*scoring, key, k, excluded)  # reads past the list's end
        if scoring is None or max(key, default=-1) < 0:
            return self.fallback.top(k, excluded)
        return table_top(*scoring, key, k, excluded)

    @classmethod
    def load(cls, path: Path, meta: Mapping[str, Any]) -> SegmentPopularSource:
        file = path / SEGMENT_FILE
        names = ("profile_levels", "top_ids", "top_scores")
        a = read_npz(file, names, optional=("item_ids", "tables", "table_starts"))
        tables = None
        item_ids = a.get("item_ids")
        if item_ids is not None and "tables" in a and "table_starts" in a:
            tables = split_tables(file, a["tables"], a["table_starts"], meta["levels"])
            if a["tables"].shape[1] != len(item_ids):
                raise ValueError(
                    f"{file}: tables of {a['tables'].shape[1]} items, {len(item_ids)} item_ids"
                )
        return cls(
            meta["columns"],
            meta["levels"],
            a["profile_levels"].astype(np.int64),
            a["top_ids"].astype(np.int64),
            a["top_scores"].astype(np.float32),
            read_ranked(path / FALLBACK_FILE),
            item_ids=None if item_ids is None else item_ids.astype(np.int64),
            tables=tables,
            name=str(meta["name"]),
        )


def table_top(
    item_ids: IntArray,
    tables: Sequence[FloatArray],
    levels: Sequence[int],
    k: int,
    excluded: IntArray,
) -> tuple[IntArray, FloatArray]:
    """The top ``k`` items, minus ``excluded``, of :func:`mean_of_tables` for one user's
    ``levels`` (one per column, -1: missing); ties by item id, as the offline lists."""
    scores = mean_of_tables(tables, np.array([levels], dtype=np.int64))[0]
    rows = catalog_rows(excluded, item_ids)
    scores[rows[rows >= 0]] = -np.inf
    ids, values = best(item_ids, scores, k)
    finite = np.isfinite(values)
    return ids[finite], values[finite]


def split_tables(
    file: Path, stacked: FloatArray, starts: IntArray, levels: Sequence[Sequence[str]]
) -> tuple[FloatArray, ...]:
    """Each column's ``(n_levels + 1, n_items)`` table out of the stacked rows, checked against
    ``levels`` (a ValueError naming ``file`` when they disagree)."""
    want = np.r_[0, np.cumsum([len(v) + 1 for v in levels])]
    if stacked.ndim != 2 or starts.shape != want.shape or not np.array_equal(starts, want):
        raise ValueError(
            f"{file}: tables {stacked.shape} with row starts {starts.tolist()}, expected "
            f"starts {want.tolist()} for levels of {[len(v) for v in levels]}; re-export"
        )
    if len(stacked) != want[-1]:
        raise ValueError(f"{file}: tables hold {len(stacked)} rows, expected {want[-1]}")
    values = stacked.astype(np.float32, copy=False)
    return tuple(values[lo:hi] for lo, hi in itertools.pairwise(want.tolist()))


SOURCE_KINDS: dict[str, Callable[[Path, Mapping[str, Any]], CandidateSource]] = {
    "segment_popularity": SegmentPopularSource.load,
    "popular": PopularSource.load,
    "covisitation": CovisitationSource.load,
    "factors": FactorSource.load,
    "ease": EASESource.load,
    "two_tower": TwoTowerSource.load,
}
"""``source.json``'s ``kind`` → loader."""


def load_source(path: Path) -> CandidateSource:
    """Load an exported source directory; a missing or corrupt file is a ValueError naming it."""
    file = Path(path) / SOURCE_FILE
    if not file.is_file():
        raise ValueError(f"{file} not found: {path} is not an exported candidate source")
    try:
        meta = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: not valid JSON ({exc}); re-export the source") from exc
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {version!r}, expected {FORMAT_VERSION}")
    kind = meta.get("kind")
    if kind not in SOURCE_KINDS:
        raise ValueError(f"{file}: unknown kind {kind!r}; known: {sorted(SOURCE_KINDS)}")
    try:
        return SOURCE_KINDS[kind](Path(path), meta)
    except KeyError as exc:
        raise ValueError(f"{file}: field {exc} missing for kind {kind!r}; re-export") from exc


def read_npz(
    file: Path, names: tuple[str, ...], *, optional: tuple[str, ...] = ()
) -> dict[str, npt.NDArray[Any]]:
    """The named arrays of an ``.npz`` (no pickle), and those of ``optional`` it holds (arrays
    older artifacts lack); a ValueError naming the file otherwise."""
    if not file.is_file():
        raise ValueError(f"{file} not found: the source artifact is incomplete; re-export it")
    try:
        with np.load(file, allow_pickle=False) as npz:
            missing = sorted(set(names) - set(npz.files))
            if missing:
                raise ValueError(f"arrays {missing} missing (it has {sorted(npz.files)})")
            present = [name for name in optional if name in npz.files]
            return {name: npz[name] for name in (*names, *present)}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{file}: cannot read ({exc}); re-export the source") from exc


def read_ranked(file: Path) -> RankedItems:
    a = read_npz(file, ("item_ids", "scores"))
    if a["item_ids"].ndim != 1 or a["item_ids"].shape != a["scores"].shape:
        raise ValueError(f"{file}: item_ids {a['item_ids'].shape}, scores {a['scores'].shape}")
    return RankedItems(a["item_ids"].astype(np.int64), a["scores"].astype(np.float32))


def read_index(directory: Path) -> VectorIndex:
    try:
        return load_index(directory)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{directory}: cannot load the vector index ({exc})") from exc
