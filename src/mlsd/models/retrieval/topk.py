"""Shared last step of every score-based retriever: scores → exclude seen → top-k → item ids.

A retriever only has to say how it scores the catalog for its known (warm) users; this module
answers cold users with a fallback score vector, masks what each user has seen, takes the
top ``k`` per row in batches of bounded memory, and pads short rows with :data:`PAD_ITEM`.

    items, scores = recommend_from_scores(
        user_ids, k,
        interactions=self.interactions_,                      # who saw what before the cutoff
        score_rows=lambda rows: self.user_factors_[rows] @ self.item_factors_.T,
        fallback_scores=self.fallback_.popularity_,            # (n_items,) for cold users
        exclude_seen=exclude_seen,
    )
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from mlsd.models.retrieval.base import PAD_ITEM, FloatArray, IntArray, InteractionMatrix

ScoreRows = Callable[[IntArray], npt.NDArray[np.floating]]
"""Maps ``(n,)`` rows of the interaction matrix to ``(n, n_items)`` scores, higher is better."""

MAX_BATCH_CELLS = 1 << 24
"""Users per batch are chosen so a dense batch holds at most this many scores (64 MB float32)."""


def top_k_items(
    scores: npt.NDArray[np.floating], k: int, *, item_ids: IntArray
) -> tuple[IntArray, FloatArray]:
    """Best ``k`` columns of each row, as item ids; ``-inf`` and NaN scores never make the list.

    Ties go to the lower column (the lower item id of a sorted catalog), also at the k-th
    place, where several items may tie for the last slots: the serving sources keep the
    same ones (:func:`mlsd.serving.sources.best`).

    Args:
        scores: ``(n_users, n_items)``; ``-inf`` marks an item that must not be recommended.
        k: items per row (``>= 0``).
        item_ids: ``(n_items,)`` the item id of each column.

    Returns:
        ``(n_users, k)`` int64 item ids, best first, :data:`PAD_ITEM` where a row runs out of
        finite scores; ``(n_users, k)`` float32 scores, ``-inf`` at the padding.
    """
    _check_k(k)
    n_rows, n_cols = scores.shape
    items = np.full((n_rows, k), PAD_ITEM, dtype=np.int64)
    values = np.full((n_rows, k), -np.inf, dtype=np.float32)
    kk = min(k, n_cols)
    if kk == 0 or n_rows == 0:
        return items, values
    key = np.where(np.isnan(scores), -np.inf, scores)
    cols = (
        np.argpartition(-key, kk - 1, axis=1)[:, :kk]
        if kk < n_cols
        else np.broadcast_to(np.arange(n_cols), (n_rows, n_cols))
    )
    best = np.take_along_axis(key, cols, axis=1)
    if kk < n_cols:
        # argpartition keeps an arbitrary few of the items tied at the k-th score: a row
        # with more of them than slots picks its lowest columns again.
        kth = best.min(axis=1)
        crowded = np.flatnonzero(np.isfinite(kth) & ((key >= kth[:, None]).sum(axis=1) > kk))
        for row in crowded.tolist():
            ahead = np.flatnonzero(key[row] >= kth[row])
            cols[row] = ahead[np.lexsort((ahead, -key[row, ahead]))[:kk]]
        best = np.take_along_axis(key, cols, axis=1)
    # Sort the kept columns by score, ties by column, so equal scores list in a fixed order.
    order = np.lexsort((cols, -best), axis=1)
    cols = np.take_along_axis(cols, order, axis=1)
    best = np.take_along_axis(best, order, axis=1)
    real = np.isfinite(best)
    items[:, :kk] = np.where(real, item_ids[cols], PAD_ITEM)
    values[:, :kk] = np.where(real, best, -np.inf)
    return items, values


def recommend_from_scores(
    user_ids: npt.ArrayLike,
    k: int,
    *,
    interactions: InteractionMatrix,
    score_rows: ScoreRows,
    fallback_scores: npt.NDArray[np.floating],
    exclude_seen: bool = True,
    scored_rows: npt.NDArray[np.bool_] | None = None,
) -> tuple[IntArray, FloatArray]:
    """Top-``k`` items for any users: warm ones scored by ``score_rows``, cold ones by fallback.

    Args:
        user_ids: ``(n_users,)`` ids; those not in ``interactions`` are cold.
        k: items per user.
        interactions: the training window's users × items matrix (what each user has seen).
        score_rows: scores of warm users, given their rows in ``interactions``.
        fallback_scores: ``(n_items,)`` scores of every cold user (popularity, usually).
        exclude_seen: set the scores of a warm user's seen items to ``-inf``.
        scored_rows: ``(n_rows,)`` which rows of ``interactions`` the model learned anything
            from (``None``: all); the others get the fallback, seen items still excluded. A
            user whose every event decayed to nothing scores all items alike (ALS and EASE
            give 0 everywhere, BPR its random initial factor), which would list arbitrary
            items.

    Returns:
        As :meth:`Retriever.recommend`: ``(n_users, k)`` int64 ids and float32 scores.
    """
    _check_k(k)
    rows = interactions.rows_of(np.asarray(user_ids, dtype=np.int64).reshape(-1))
    n_items = len(interactions.item_ids)
    items = np.full((len(rows), k), PAD_ITEM, dtype=np.int64)
    values = np.full((len(rows), k), -np.inf, dtype=np.float32)
    fallback = np.asarray(fallback_scores, dtype=np.float32)
    batch = max(1, MAX_BATCH_CELLS // max(n_items, 1))
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        known = chunk >= 0
        warm = known.copy()
        if scored_rows is not None:
            warm[known] = scored_rows[chunk[known]]
        scores = np.empty((len(chunk), n_items), dtype=np.float32)
        scores[~warm] = fallback
        if warm.any():
            scores[warm] = score_rows(chunk[warm])
        if exclude_seen and known.any():
            seen = interactions.user_items[chunk[known]].tocoo()
            scores[np.flatnonzero(known)[seen.row], seen.col] = -np.inf
        out = slice(start, start + len(chunk))
        items[out], values[out] = top_k_items(scores, k, item_ids=interactions.item_ids)
    return items, values


def check_fitted(retriever: object, attribute: str) -> None:
    """Raise a readable error when ``recommend`` comes before ``fit``."""
    if not hasattr(retriever, attribute):
        name = type(retriever).__name__
        raise RuntimeError(f"{name} is not fitted yet; call {name}.fit(train) before recommend")


def _check_k(k: int) -> None:
    if k < 0:
        raise ValueError(f"k must be >= 0 items per user, got {k}")
