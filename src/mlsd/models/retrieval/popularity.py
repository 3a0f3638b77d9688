"""Time-decayed popularity: the baseline every retriever must beat, and every one's fallback.

An event ``age`` days before the cutoff adds ``2 ** (-age / half_life_days)`` to its item's
score, so a week-old event counts half when the half-life is 7 days; ``half_life_days=None``
counts every event once. Recent popularity is what a new (cold) user is most likely to pick.
"""

from __future__ import annotations

import copy
from typing import Self

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
from mlsd.models.retrieval.topk import check_fitted, recommend_from_scores

SECONDS_PER_DAY = 86_400.0

DEFAULT_HALF_LIFE_DAYS = 30.0
"""Default half-life of :class:`PopularityRetriever`, so of every retriever's cold-user answer."""


def decay_weights(
    events: pd.DataFrame, *, cutoff: pd.Timestamp, half_life_days: float | None
) -> npt.NDArray[np.float64]:
    """``(n_events,)`` weight ``2 ** (-age_days / half_life_days)`` of each event; 1 if None."""
    if half_life_days is None:
        return np.ones(len(events), dtype=np.float64)
    if not half_life_days > 0:
        raise ValueError(f"half_life_days must be > 0 days (or None), got {half_life_days}")
    age_days = np.asarray((cutoff - events["ts"]).dt.total_seconds()) / SECONDS_PER_DAY
    return np.exp2(-age_days / half_life_days)


def item_popularity(
    events: pd.DataFrame,
    item_ids: IntArray,
    *,
    cutoff: pd.Timestamp,
    half_life_days: float | None,
) -> FloatArray:
    """Decayed event count of each catalog item as of ``cutoff``.

    Args:
        events: ``item_id`` and ``ts`` columns, all before ``cutoff``.
        item_ids: ``(n_items,)`` sorted catalog ids; events on other items are ignored.
        cutoff: the time the counts are "as of".
        half_life_days: days after which an event counts half; ``None`` for plain counts.

    Returns:
        ``(n_items,)`` float32 scores, 0 for items without events.
    """
    event_items = events["item_id"].to_numpy(dtype=np.int64)
    weights = decay_weights(events, cutoff=cutoff, half_life_days=half_life_days)
    cols = np.minimum(np.searchsorted(item_ids, event_items), max(len(item_ids) - 1, 0))
    in_catalog = item_ids[cols] == event_items if len(item_ids) else np.zeros(0, dtype=bool)
    scores = np.bincount(cols[in_catalog], weights=weights[in_catalog], minlength=len(item_ids))
    return scores.astype(np.float32)


def decayed_user_items(
    train: RetrievalData, interactions: InteractionMatrix, half_life_days: float | None
) -> sp.csr_matrix:
    """``interactions.user_items`` with each event weighted by its decay (the same rows/columns).

    Events so old that their weight underflows float32 drop out instead of staying as explicit
    zeros (which ``implicit`` would read as a preference of 0 with a confidence of 0).
    """
    if half_life_days is None:
        return interactions.user_items
    weights = decay_weights(train.events, cutoff=train.cutoff, half_life_days=half_life_days)
    events = train.events.assign(_decay=weights.astype(np.float32))
    decayed = InteractionMatrix.from_events(events, interactions.item_ids, weight="_decay")
    user_items = decayed.user_items
    user_items.eliminate_zeros()
    return user_items


class PopularityRetriever(Retriever):
    """The same most-popular list for every user (minus what they have seen).

    Args:
        half_life_days: an event ``half_life_days`` old counts half; ``None`` counts all alike.

    Attributes:
        popularity_: ``(n_items,)`` float32 decayed count per catalog item.
        interactions_: the training window's users × items matrix (for ``exclude_seen``).
    """

    name = "popularity"

    popularity_: FloatArray
    interactions_: InteractionMatrix

    def __init__(self, half_life_days: float | None = DEFAULT_HALF_LIFE_DAYS) -> None:
        self.half_life_days = half_life_days

    def fit(self, train: RetrievalData) -> Self:
        self.interactions_ = InteractionMatrix.from_events(train.events, train.items["item_id"])
        self.popularity_ = item_popularity(
            train.events,
            self.interactions_.item_ids,
            cutoff=train.cutoff,
            half_life_days=self.half_life_days,
        )
        return self

    def recommend(
        self, user_ids: npt.ArrayLike, k: int, *, exclude_seen: bool = True
    ) -> tuple[IntArray, FloatArray]:
        check_fitted(self, "popularity_")
        n_items = len(self.popularity_)
        return recommend_from_scores(
            user_ids,
            k,
            interactions=self.interactions_,
            score_rows=lambda rows: np.broadcast_to(self.popularity_, (len(rows), n_items)),
            fallback_scores=self.popularity_,
            exclude_seen=exclude_seen,
        )


def fit_fallback(fallback: PopularityRetriever | None, train: RetrievalData) -> PopularityRetriever:
    """A fitted copy of ``fallback`` (default :class:`PopularityRetriever`) for cold users.

    The copy leaves the caller's hyperparameter object untouched, as scikit-learn's ``clone``.
    """
    model = PopularityRetriever() if fallback is None else copy.deepcopy(fallback)
    return model.fit(train)
