"""Item-to-item co-visitation: items seen close together in the same session go together.

Sessions are the events' ``session_id`` when they carry one; otherwise (no such column, or a
null id) a user's events split wherever ``session_gap_minutes`` pass without an event (a
MovieLens user rating films in one sitting is one session). Within a session (each item at
its first occurrence, in time order) two items ``d <= window`` positions apart add ``1 / d``
to their pair, in both directions.
A user's candidates are the co-visitation rows of their ``last_n`` most recent distinct items,
the most recent weighted 1, the next ``recency_decay``, then ``recency_decay²``, and so on.
Items without co-visitation evidence follow in popularity order, with scores in ``[-1, 0]``;
cold users get the ``fallback`` (time-decayed popularity by default). Everything is built
with sparse matrices, without loops over events.
"""

from __future__ import annotations

from typing import Literal, Self

import numpy as np
import numpy.typing as npt
import pandas as pd
import scipy.sparse as sp

from mlsd.models.retrieval.base import (
    FloatArray,
    IntArray,
    InteractionMatrix,
    RetrievalData,
    Retriever,
)
from mlsd.models.retrieval.popularity import PopularityRetriever, fit_fallback
from mlsd.models.retrieval.topk import check_fitted, recommend_from_scores

Normalize = Literal["none", "row", "cosine"]


def session_keys(events: pd.DataFrame, *, gap_seconds: float) -> IntArray:
    """``(n_events,)`` session of each event: by ``(user_id, session_id)`` where the event has a
    ``session_id``, else by time gaps within the user's events without one.

    A null ``session_id`` (an optional column, filled by some sources only) is no session:
    those events split by ``gap_seconds`` per user, never joining another user's events or
    an identified session, whose keys they follow."""
    if "session_id" not in events.columns:
        return gap_sessions(events, gap_seconds=gap_seconds)
    missing = events["session_id"].isna().to_numpy()
    keys = np.empty(len(events), dtype=np.int64)
    # (user, session) pairs, in case a source numbers sessions per user.
    named = events[~missing].groupby(["user_id", "session_id"], sort=False).ngroup()
    keys[~missing] = named.to_numpy(np.int64)
    if missing.any():
        offset = int(named.max()) + 1 if len(named) else 0
        keys[missing] = offset + gap_sessions(events[missing], gap_seconds=gap_seconds)
    return keys


def gap_sessions(events: pd.DataFrame, *, gap_seconds: float) -> IntArray:
    """``(n_events,)`` session of each event, numbered from 0: a user's events split wherever
    more than ``gap_seconds`` pass without one."""
    users = events["user_id"].to_numpy(dtype=np.int64)
    seconds = _seconds(events)
    order = np.lexsort((seconds, users))
    u, t = users[order], seconds[order]
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = (u[1:] != u[:-1]) | (t[1:] - t[:-1] > gap_seconds)
    keys = np.empty(len(order), dtype=np.int64)
    keys[order] = np.cumsum(starts) - 1
    return keys


def covisitation_matrix(
    sessions: IntArray,
    items: IntArray,
    seconds: npt.NDArray[np.float64],
    n_items: int,
    *,
    window: int,
    normalize: Normalize,
    max_neighbours: int | None = None,
) -> sp.csr_matrix:
    """``(n_items, n_items)`` pair weights ``Σ 1/d`` over sessions, zero diagonal, normalised.

    Args:
        sessions, items, seconds: ``(n_events,)`` session key, item column and time of events.
        n_items: columns of the catalog.
        window: largest distance ``d`` (in positions within a session) that makes a pair.
        normalize: ``"none"`` keeps the (symmetric) weighted counts; ``"row"`` makes each row
            sum to 1, so every history item casts one vote however popular it is;
            ``"cosine"`` divides by ``sqrt(n_i · n_j)`` (sessions holding each item).
        max_neighbours: keep each row's largest weights only (after normalising; ``None``:
            all). Serving cost grows with the entries a history's rows reach, and the tail of
            a popular item's row (thousands of weak pairs) rarely reaches a top-k list.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1 position, got {window}")
    order = np.lexsort((seconds, sessions))
    s, it = sessions[order], items[order]
    first = ~pd.DataFrame({"s": s, "i": it}).duplicated().to_numpy()
    s, it = s[first], it[first]
    rows, cols, weights = [], [], []
    for d in range(1, window + 1):  # a loop over distances, each step vectorised over events
        same = s[:-d] == s[d:]
        rows.append(it[:-d][same])
        cols.append(it[d:][same])
        weights.append(np.full(int(same.sum()), 1.0 / d))
    a, b, w = np.concatenate(rows), np.concatenate(cols), np.concatenate(weights)
    pairs = sp.coo_matrix(
        (np.concatenate([w, w]), (np.concatenate([a, b]), np.concatenate([b, a]))),
        shape=(n_items, n_items),
    ).tocsr()
    pairs.sum_duplicates()
    if normalize == "cosine":
        n_sessions = np.bincount(it, minlength=n_items).astype(np.float64)
        row_of = np.repeat(np.arange(n_items), np.diff(pairs.indptr))
        pairs.data /= np.sqrt(n_sessions[row_of] * n_sessions[pairs.indices])
    elif normalize == "row":
        sums = np.asarray(pairs.sum(axis=1)).ravel()
        pairs = sp.csr_matrix(sp.diags(1.0 / np.maximum(sums, 1e-12)) @ pairs)
    elif normalize != "none":
        raise ValueError(f"normalize must be 'none', 'row' or 'cosine', got {normalize!r}")
    if max_neighbours is not None:
        pairs = top_per_row(pairs, max_neighbours)
    return pairs.astype(np.float32)


def top_per_row(matrix: sp.csr_matrix, n: int) -> sp.csr_matrix:
    """``matrix`` with only the ``n`` largest entries of each row (ties: lower column)."""
    if n < 1:
        raise ValueError(f"max_neighbours must be >= 1, got {n}")
    matrix = sp.csr_matrix(matrix)
    counts = np.diff(matrix.indptr)
    if counts.max(initial=0) <= n:
        return matrix
    rows = np.repeat(np.arange(matrix.shape[0]), counts)
    order = np.lexsort((matrix.indices, -matrix.data, rows))
    rank = np.arange(len(order)) - np.repeat(matrix.indptr[:-1], counts)
    keep = order[rank < n]
    return sp.csr_matrix(
        (matrix.data[keep], (rows[keep], matrix.indices[keep])), shape=matrix.shape
    )


def recent_history(
    users: IntArray,
    items: IntArray,
    seconds: npt.NDArray[np.float64],
    n_users: int,
    n_items: int,
    *,
    last_n: int,
    recency_decay: float,
) -> sp.csr_matrix:
    """``(n_users, n_items)``: each user's ``last_n`` latest distinct items, ``decay ** rank``.

    Of events in the same second, the later row is the newer, as serving reads a history
    (oldest → newest, in the order the events came)."""
    order = np.lexsort((-np.arange(len(users)), -seconds, users))
    u, it = users[order], items[order]
    latest = ~pd.DataFrame({"u": u, "i": it}).duplicated().to_numpy()
    u, it = u[latest], it[latest]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    rank = np.arange(len(u)) - np.repeat(starts, np.diff(np.r_[starts, len(u)]))
    keep = rank < last_n
    return sp.csr_matrix(
        (recency_decay ** rank[keep].astype(np.float64), (u[keep], it[keep])),
        shape=(n_users, n_items),
        dtype=np.float32,
    )


class CovisitationRetriever(Retriever):
    """Candidates from items co-visited with the user's latest items (see the module docstring).

    Args:
        window: positions apart within a session that still make a pair.
        session_gap_minutes: idle time that starts a new session (when events lack session_id).
        last_n: most recent distinct items of a user that vote for candidates.
        recency_decay: weight ratio between consecutive items of the history, in (0, 1].
        normalize: ``"row"`` (each history item casts one vote), ``"cosine"`` or ``"none"``.
        max_neighbours: co-visited items kept per item (its strongest; ``None``: all).
        fallback: answers cold users (fitted on a copy); ``None`` = ``PopularityRetriever()``.

    Attributes:
        covisitation_: ``(n_items, n_items)`` float32 CSR pair weights.
        history_: ``(n_users, n_items)`` float32 CSR recency weights of each user's last items.
        interactions_: the training window's users × items matrix.
        fallback_: the fitted copy of ``fallback``: cold users' answer and the backfill order.
    """

    name = "covisitation"

    covisitation_: sp.csr_matrix
    history_: sp.csr_matrix
    interactions_: InteractionMatrix
    fallback_: PopularityRetriever

    def __init__(
        self,
        window: int = 20,
        session_gap_minutes: float = 30.0,
        last_n: int = 20,
        recency_decay: float = 0.9,
        normalize: Normalize = "row",
        max_neighbours: int | None = 200,
        fallback: PopularityRetriever | None = None,
    ) -> None:
        self.window = window
        self.session_gap_minutes = session_gap_minutes
        self.last_n = last_n
        self.recency_decay = recency_decay
        self.normalize = normalize
        self.max_neighbours = max_neighbours
        self.fallback = fallback

    def fit(self, train: RetrievalData) -> Self:
        if not 0 < self.recency_decay <= 1:
            raise ValueError(f"recency_decay must be in (0, 1], got {self.recency_decay}")
        interactions = InteractionMatrix.from_events(train.events, train.items["item_id"])
        n_users, n_items = interactions.user_items.shape
        events = _in_catalog(train.events, interactions.item_ids)
        items = np.searchsorted(interactions.item_ids, events["item_id"].to_numpy(np.int64))
        users = interactions.rows_of(events["user_id"].to_numpy(np.int64))
        seconds = _seconds(events)
        sessions = session_keys(events, gap_seconds=self.session_gap_minutes * 60.0)
        self.covisitation_ = covisitation_matrix(
            sessions,
            items,
            seconds,
            n_items,
            window=self.window,
            normalize=self.normalize,
            max_neighbours=self.max_neighbours,
        )
        self.history_ = recent_history(
            users,
            items,
            seconds,
            n_users,
            n_items,
            last_n=self.last_n,
            recency_decay=self.recency_decay,
        )
        self.interactions_ = interactions
        self.fallback_ = fit_fallback(self.fallback, train)
        return self

    def recommend(
        self, user_ids: npt.ArrayLike, k: int, *, exclude_seen: bool = True
    ) -> tuple[IntArray, FloatArray]:
        check_fitted(self, "covisitation_")
        popularity = self.fallback_.popularity_
        top = float(popularity.max(initial=0.0))
        # Below every co-visited item (scores > 0), in popularity order.
        backfill = popularity / top - 1.0 if top > 0 else popularity - 1.0

        def score_rows(rows: IntArray) -> FloatArray:
            covisited = (self.history_[rows] @ self.covisitation_).toarray()
            return np.where(covisited > 0, covisited, backfill).astype(np.float32)

        return recommend_from_scores(
            user_ids,
            k,
            interactions=self.interactions_,
            score_rows=score_rows,
            fallback_scores=self.fallback_.popularity_,
            exclude_seen=exclude_seen,
        )


def _in_catalog(events: pd.DataFrame, item_ids: IntArray) -> pd.DataFrame:
    return events[np.isin(events["item_id"].to_numpy(np.int64), item_ids)]


def _seconds(events: pd.DataFrame) -> npt.NDArray[np.float64]:
    """Event times as float seconds since the Unix epoch (any datetime unit, tz-aware or not)."""
    ts = pd.to_datetime(events["ts"], utc=True)
    return np.asarray((ts - pd.Timestamp(0, tz="UTC")).dt.total_seconds(), dtype=np.float64)
