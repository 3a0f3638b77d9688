"""Segment popularity: what users like the requester picked lately, one vote per user.

A cold-start source that differs from :class:`~mlsd.models.retrieval.popularity.PopularityRetriever`
in three ways:

1. **One vote per user.** Each user's events share a weight of 1 (times the time decay), so a
   user who rated 500 films counts as much as one who rated 20. Recall is a mean over users,
   so a light user matters as much as a heavy one; plain event counts let a few heavy raters
   set the list (ML-100K, validation window, 30-day half-life: recall@200 0.56 against 0.53).
2. **Segments.** Votes are also counted within each of the user's attribute segments
   (``gender``, ``age_bucket``, ...), shrunk towards everyone's by ``prior_users`` pseudo-users:
   ``P_c(i | s) = (V_s(i) + m · G(i)) / (V_s + m)`` with ``G`` the share of all votes. A user's
   score is the mean of ``P_c`` over their attributes, so a user *with attributes but no events*
   (a cold user) already gets a list of their own. Users without attributes get ``G``.
3. **A half-life the data picks.** With several ``half_life_days``, each is fit on the training
   window minus its last ``holdout_frac`` of events and scored by recall@:data:`HOLDOUT_K` on the
   users active in that tail; the best is refit on the whole window. Only events before the
   cutoff are read, so the choice cannot leak. (MovieLens-100K's seven months want two weeks to a
   month; ML-latest-small's sparse last years want about two years.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

import numpy as np
import numpy.typing as npt
import pandas as pd

from mlsd.models.retrieval.base import (
    FloatArray,
    IntArray,
    InteractionMatrix,
    RetrievalData,
    Retriever,
)
from mlsd.models.retrieval.popularity import decay_weights
from mlsd.models.retrieval.topk import check_fitted, recommend_from_scores

HOLDOUT_K = 200
"""List length whose recall on the held-out tail picks the half-life (the merge's list length)."""

MAX_SEGMENT_LEVELS = 30
"""``segment_by=None`` segments by every user attribute with 2 to this many distinct values."""


def auto_segment_columns(users: pd.DataFrame) -> tuple[str, ...]:
    """User attributes with 2..:data:`MAX_SEGMENT_LEVELS` values (skips ids, zip codes, ages)."""
    return tuple(
        str(c)
        for c in users.columns
        if c != "user_id" and 2 <= users[c].nunique(dropna=True) <= MAX_SEGMENT_LEVELS
    )


def mean_of_tables(tables: Sequence[FloatArray], levels: IntArray) -> FloatArray:
    """``(n, n_items)`` float32 scores of ``(n, n_columns)`` attribute levels: the mean over the
    columns of each column's table row, level -1 (attribute missing) taking the table's last
    row, the global share. Offline ``profile_scores_`` and serving's unseen combinations both
    come from here: the same float32 additions in column order, so the same bits."""
    n_items = tables[0].shape[1] if tables else 0
    total = np.zeros((len(levels), n_items), dtype=np.float32)
    for column, table in enumerate(tables):
        total += table[levels[:, column]]
    scores: FloatArray = total / np.float32(max(len(tables), 1))
    return scores


def user_votes(
    events: pd.DataFrame, *, cutoff: pd.Timestamp, half_life_days: float | None
) -> npt.NDArray[np.float64]:
    """``(n_events,)`` weight of each event: its decay over its user's event count."""
    per_user = events.groupby("user_id")["user_id"].transform("size").to_numpy(np.float64)
    votes: npt.NDArray[np.float64] = (
        decay_weights(events, cutoff=cutoff, half_life_days=half_life_days) / per_user
    )
    return votes


class SegmentPopularityRetriever(Retriever):
    """Recent popularity among the user's segments, each user one vote (module docstring).

    Args:
        segment_by: ``users`` columns to segment by; ``None`` takes every attribute with 2 to
            :data:`MAX_SEGMENT_LEVELS` values (none on datasets without demographics, which
            leaves one-vote-per-user global popularity); ``()`` never segments.
        prior_users: pseudo-users of global taste added to every segment (shrinkage ``m``);
            a segment of ``m`` users is half its own votes, half everyone's.
        half_life_days: one half-life in days, or several to choose from on the held-out tail
            (the first wins ties and is used when the tail has no users to score).
        holdout_frac: the last share of the training events (by time) that scores the
            half-lives.

    Attributes:
        half_life_days_: the half-life used.
        holdout_recall_: half-life → recall@:data:`HOLDOUT_K` on the tail (empty with one).
        segment_columns_: the columns segmented by.
        popularity_: ``(n_items,)`` float32 share of all votes per catalog item (``G``).
        segment_tables_: per column of ``segment_columns_``, ``(n_levels + 1, n_items)``
            float32: each level's shrunk share ``P_c(i | s)``, then the global share (the row
            of a missing attribute). A user's score is :func:`mean_of_tables` of their levels,
            so serving scores any combination of levels, seen at fit time or not.
        profile_scores_: ``(n_profiles, n_items)`` float32 scores of each distinct combination
            of attribute values (among the users table's users).
        profile_levels_: ``(n_profiles, n_columns)`` level of each profile per column
            (-1: missing); ``level_values_``: per column, the value (as a string) of each level.
        user_profile_: ``(n_users,)`` profile of each row of ``interactions_``.
        interactions_: users × items seen before the cutoff; its rows include every user of
            the users table, so users with attributes but no events are scored, not fallen back.
    """

    name = "segment_popularity"

    half_life_days_: float
    holdout_recall_: dict[float, float]
    segment_columns_: tuple[str, ...]
    popularity_: FloatArray
    segment_tables_: tuple[FloatArray, ...]
    profile_scores_: FloatArray
    user_profile_: IntArray
    profile_levels_: IntArray
    level_values_: tuple[tuple[str, ...], ...]
    interactions_: InteractionMatrix

    def __init__(
        self,
        segment_by: tuple[str, ...] | None = None,
        prior_users: float = 10.0,
        half_life_days: tuple[float, ...] = (14.0, 30.0, 90.0, 365.0, 730.0),
        holdout_frac: float = 0.1,
    ) -> None:
        self.segment_by = segment_by
        self.prior_users = prior_users
        self.half_life_days = half_life_days
        self.holdout_frac = holdout_frac

    def fit(self, train: RetrievalData) -> Self:
        self._check_params(train.users)
        if len(self.half_life_days) == 1:
            self.holdout_recall_ = {}
            half_life = float(self.half_life_days[0])
        else:
            self.holdout_recall_ = self._score_half_lives(train)
            half_life = max(self.holdout_recall_, key=self.holdout_recall_.__getitem__)
        self.half_life_days_ = half_life
        self.segment_columns_ = (
            auto_segment_columns(train.users) if self.segment_by is None else self.segment_by
        )
        self.interactions_ = InteractionMatrix.from_events(
            train.events, train.items["item_id"], users=train.users["user_id"]
        )
        votes = user_votes(train.events, cutoff=train.cutoff, half_life_days=half_life)
        self._fit_scores(train, votes)
        return self

    def recommend(
        self, user_ids: npt.ArrayLike, k: int, *, exclude_seen: bool = True
    ) -> tuple[IntArray, FloatArray]:
        check_fitted(self, "profile_scores_")
        return recommend_from_scores(
            user_ids,
            k,
            interactions=self.interactions_,
            score_rows=lambda rows: self.profile_scores_[self.user_profile_[rows]],
            fallback_scores=self.popularity_,
            exclude_seen=exclude_seen,
        )

    def _check_params(self, users: pd.DataFrame) -> None:
        if not self.half_life_days or min(self.half_life_days) <= 0:
            raise ValueError(
                f"half_life_days must hold one or more half-lives > 0 days, got "
                f"{self.half_life_days}"
            )
        if self.prior_users < 0 or not 0.0 < self.holdout_frac < 1.0:
            raise ValueError(
                f"prior_users must be >= 0 and holdout_frac in (0, 1), got {self.prior_users}, "
                f"{self.holdout_frac}"
            )
        missing = [c for c in self.segment_by or () if c not in users.columns]
        if missing:
            raise ValueError(
                f"SegmentPopularityRetriever.segment_by: {missing} not in the users table "
                f"(columns: {list(users.columns)}); name existing columns, or None to take "
                "every low-cardinality attribute"
            )

    def _fit_scores(self, train: RetrievalData, votes: npt.NDArray[np.float64]) -> None:
        """``popularity_``, ``profile_scores_`` and ``user_profile_`` from the event votes."""
        item_ids = self.interactions_.item_ids
        cols = np.searchsorted(item_ids, train.events["item_id"].to_numpy(np.int64))
        cols = np.minimum(cols, max(len(item_ids) - 1, 0))
        in_catalog = item_ids[cols] == train.events["item_id"].to_numpy(np.int64)
        cols, votes = cols[in_catalog], votes[in_catalog]
        overall = np.bincount(cols, weights=votes, minlength=len(item_ids))
        share = overall / max(overall.sum(), 1e-300)
        # Per column, the level of every matrix row (-1: no attribute) and of every event.
        row_users = self.interactions_.user_ids
        attributes = train.users.drop_duplicates("user_id").set_index("user_id")
        event_users = train.events["user_id"].to_numpy(np.int64)[in_catalog]
        row_levels, tables, level_values = [], [], []
        for column in self.segment_columns_:
            codes, uniques = pd.factorize(attributes[column])
            level_values.append(tuple(str(v) for v in uniques))
            level_of = pd.Series(codes, index=attributes.index)
            row_levels.append(level_of.reindex(row_users).fillna(-1).to_numpy(np.int64))
            event_level = level_of.reindex(event_users).fillna(-1).to_numpy(np.int64)
            table = self._segment_table(event_level, cols, votes, share, len(uniques))
            tables.append(np.ascontiguousarray(table, dtype=np.float32))
        self.level_values_ = tuple(level_values)
        self.segment_tables_ = tuple(tables)
        if not tables:  # no segments: one profile, the global share
            self.user_profile_ = np.zeros(len(row_users), dtype=np.int64)
            self.profile_levels_ = np.zeros((1, 0), dtype=np.int64)
            scores = share[np.newaxis, :]
        else:
            profiles, inverse = np.unique(np.stack(row_levels, axis=1), axis=0, return_inverse=True)
            self.user_profile_ = inverse.reshape(-1).astype(np.int64)
            self.profile_levels_ = profiles.astype(np.int64)
            scores = mean_of_tables(tables, self.profile_levels_)
        self.popularity_ = share.astype(np.float32)
        self.profile_scores_ = np.ascontiguousarray(scores, dtype=np.float32)

    def _segment_table(
        self,
        event_level: IntArray,
        cols: IntArray,
        votes: npt.NDArray[np.float64],
        share: npt.NDArray[np.float64],
        n_levels: int,
    ) -> npt.NDArray[np.float64]:
        """``(n_levels + 1, n_items)``: each level's shrunk vote share, then the global share."""
        known = event_level >= 0
        counts = np.zeros((n_levels, len(share)))
        np.add.at(counts, (event_level[known], cols[known]), votes[known])
        totals = counts.sum(axis=1, keepdims=True)
        shrunk = (counts + self.prior_users * share) / np.maximum(totals + self.prior_users, 1e-300)
        return np.vstack([shrunk, share])

    def _score_half_lives(self, train: RetrievalData) -> dict[float, float]:
        """Recall@HOLDOUT_K on the tail of the window of each half-life, fit on the rest."""
        events = train.events
        inner_cutoff = events["ts"].quantile(1.0 - self.holdout_frac)
        before, tail = events[events["ts"] < inner_cutoff], events[events["ts"] >= inner_cutoff]
        users, relevant = _relevant_items(before, tail)
        if len(before) == 0 or len(users) == 0:
            return {float(h): 0.0 for h in self.half_life_days}
        inner = RetrievalData(before.reset_index(drop=True), train.users, train.items, inner_cutoff)
        recall: dict[float, float] = {}
        for half_life in self.half_life_days:
            model = SegmentPopularityRetriever(
                self.segment_by, self.prior_users, (half_life,), self.holdout_frac
            ).fit(inner)
            items, _ = model.recommend(users, HOLDOUT_K, exclude_seen=True)
            recall.setdefault(float(half_life), _mean_recall(items, relevant))
        return recall


def _relevant_items(before: pd.DataFrame, tail: pd.DataFrame) -> tuple[IntArray, list[IntArray]]:
    """Users of ``tail`` and, for each, their tail items not seen in ``before``."""
    pairs = tail[["user_id", "item_id"]].drop_duplicates()
    seen = before[["user_id", "item_id"]].drop_duplicates()
    pairs = pairs.merge(seen, how="left", on=["user_id", "item_id"], indicator=True)
    pairs = pairs[pairs["_merge"] == "left_only"].sort_values(["user_id", "item_id"])
    users = pairs["user_id"].drop_duplicates().to_numpy(np.int64)
    starts = np.searchsorted(pairs["user_id"].to_numpy(np.int64), users)
    return users, np.split(pairs["item_id"].to_numpy(np.int64), starts[1:]) if len(users) else []


def _mean_recall(items: IntArray, relevant: Sequence[IntArray]) -> float:
    """Mean over rows of the share of each row's relevant items among its listed items."""
    hits = [np.isin(rel, row).sum() / len(rel) for row, rel in zip(items, relevant, strict=True)]
    return float(np.mean(hits))
