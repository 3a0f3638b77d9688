"""Scoring ranked lists of test users: ranking metrics per segment with bootstrap intervals,
by activity decile, beyond-accuracy metrics, and the re-ranking stage applied to ranked lists.

:class:`ListScorer` holds what every method's lists are scored against (the targets, the
catalog, item categories and popularity, each user's already-seen items), so every method in a
report is scored by the same code on the same users.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from mlsd.evaluation.metrics import (
    average_precision_at_k_score,
    catalog_coverage_score,
    hit_rate_at_k_score,
    intra_list_diversity_score,
    ndcg_at_k_score,
    novelty_score,
    precision_at_k_score,
    recall_at_k_score,
)
from mlsd.evaluation.retrieval import (
    Estimate,
    EvalTask,
    ProtocolConfig,
    compare,
    estimates,
)
from mlsd.evaluation.retrieval_report import Comparison
from mlsd.evaluation.stages import Rows
from mlsd.models.ranking.base import FloatArray
from mlsd.models.retrieval.base import IntArray
from mlsd.serving.rerank import RerankConfig, boost_ages, rerank_lists


@dataclass(frozen=True)
class MethodScores:
    """One method on the test users.

    Attributes:
        kind: ``"baseline"`` (a source alone, full ranking), ``"ranker"`` (candidates ordered
            by one ranker, no re-ranking) or ``"pipeline"`` (the full pipeline).
        metrics: segment → metric (``ndcg@10``, ``recall@20``, ...) → estimate (None: empty).
        beyond: ``ild@10``, ``novelty@10``, ``coverage@10``.
        deciles: user-activity bucket → NDCG@10 mean (``cold`` and ``d1``..``d10``).
    """

    name: str
    kind: str
    metrics: dict[str, dict[str, Estimate | None]]
    beyond: dict[str, float]
    deciles: dict[str, float]


RELEVANT_MAP = "map_relevant"
"""MAP@k with each user's AP divided by #relevant rather than min(k, #relevant) (``map@k``):
Microsoft Recommenders' definition, measured only for the random-per-user protocol."""


class ListScorer:
    """Scores ``(n_users, K)`` lists of the test users: metrics, segments, deciles, beyond."""

    def __init__(
        self,
        task: EvalTask,
        protocol: ProtocolConfig,
        ks: Sequence[int],
        rows: Rows,
        *,
        relevant_map: bool = False,
    ) -> None:
        """``relevant_map`` adds ``map_relevant@k``: MAP@k dividing by #relevant, the definition
        of published tables (Microsoft Recommenders), beside mlsd's ``map@k``."""
        self.task = task
        self.relevant_map = relevant_map
        self.protocol = protocol
        self.ks = tuple(ks)
        train = task.train
        self.catalog = train.items["item_id"].to_numpy(np.int64)
        top = int(
            max(
                self.catalog.max(initial=0),
                train.events["item_id"].max() if len(train.events) else 0,
            )
        )
        self.categories = category_codes(train.items, top)
        counts = train.events.groupby("item_id")["user_id"].nunique()
        self.popularity = np.zeros(top + 1)
        self.popularity[counts.index.to_numpy(np.int64)] = counts.to_numpy(np.float64)
        self.popularity /= max(train.events["user_id"].nunique(), 1)
        activity = train.events.groupby("user_id").size()
        self.activity = pd.Series(task.user_ids).map(activity).fillna(0).to_numpy(np.float64)
        self.first_event_days = item_days(rows.pairs, "item_age_days", top)
        self.created_days = item_days(rows.pairs, "item_created_days", top)
        self.seen = seen_by_user(train.events, task.user_ids)
        if task.exclude is not None:  # a given split's validation items: seen as well
            self.seen = [np.union1d(a, b) for a, b in zip(self.seen, task.exclude, strict=True)]
        self._per_user: dict[str, dict[str, npt.NDArray[np.float64]]] = {}

    def rerank(self, ranked: IntArray, scores: FloatArray, config: RerankConfig) -> IntArray:
        at = np.maximum(ranked, 0)
        ages = boost_ages(self.first_event_days[at], self.created_days[at], config.freshness_clock)
        ages[ranked < 0] = np.nan
        return rerank_lists(
            ranked,
            scores,
            k=max(self.ks),
            config=config,
            item_categories=self.categories,
            item_age_days=ages,
            seen=self.seen,
        ).item_ids

    def per_user(self, lists: IntArray) -> dict[str, npt.NDArray[np.float64]]:
        relevant = self.task.relevant
        out: dict[str, npt.NDArray[np.float64]] = {}
        for k in self.ks:
            top = lists[:, :k]
            out[f"ndcg@{k}"] = ndcg_at_k_score(top, relevant, k=k)
            out[f"recall@{k}"] = recall_at_k_score(top, relevant, k=k)
            out[f"precision@{k}"] = precision_at_k_score(top, relevant, k=k)
            out[f"map@{k}"] = average_precision_at_k_score(top, relevant, k=k)
            if self.relevant_map:
                out[f"{RELEVANT_MAP}@{k}"] = average_precision_at_k_score(
                    top, relevant, k=k, denominator="relevant"
                )
            out[f"hit_rate@{k}"] = hit_rate_at_k_score(top, relevant, k=k)
        return out

    def score(self, name: str, kind: str, lists: IntArray) -> MethodScores:
        """The method's metrics; its per-user scores are kept for :meth:`compare`."""
        per_user = self.per_user(lists)
        self._per_user[name] = per_user
        return MethodScores(
            name,
            kind,
            estimates(per_user, self.task, self.protocol),
            self.beyond(lists),
            self.deciles(per_user[f"ndcg@{min(self.ks)}"]),
        )

    def compare(self, method: str, baselines: Sequence[str], metric: str) -> list[Comparison]:
        """``method`` against each of ``baselines`` (all scored already) on ``metric``: the
        ratio and difference of their means, resampling the same users for both."""
        return [
            compare(self._per_user, method, baseline, metric, self.task, self.protocol)
            for baseline in baselines
        ]

    def beyond(self, lists: IntArray) -> dict[str, float]:
        k = min(self.ks)
        top = lists[:, :k]
        return {
            f"ild@{k}": float(np.nanmean(intra_list_diversity_score(top, self.categories, k=k))),
            f"novelty@{k}": float(np.nanmean(novelty_score(top, self.popularity, k=k))),
            f"coverage@{k}": catalog_coverage_score(top, catalog=self.catalog, k=k),
        }

    def deciles(self, ndcg: npt.NDArray[np.float64]) -> dict[str, float]:
        out: dict[str, float] = {}
        cold = ~self.task.warm
        if cold.any():
            out["cold"] = float(np.mean(ndcg[cold]))
        warm = np.flatnonzero(self.task.warm)
        if len(warm):
            order = warm[np.argsort(self.activity[warm], kind="stable")]
            for d, part in enumerate(np.array_split(order, min(10, len(order))), start=1):
                out[f"d{d}"] = float(np.mean(ndcg[part]))
        return out

    def variant(self, label: str, lists: IntArray) -> dict[str, Any]:
        k = min(self.ks)
        ndcg = ndcg_at_k_score(lists[:, :k], self.task.relevant, k=k)
        return {"variant": label, f"ndcg@{k}": float(np.mean(ndcg)), **self.beyond(lists)}


def group_ndcg(labels: FloatArray, scores: FloatArray, groups: IntArray, *, k: int) -> float:
    """Mean NDCG@k of each group's rows ordered by ``scores`` (binary gains = ``labels``),
    over groups with a positive: how well a ranker orders the candidates it is given."""
    order = np.lexsort((-scores, groups))
    g, hit = groups[order], labels[order] > 0
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    rank = np.arange(len(g)) - np.repeat(starts, np.diff(np.r_[starts, len(g)]))
    discount = np.where(rank < k, 1.0 / np.log2(rank + 2.0), 0.0)
    group_index = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(g)]))
    dcg = np.bincount(group_index, weights=discount * hit, minlength=len(starts))
    positives = np.bincount(group_index, weights=hit, minlength=len(starts)).astype(np.int64)
    ideal_by_count = np.r_[0.0, np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))]
    ideal = ideal_by_count[np.minimum(positives, k)]
    has = positives > 0
    return float(np.mean(dcg[has] / ideal[has])) if has.any() else math.nan


def category_codes(items: pd.DataFrame, top: int) -> IntArray:
    """Category code per item id (index), -1 unknown."""
    out = np.full(top + 1, -1, dtype=np.int64)
    if "category" not in items.columns:
        return out
    codes, _ = pd.factorize(items["category"].astype("string"), use_na_sentinel=True)
    ids = items["item_id"].to_numpy(np.int64)
    inside = ids <= top
    out[ids[inside]] = codes[inside]
    return out


def item_days(pairs: pd.DataFrame, column: str, top: int) -> FloatArray:
    """Per item id, the candidate rows' ``column`` (an age in days as of the test cutoff:
    ``item_age_days`` or ``item_created_days``), NaN where unknown."""
    out = np.full(top + 1, np.nan)
    if column in pairs.columns:
        ids = pairs["item_id"].to_numpy(np.int64)
        age = pairs[column].to_numpy(np.float64)
        ok = (ids <= top) & (age >= 0)
        out[ids[ok]] = age[ok]
    return out


def seen_by_user(events: pd.DataFrame, user_ids: IntArray) -> list[IntArray]:
    """Each user's distinct items in ``events`` (e.g. before the cutoff: the re-ranker removes
    them), in the order of ``user_ids``; empty for a user without any."""
    pairs = events[["user_id", "item_id"]].drop_duplicates().sort_values("user_id")
    users = pairs["user_id"].to_numpy(np.int64)
    items = pairs["item_id"].to_numpy(np.int64)
    lo = np.searchsorted(users, user_ids, side="left")
    hi = np.searchsorted(users, user_ids, side="right")
    return [items[a:b] for a, b in zip(lo.tolist(), hi.tolist(), strict=True)]
