"""Offline metrics as pure functions, scikit-learn style: ``f(inputs, *, options)``.

Ranking metrics (precision, recall, hit rate, NDCG, AP, reciprocal rank, all ``@k``) take a
recommended id matrix and each user's relevant items and return per-user scores, so the same
arrays feed a mean and a bootstrap confidence interval over users (:func:`bootstrap_mean_ci`).
Beyond-accuracy metrics (intra-list diversity, novelty) score the same matrix against item
metadata, because a list can be accurate and still show ten near-copies of the obvious hit.

Pointwise metrics (ROC AUC, grouped AUC, log loss, calibration, RMSE, MAE) live in
:mod:`mlsd.evaluation.pointwise` and are re-exported here, so callers import every offline
metric from this one module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, TypeAlias

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from mlsd.evaluation.pointwise import (
    BinStrategy,
    CalibrationCurve,
    calibration_curve,
    expected_calibration_error,
    grouped_auc_score,
    log_loss,
    mae_loss,
    rmse_loss,
    roc_auc_score,
)

__all__ = [
    "PAD",
    "BinStrategy",
    "CalibrationCurve",
    "MeanCI",
    "PairedCI",
    "RelevantItems",
    "average_precision_at_k_score",
    "bootstrap_mean_ci",
    "calibration_curve",
    "catalog_coverage_score",
    "expected_calibration_error",
    "grouped_auc_score",
    "hit_rate_at_k_score",
    "intra_list_diversity_score",
    "log_loss",
    "mae_loss",
    "ndcg_at_k_score",
    "novelty_score",
    "paired_bootstrap_ci",
    "precision_at_k_score",
    "recall_at_k_score",
    "reciprocal_rank_score",
    "rmse_loss",
    "roc_auc_score",
]


# --- Ranking metrics -------------------------------------------------------------------------
#
# Every ranking metric takes ``recommended``, an (n_users, K) matrix of item ids ranked best
# first and padded with -1, and ``relevant``, each user's relevant items, and returns one score
# per user (n_users,); the metric is their mean. Per-user scores are what a bootstrap over users
# resamples. All are higher-is-better (``*_score``).

RelevantItems: TypeAlias = sp.csr_matrix | sp.csr_array | Sequence[npt.ArrayLike]
"""Each user's relevant items: a CSR (n_users × item-id space) whose stored columns are the
relevant item ids and whose values are their gains (graded NDCG only; other metrics ignore
them), or a sequence of n_users 1-D arrays of item ids."""

PAD = -1
"""Item id filling a recommendation row that is shorter than K."""


class _Relevance(NamedTuple):
    """Relevant (user row, item) pairs as sorted keys ``row * stride + item``, with gains."""

    keys: npt.NDArray[np.int64]
    gains: npt.NDArray[np.float64]
    counts: npt.NDArray[np.int64]
    stride: int


def _check_recommended(recommended: npt.ArrayLike) -> npt.NDArray[np.int64]:
    rec = np.asarray(recommended)
    if rec.ndim != 2:
        raise ValueError(f"recommended must be 2-D (n_users, K), got shape {rec.shape}")
    if rec.size and not np.issubdtype(rec.dtype, np.integer):
        raise ValueError(f"recommended must hold integer item ids, got dtype {rec.dtype}")
    rec = rec.astype(np.int64, copy=False)
    if rec.size and rec.min() < PAD:
        raise ValueError(f"recommended holds item id {rec.min()}; ids are >= 0, padding is {PAD}")
    ordered = np.sort(rec, axis=1)
    repeated = (np.diff(ordered, axis=1) == 0) & (ordered[:, 1:] != PAD)
    if repeated.any():
        row = int(np.flatnonzero(repeated.any(axis=1))[0])
        raise ValueError(f"recommended row {row} lists an item twice; each row must be unique")
    return rec


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _relevance(relevant: RelevantItems, n_users: int, max_item: int) -> _Relevance:
    if sp.issparse(relevant):
        csr = sp.csr_matrix(relevant, dtype=np.float64, copy=True)
        csr.sum_duplicates()
        csr.eliminate_zeros()  # a stored gain of 0 is not relevant
        rows = np.repeat(np.arange(csr.shape[0], dtype=np.int64), np.diff(csr.indptr))
        items = csr.indices.astype(np.int64)
        gains = csr.data
        n_rows = csr.shape[0]
    else:
        arrays = [np.asarray(r).reshape(-1) for r in relevant]
        for user, user_items in enumerate(arrays):
            if user_items.size and not np.issubdtype(user_items.dtype, np.integer):
                raise ValueError(
                    f"relevant[{user}] must hold integer item ids, got dtype {user_items.dtype}"
                )
        unique = [np.unique(a.astype(np.int64, copy=False)) for a in arrays]
        rows = np.repeat(np.arange(len(unique), dtype=np.int64), [len(a) for a in unique])
        items = np.concatenate(unique) if unique else np.zeros(0, dtype=np.int64)
        gains = np.ones(len(items), dtype=np.float64)
        n_rows = len(unique)
    if n_rows != n_users:
        raise ValueError(f"relevant has {n_rows} users, recommended has {n_users}; they must match")
    if len(items) and items.min() < 0:
        raise ValueError(f"relevant holds item id {items.min()}; item ids must be >= 0")
    if (gains < 0).any():
        raise ValueError("relevant gains must be >= 0")
    stride = max(int(items.max(initial=0)), max_item, 0) + 1
    keys = rows * stride + items
    order = np.argsort(keys, kind="stable")
    counts = np.bincount(rows, minlength=n_users).astype(np.int64)
    return _Relevance(keys[order], gains[order], counts, stride)


def _gains_at(
    recommended: npt.ArrayLike, relevant: RelevantItems, k: int
) -> tuple[npt.NDArray[np.float64], _Relevance]:
    """Gain of each of the top-k recommended items, (n_users, k); 0 where irrelevant or padded."""
    rec = _check_recommended(recommended)
    k = _check_k(k)
    n_users = rec.shape[0]
    top = np.full((n_users, k), PAD, dtype=np.int64)
    width = min(k, rec.shape[1])
    top[:, :width] = rec[:, :width]
    rel = _relevance(relevant, n_users, int(top.max(initial=PAD)))
    gains = np.zeros(top.shape, dtype=np.float64)
    if len(rel.keys) == 0:
        return gains, rel
    keys = np.arange(n_users, dtype=np.int64)[:, None] * rel.stride + top
    pos = np.minimum(np.searchsorted(rel.keys, keys), len(rel.keys) - 1)
    hit = (rel.keys[pos] == keys) & (top != PAD)
    gains[hit] = rel.gains[pos[hit]]
    return gains, rel


def _per_relevant(
    numerator: npt.NDArray[Any], denominator: npt.NDArray[np.int64]
) -> npt.NDArray[np.float64]:
    """``numerator / denominator`` per user, NaN where the user has no relevant items."""
    ratio = numerator / np.maximum(denominator, 1)
    return np.asarray(np.where(denominator > 0, ratio, np.nan), dtype=np.float64)


def precision_at_k_score(
    recommended: npt.ArrayLike, relevant: RelevantItems, *, k: int
) -> npt.NDArray[np.float64]:
    """Per-user precision@k: relevant items among the top ``k``, divided by ``k``.

    A list shorter than ``k`` (padding) still divides by ``k``.

    Args:
        recommended: (n_users, K) item ids, best first, padded with -1.
        relevant: each user's relevant items (:data:`RelevantItems`).
        k: cutoff rank.

    Returns:
        (n_users,) scores in [0, 1]; their mean is precision@k.

    Example:
        >>> precision_at_k_score([[3, 1, 2, -1]], [[1, 2, 9]], k=4).tolist()
        [0.5]
    """
    gains, _ = _gains_at(recommended, relevant, k)
    return np.asarray((gains > 0).sum(axis=1) / k, dtype=np.float64)


def recall_at_k_score(
    recommended: npt.ArrayLike, relevant: RelevantItems, *, k: int
) -> npt.NDArray[np.float64]:
    """Per-user recall@k: relevant items among the top ``k``, divided by all relevant items.

    Args:
        recommended: (n_users, K) item ids, best first, padded with -1.
        relevant: each user's relevant items (:data:`RelevantItems`).
        k: cutoff rank.

    Returns:
        (n_users,) scores in [0, 1], NaN for a user without relevant items (drop those users
        or use ``np.nanmean``); their mean is recall@k.

    Example:
        >>> recall_at_k_score([[3, 1, 2]], [[1, 2, 9, 8]], k=2).tolist()
        [0.25]
    """
    gains, rel = _gains_at(recommended, relevant, k)
    return _per_relevant((gains > 0).sum(axis=1), rel.counts)


def hit_rate_at_k_score(
    recommended: npt.ArrayLike, relevant: RelevantItems, *, k: int
) -> npt.NDArray[np.float64]:
    """Per-user hit@k: 1.0 if any of the top ``k`` is relevant, else 0.0; the mean is hit rate.

    Args:
        recommended: (n_users, K) item ids, best first, padded with -1.
        relevant: each user's relevant items (:data:`RelevantItems`).
        k: cutoff rank.

    Returns:
        (n_users,) scores in {0, 1}.
    """
    gains, _ = _gains_at(recommended, relevant, k)
    return np.asarray((gains > 0).any(axis=1), dtype=np.float64)


def _discounts(k: int) -> npt.NDArray[np.float64]:
    return np.asarray(1.0 / np.log2(np.arange(2, k + 2)), dtype=np.float64)


def ndcg_at_k_score(
    recommended: npt.ArrayLike, relevant: RelevantItems, *, k: int, graded: bool = False
) -> npt.NDArray[np.float64]:
    """Per-user NDCG@k: discounted gain of the top ``k`` over that of the ideal top ``k``.

    ``DCG@k = sum_{i=1..k} gain_i / log2(i + 1)``; the ideal list puts the user's relevant items
    first in decreasing gain. Gains are linear, as in ``sklearn.metrics.ndcg_score``.

    Args:
        recommended: (n_users, K) item ids, best first, padded with -1.
        relevant: each user's relevant items (:data:`RelevantItems`).
        k: cutoff rank.
        graded: use the CSR values of ``relevant`` as gains (e.g. star ratings); otherwise
            every relevant item has gain 1 (binary NDCG).

    Returns:
        (n_users,) scores in [0, 1], NaN for a user without relevant items.

    Example:
        >>> round(float(ndcg_at_k_score([[5, 1]], [[1]], k=2)[0]), 4)  # 1 / log2(3)
        0.6309
    """
    if graded and not sp.issparse(relevant):
        raise ValueError(
            "graded NDCG reads the gains from a CSR of relevant items (values = gains); "
            "a sequence of id arrays carries no gains"
        )
    gains, rel = _gains_at(recommended, relevant, k)
    if not graded:
        gains = (gains > 0).astype(np.float64)
    discounts = _discounts(gains.shape[1])
    dcg = gains @ discounts
    if graded:
        rows = rel.keys // rel.stride
        # Gains of each user in decreasing order: sort by (row, -gain).
        order = np.lexsort((-rel.gains, rows))
        starts = np.concatenate([[0], np.cumsum(rel.counts)[:-1]])
        rank = np.arange(len(order)) - np.repeat(starts, rel.counts)
        keep = rank < gains.shape[1]
        ideal = np.bincount(
            rows[order][keep],
            weights=rel.gains[order][keep] * discounts[rank[keep]],
            minlength=len(rel.counts),
        )
    else:
        cumulative = np.concatenate([[0.0], np.cumsum(discounts)])
        ideal = cumulative[np.minimum(rel.counts, gains.shape[1])]
    ndcg = dcg / np.where(ideal > 0, ideal, 1.0)
    return np.asarray(np.where(ideal > 0, ndcg, np.nan), dtype=np.float64)


def average_precision_at_k_score(
    recommended: npt.ArrayLike,
    relevant: RelevantItems,
    *,
    k: int,
    denominator: Literal["min_k", "relevant"] = "min_k",
) -> npt.NDArray[np.float64]:
    """Per-user AP@k: the sum of precision@i at each relevant rank i <= k, over a denominator.

    ``AP@k = sum_{i<=k} P@i * rel_i / min(k, n_relevant)`` (``denominator="min_k"``, mlsd's
    MAP@k); ``denominator="relevant"`` divides by ``n_relevant`` instead, the definition of
    Microsoft Recommenders' ``map`` (its published tables), which is smaller whenever a user
    has more than ``k`` relevant items. The mean over users is MAP@k.

    Args:
        recommended: (n_users, K) item ids, best first, padded with -1.
        relevant: each user's relevant items (:data:`RelevantItems`).
        k: cutoff rank.
        denominator: ``"min_k"`` (``min(k, n_relevant)``) or ``"relevant"`` (``n_relevant``).

    Returns:
        (n_users,) scores in [0, 1], NaN for a user without relevant items.

    Example:
        >>> average_precision_at_k_score([[1, 5, 2]], [[1, 2]], k=3).tolist()  # (1 + 2/3) / 2
        [0.8333333333333333]
        >>> ap = average_precision_at_k_score([[1, 5]], [[1, 2, 7]], k=2, denominator="relevant")
        >>> ap.tolist()  # 1 / 3: one hit at rank 1, three relevant items
        [0.3333333333333333]
    """
    gains, rel = _gains_at(recommended, relevant, k)
    hits = (gains > 0).astype(np.float64)
    precision_at_i = np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1)
    numerator = (precision_at_i * hits).sum(axis=1)
    if denominator == "min_k":
        return _per_relevant(numerator, np.minimum(rel.counts, hits.shape[1]))
    if denominator == "relevant":
        return _per_relevant(numerator, rel.counts)
    raise ValueError(f"denominator={denominator!r}: use 'min_k' or 'relevant'")


def reciprocal_rank_score(
    recommended: npt.ArrayLike, relevant: RelevantItems, *, k: int | None = None
) -> npt.NDArray[np.float64]:
    """Per-user reciprocal rank of the first relevant item (0 if none); the mean is MRR.

    Args:
        recommended: (n_users, K) item ids, best first, padded with -1.
        relevant: each user's relevant items (:data:`RelevantItems`).
        k: look only at the top ``k`` (default: the whole list, K).

    Returns:
        (n_users,) scores in [0, 1].

    Example:
        >>> reciprocal_rank_score([[4, 5, 1], [7, 8, 9]], [[1], [2]]).tolist()
        [0.3333333333333333, 0.0]
    """
    rec = np.asarray(recommended)
    depth = k if k is not None else max(rec.shape[1] if rec.ndim == 2 else 1, 1)
    gains, _ = _gains_at(rec, relevant, depth)
    hits = gains > 0
    first = hits.argmax(axis=1)
    return np.asarray(np.where(hits.any(axis=1), 1.0 / (first + 1), 0.0), dtype=np.float64)


def catalog_coverage_score(
    recommended: npt.ArrayLike, *, catalog: npt.ArrayLike, k: int | None = None
) -> float:
    """Fraction of the catalog that appears in at least one user's top ``k``.

    Args:
        recommended: (n_users, K) item ids, best first, padded with -1.
        catalog: (n_items,) the item ids that could be recommended.
        k: look only at the top ``k`` (default: the whole list).

    Returns:
        Coverage in [0, 1]; ids outside ``catalog`` do not count.

    Example:
        >>> catalog_coverage_score([[1, 2], [2, 3]], catalog=[1, 2, 3, 4, 5, 6, 7, 8])
        0.375
    """
    rec = _check_recommended(recommended)
    items = np.unique(np.asarray(catalog, dtype=np.int64))
    if len(items) == 0:
        raise ValueError("catalog is empty; coverage needs at least one item")
    top = rec if k is None else rec[:, : _check_k(k)]
    shown = np.unique(top[top != PAD])
    return float(np.isin(items, shown).sum() / len(items))


# --- Beyond accuracy --------------------------------------------------------------------------


def _item_lookup(
    table: npt.NDArray[Any], top: npt.NDArray[np.int64], name: str
) -> npt.NDArray[Any]:
    """``table[item id]`` for every cell of ``top``; padded cells get ``table[0]`` (mask them)."""
    if table.ndim != 1 or table.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array indexed by item id")
    largest = int(top.max(initial=PAD))
    if largest >= table.size:
        raise ValueError(
            f"recommended holds item id {largest} but {name} has only {table.size} entries; "
            "build it over the same catalog as the recommendations"
        )
    return table[np.maximum(top, 0)]


def intra_list_diversity_score(
    recommended: npt.ArrayLike, item_categories: npt.ArrayLike, *, k: int
) -> npt.NDArray[np.float64]:
    """Per-user intra-list diversity: share of pairs in the top ``k`` from different categories.

    ``ILD = (pairs with different categories) / (n (n - 1) / 2)`` over the ``n <= k`` listed
    items, i.e. the mean pairwise dissimilarity with dissimilarity 1 across categories, 0 within.
    Category -1 (unknown) is one shared category, so two unknown items count as similar: a list
    of uncategorised items must not look diverse just because its metadata is missing. The
    same rule defines similarity in :mod:`mlsd.serving.rerank`.

    Args:
        recommended: (n_users, K) item ids, best first, padded with -1.
        item_categories: (n_items,) integer category code of each item id, -1 if unknown.
        k: cutoff rank.

    Returns:
        (n_users,) scores in [0, 1], NaN for a list with fewer than 2 items.

    Example:
        >>> intra_list_diversity_score([[0, 1, 2, 3]], [5, 7, 7, 7], k=4).tolist()  # 3 of 6 pairs
        [0.5]
    """
    rec = _check_recommended(recommended)
    top = rec[:, : _check_k(k)]
    table = np.asarray(item_categories)
    categories = _item_lookup(table, top, "item_categories")
    if not np.issubdtype(table.dtype, np.integer) or table.min() < -1:
        raise ValueError("item_categories must hold integer category codes >= 0, or -1 (unknown)")
    valid = top != PAD
    # Give each padded cell its own code below -1, so padding never forms a same-category pair.
    codes = np.where(valid, categories, PAD - 1 - np.arange(top.shape[1]))
    ordered = np.sort(codes, axis=1)
    columns = np.arange(top.shape[1])
    new_run = np.ones(ordered.shape, dtype=bool)
    new_run[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    run_start = np.maximum.accumulate(np.where(new_run, columns, 0), axis=1)
    same_pairs = (columns - run_start).sum(axis=1)  # each item pairs with the equal ones before
    n = valid.sum(axis=1)
    pairs = n * (n - 1) / 2
    diversity = 1.0 - same_pairs / np.maximum(pairs, 1)
    return np.asarray(np.where(n >= 2, diversity, np.nan), dtype=np.float64)


def novelty_score(
    recommended: npt.ArrayLike, item_popularity: npt.ArrayLike, *, k: int
) -> npt.NDArray[np.float64]:
    """Per-user novelty: mean self-information ``-log2(p_i)`` of the top ``k`` items, in bits.

    ``p_i`` is the share of training users who interacted with item ``i``; recommending only
    blockbusters (p near 1) scores near 0. Items no training user touched (``p_i = 0``) get the
    smallest non-zero share instead, so one cold item does not make the score infinite.

    Args:
        recommended: (n_users, K) item ids, best first, padded with -1.
        item_popularity: (n_items,) share of training users who interacted with each item id,
            in [0, 1] (``user_counts / n_train_users``).
        k: cutoff rank.

    Returns:
        (n_users,) scores >= 0, NaN for an empty list.

    Example:
        >>> novelty_score([[0, 1, 2]], [0.5, 0.25, 0.0], k=3).tolist()  # (1 + 2 + 2) / 3
        [1.6666666666666667]
    """
    rec = _check_recommended(recommended)
    top = rec[:, : _check_k(k)]
    shares = np.asarray(item_popularity, dtype=np.float64)
    popularity = _item_lookup(shares, top, "item_popularity")
    if not np.isfinite(shares).all() or shares.min() < 0 or shares.max() > 1:
        raise ValueError("item_popularity must hold shares of users in [0, 1], not counts")
    positive = shares[shares > 0]
    if positive.size == 0:
        raise ValueError("item_popularity is all zero; novelty needs some interacted item")
    valid = top != PAD
    bits = -np.log2(np.maximum(popularity, positive.min()))
    n = valid.sum(axis=1)
    mean_bits = np.where(valid, bits, 0.0).sum(axis=1) / np.maximum(n, 1)
    return np.asarray(np.where(n > 0, mean_bits, np.nan), dtype=np.float64)


class MeanCI(NamedTuple):
    """A mean with a percentile-bootstrap confidence interval."""

    mean: float
    low: float
    high: float


def bootstrap_mean_ci(
    values: npt.ArrayLike,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> MeanCI:
    """Mean of per-user scores and its percentile-bootstrap confidence interval.

    Users are resampled with replacement ``n_resamples`` times. The resamples depend only on
    ``seed`` and the number of users, so methods scored on the same users with the same seed
    see the same resamples (a paired comparison).

    Args:
        values: (n_users,) finite per-user scores.
        n_resamples: bootstrap resamples.
        confidence: coverage of the interval, in (0, 1).
        seed: seeds the resampling.

    Returns:
        ``MeanCI(mean, low, high)``.
    """
    (scores,) = _checked_scores("bootstrap_mean_ci", values, confidence=confidence)
    means = _resampled_means([scores], n_resamples=n_resamples, seed=seed)[:, 0]
    low, high = _percentile_interval(means, confidence)
    return MeanCI(float(scores.mean()), low, high)


class PairedCI(NamedTuple):
    """One method against another on the same users: the ratio and the difference of their
    means, each with a paired percentile-bootstrap confidence interval."""

    ratio: float
    ratio_low: float
    ratio_high: float
    difference: float
    difference_low: float
    difference_high: float


def paired_bootstrap_ci(
    values: npt.ArrayLike,
    baseline: npt.ArrayLike,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedCI:
    """``mean(values) / mean(baseline)`` and ``mean(values) - mean(baseline)``, with intervals
    from resampling the *users* (both arrays' entry ``i`` together).

    A ratio of two means whose own intervals overlap can still be clearly above 1: the same
    users are easy or hard for both methods, and a paired resample keeps that. The resamples
    are those of :func:`bootstrap_mean_ci` for the same ``seed`` and number of users (written
    here rather than with ``scipy.stats.bootstrap`` for that reason), so a report's intervals
    of the means and of their ratios come from the same draws.

    Args:
        values, baseline: (n_users,) finite per-user scores of the two methods, same users in
            the same order.
        n_resamples, confidence, seed: as :func:`bootstrap_mean_ci`.

    Returns:
        :class:`PairedCI`. The ratio's bounds are percentiles over the resamples whose baseline
        mean is positive: a resample that misses every user the baseline scores on has no
        ratio and is left out, so when many do (a baseline that scores on a handful of users)
        the upper bound understates the uncertainty. The ratio and its bounds are NaN when the
        baseline's mean is not positive (0, for this module's non-negative scores), the bounds
        also when no resample's is.
    """
    scores, base = _checked_scores("paired_bootstrap_ci", values, baseline, confidence=confidence)
    means = _resampled_means([scores, base], n_resamples=n_resamples, seed=seed)
    mean, mean_base = float(scores.mean()), float(base.mean())
    ratio = ratio_low = ratio_high = float("nan")
    if mean_base > 0:
        ratio = mean / mean_base
        defined = means[:, 1] > 0
        if defined.any():
            ratio_low, ratio_high = _percentile_interval(
                means[defined, 0] / means[defined, 1], confidence
            )
    diff_low, diff_high = _percentile_interval(means[:, 0] - means[:, 1], confidence)
    return PairedCI(ratio, ratio_low, ratio_high, mean - mean_base, diff_low, diff_high)


def _checked_scores(
    caller: str, *arrays: npt.ArrayLike, confidence: float
) -> list[npt.NDArray[np.float64]]:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    out = [np.asarray(values, dtype=np.float64).reshape(-1) for values in arrays]
    if out[0].size == 0:
        raise ValueError(f"{caller} needs at least one value")
    if any(scores.size != out[0].size for scores in out):
        sizes = [scores.size for scores in out]
        raise ValueError(f"{caller} needs one score per user in each array, got sizes {sizes}")
    if not all(np.isfinite(scores).all() for scores in out):
        raise ValueError(f"{caller} needs finite values; drop users with NaN scores")
    return out


def _resampled_means(
    arrays: list[npt.NDArray[np.float64]], *, n_resamples: int, seed: int
) -> npt.NDArray[np.float64]:
    """``(n_resamples, len(arrays))``: each array's mean over the same resamples of users."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    n = arrays[0].size
    means = np.empty((n_resamples, len(arrays)), dtype=np.float64)
    chunk = max(1, (1 << 22) // n)  # bounded memory: at most ~4M indices at a time
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        rows = rng.integers(0, n, size=(stop - start, n))
        for column, scores in enumerate(arrays):
            means[start:stop, column] = scores[rows].mean(axis=1)
    return means


def _percentile_interval(draws: npt.NDArray[np.float64], confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(draws, [tail, 100.0 - tail])
    return float(low), float(high)
