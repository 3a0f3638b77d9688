"""The offline stages of the full pipeline: retrieve → ranker rows → rank → re-rank.

Each function is one stage with explicit inputs and outputs, so the protocols of
:mod:`mlsd.evaluation.offline` (temporal, random per user) compose them in the same order the
request path runs them, and time them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from mlsd.data.leakage import assert_no_leakage
from mlsd.features.definitions import FeatureConfig
from mlsd.models.ranking.base import FloatArray, Ranker, RankingData
from mlsd.models.ranking.candidates import (
    FeatureLayout,
    SourceLists,
    Vocabulary,
    candidate_pairs,
    label_pairs,
    pair_features,
    ranker_frame,
    ranking_data,
)
from mlsd.models.retrieval.base import PAD_ITEM, IntArray, RetrievalData, Retriever
from mlsd.models.retrieval.merge import QUOTAS, Fusion, MergedCandidates, Quota, merge_by_segment
from mlsd.serving.rerank import first_k, rows_isin

SourceFactory = Callable[[], Retriever]
RankerFactory = Callable[[], Ranker]


@dataclass(frozen=True)
class Retrieved:
    """Every source fit on one window and asked for the same users.

    Attributes:
        lists: each source's ``(n_users, L)`` items and scores.
        fit_seconds, recommend_seconds: per source.
    """

    lists: SourceLists
    fit_seconds: dict[str, float]
    recommend_seconds: dict[str, float]


def retrieve(
    train: RetrievalData,
    user_ids: IntArray,
    sources: Mapping[str, SourceFactory],
    *,
    k: int,
    on_source: Callable[[str], None] | None = None,
    exclude: Sequence[IntArray] | None = None,
) -> Retrieved:
    """Fit each source on ``train`` and list ``k`` unseen items for every user; items of
    ``exclude`` (per user, aligned with ``user_ids``) are left out too."""
    items: dict[str, IntArray] = {}
    scores: dict[str, npt.NDArray[np.floating]] = {}
    fit_s: dict[str, float] = {}
    rec_s: dict[str, float] = {}
    for name, make in sources.items():
        if on_source is not None:
            on_source(name)
        start = time.perf_counter()
        retriever = make().fit(train)
        fitted = time.perf_counter()
        items[name], scores[name] = recommend_excluding(retriever, user_ids, k, exclude)
        fit_s[name] = fitted - start
        rec_s[name] = time.perf_counter() - fitted
    return Retrieved(SourceLists(items, scores), fit_s, rec_s)


def recommend_excluding(
    retriever: Retriever, user_ids: IntArray, k: int, exclude: Sequence[IntArray] | None
) -> tuple[IntArray, npt.NDArray[np.floating]]:
    """``retriever.recommend(user_ids, k)`` with each user's ``exclude`` items left out too
    (asking for ``k`` + the longest ``exclude`` and keeping the first ``k`` others)."""
    if exclude is None:
        return retriever.recommend(user_ids, k, exclude_seen=True)
    extra = max((len(e) for e in exclude), default=0)
    items, scores = retriever.recommend(user_ids, k + extra, exclude_seen=True)
    return first_k(items, scores, (items != PAD_ITEM) & ~rows_isin(items, exclude), k)


def merge(
    retrieved: Retrieved,
    quotas: Mapping[str, Quota],
    k: int,
    *,
    cold: npt.NDArray[np.bool_] | None = None,
    cold_quotas: Mapping[str, Quota] | None = None,
    fusion: Fusion = QUOTAS,
) -> MergedCandidates:
    """The merged candidates of :func:`retrieve`'s lists; the ``cold`` rows with
    ``cold_quotas`` when given (:func:`~mlsd.models.retrieval.merge.merge_by_segment`)."""
    return merge_by_segment(
        retrieved.lists.items, quotas, k, cold=cold, cold_quotas=cold_quotas, fusion=fusion
    )


@dataclass(frozen=True)
class Rows:
    """The ranker rows of one or more windows: raw pair features and the ranker's view.

    ``window`` is each row's window index (0 = the first, oldest, window given to
    :func:`to_rows`); empty when not known.
    """

    pairs: pd.DataFrame
    data: RankingData
    window: IntArray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def users(self) -> IntArray:
        """Each row's user id."""
        users: IntArray = self.pairs["user_id"].to_numpy(np.int64)
        return users


LABEL_PREFIX = "label:"
"""Label columns of a :func:`window_frame` (``label:click``, ``label:rating``)."""


def window_frame(
    user_ids: IntArray,
    merged: MergedCandidates,
    retrieved: Retrieved,
    *,
    dataset_dir: Path,
    train_events: pd.DataFrame,
    as_of: pd.Timestamp,
    label_window: pd.DataFrame,
    feature_config: FeatureConfig,
    items: pd.DataFrame | None = None,
    min_value: float | None = None,
) -> pd.DataFrame:
    """Candidate pairs with features as of ``as_of`` and labels from ``label_window``."""
    pairs = candidate_pairs(user_ids, merged, retrieved.lists)
    frame = pair_features(
        pairs,
        dataset_dir=dataset_dir,
        train_events=train_events,
        as_of=as_of,
        config=feature_config,
        items=items,
    )
    # The protocol's guard: every feature from events strictly before ``as_of``.
    stamped = frame[["user_id", "item_id", "feature_ts"]].assign(label_ts=as_of)
    assert_no_leakage(stamped, stamped[["user_id", "item_id", "label_ts"]])
    for name, values in label_pairs(pairs, label_window, min_value=min_value).items():
        frame[LABEL_PREFIX + name] = values
    return frame


def to_rows(
    frames: list[pd.DataFrame],
    feature_config: FeatureConfig,
    vocabulary: Vocabulary | None = None,
) -> tuple[Rows, Vocabulary, FeatureLayout]:
    """Stack window frames into ranker rows; a group is one user in one window.

    Fits the vocabulary on these rows unless one is given (the ranker's, at test time).
    """
    frame = pd.concat(frames, ignore_index=True)
    window = np.repeat(np.arange(len(frames)), [len(f) for f in frames])
    layout = FeatureLayout.of(frame, feature_config)
    if vocabulary is None:
        vocabulary = Vocabulary().fit(frame, layout.categorical)
    features, schema = ranker_frame(frame, layout, vocabulary, feature_config)
    labels = {
        c.removeprefix(LABEL_PREFIX): frame[c].to_numpy(np.float64)
        for c in frame.columns
        if c.startswith(LABEL_PREFIX)
    }
    users = frame["user_id"].to_numpy(np.int64)
    key = window * (int(users.max(initial=0)) + 1) + users
    data = ranking_data(features, schema, labels, key)
    return Rows(frame, data, window.astype(np.int64)), vocabulary, layout


def split_groups(
    data: RankingData, users: IntArray, *, valid_frac: float, seed: int
) -> tuple[RankingData, RankingData]:
    """Whole users into a fit part and a validation part.

    ``users`` is each row's user id. ``valid_frac`` of the distinct users (at least one when
    there are two or more), drawn with ``seed``, are held out with every row they have, in
    every window: a held-out user has no row in the fit part. A group (one user in one
    window) is therefore never split either.
    """
    users = np.asarray(users, dtype=np.int64)
    if len(users) != len(data.groups):
        raise ValueError(f"split_groups: {len(users)} user ids for {len(data.groups)} rows")
    distinct = np.unique(users)
    rng = np.random.default_rng(seed)
    n_valid = max(1, round(valid_frac * len(distinct))) if len(distinct) > 1 else 0
    valid = rng.choice(distinct, size=n_valid, replace=False)
    in_valid = np.isin(users, valid)
    return data.take(np.flatnonzero(~in_valid)), data.take(np.flatnonzero(in_valid))


def rank_lists(
    user_ids: IntArray, pairs: pd.DataFrame, scores: FloatArray, *, k: int
) -> tuple[IntArray, FloatArray]:
    """Each user's candidates ordered by ``scores``: ``(n_users, k)`` ids (-1 padded), scores."""
    users = pairs["user_id"].to_numpy(np.int64)
    items = pairs["item_id"].to_numpy(np.int64)
    row = np.searchsorted(user_ids, users)
    if not (np.all(np.diff(user_ids) > 0) and np.array_equal(user_ids[row], users)):
        raise ValueError("rank_lists: user_ids must be sorted and hold every pair's user")
    order = np.lexsort((-scores, row))
    row, items, ordered = row[order], items[order], scores[order]
    starts = np.searchsorted(row, np.arange(len(user_ids)))
    col = np.arange(len(row)) - starts[row]
    keep = col < k
    out_items = np.full((len(user_ids), k), PAD_ITEM, dtype=np.int64)
    out_scores = np.full((len(user_ids), k), -np.inf, dtype=np.float64)
    out_items[row[keep], col[keep]] = items[keep]
    out_scores[row[keep], col[keep]] = ordered[keep]
    return out_items, out_scores
