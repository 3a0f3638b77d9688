"""Offline metrics as pure functions, scikit-learn style: ``f(inputs, *, options)``.

Calibration metrics ask whether a predicted probability means what it says: among exposures
scored 0.02, about 2% should be clicks. Ranking metrics only need the order of the scores;
a bidder, a pacing controller or a downsampled model's correction need the values as well.

Ranking metrics (precision, recall, hit rate, NDCG, AP, reciprocal rank, all ``@k``) take a
recommended id matrix and each user's relevant items and return per-user scores, so the same
arrays feed a mean and a bootstrap confidence interval over users (:func:`bootstrap_mean_ci`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, TypeAlias

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

BinStrategy = Literal["uniform", "quantile"]


class CalibrationCurve(NamedTuple):
    """Reliability diagram data, one entry per non-empty bin, in increasing bin order.

    Attributes:
        prob_pred: (n_nonempty_bins,) mean predicted probability in the bin.
        prob_true: (n_nonempty_bins,) fraction of positives in the bin.
        counts: (n_nonempty_bins,) number of samples in the bin.
    """

    prob_pred: npt.NDArray[np.float64]
    prob_true: npt.NDArray[np.float64]
    counts: npt.NDArray[np.int64]


def _check_binary_probs(
    y_true: npt.ArrayLike, y_prob: npt.ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Validate labels in {0, 1} and probabilities in [0, 1]; return both as float64 1-D."""
    labels = np.asarray(y_true)
    probs = np.asarray(y_prob, dtype=np.float64)
    if labels.ndim != 1 or probs.ndim != 1:
        raise ValueError(
            f"y_true and y_prob must be 1-D, got shapes {labels.shape} and {probs.shape}"
        )
    if labels.shape != probs.shape:
        raise ValueError(
            f"y_true and y_prob must have the same length, got {labels.size} and {probs.size}"
        )
    if labels.size == 0:
        raise ValueError("y_true and y_prob are empty; calibration needs at least one sample")
    unique = np.unique(labels)
    if not np.isin(unique, [0, 1]).all():
        raise ValueError(
            f"y_true must hold binary labels 0/1 (or booleans), got values {unique[:10].tolist()}"
        )
    if np.isnan(probs).any() or probs.min() < 0.0 or probs.max() > 1.0:
        raise ValueError(
            "y_prob must hold probabilities in [0, 1] without NaN, "
            f"got range [{np.nanmin(probs)}, {np.nanmax(probs)}]"
        )
    return labels.astype(np.float64), probs


def _bin_ids(
    y_prob: npt.NDArray[np.float64], n_bins: int, strategy: BinStrategy
) -> npt.NDArray[np.intp]:
    """Bin index in [0, n_bins) of each probability, with scikit-learn's edges and tie rule."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
    elif strategy == "quantile":
        # Equal-mass bins: useful when predictions crowd near 0, as click rates do.
        edges = np.percentile(y_prob, np.linspace(0.0, 100.0, n_bins + 1))
    else:
        raise ValueError(f"strategy must be 'uniform' or 'quantile', got {strategy!r}")
    # Interior edges only, so 0 and 1 fall in the first and last bin; a value equal to an
    # edge goes to the lower bin (searchsorted side="left"), as in sklearn.
    return np.searchsorted(edges[1:-1], y_prob)


def calibration_curve(
    y_true: npt.ArrayLike,
    y_prob: npt.ArrayLike,
    *,
    n_bins: int = 10,
    strategy: BinStrategy = "uniform",
) -> CalibrationCurve:
    """Per-bin mean predicted probability, observed positive rate and count.

    Bins match ``sklearn.calibration.calibration_curve`` (which returns only the first two,
    in the order ``prob_true, prob_pred``); empty bins are left out.

    Args:
        y_true: (n_samples,) binary labels 0/1.
        y_prob: (n_samples,) predicted probabilities of label 1, in [0, 1].
        n_bins: number of bins over [0, 1] (``uniform``) or of equal-count bins (``quantile``).
        strategy: ``"uniform"`` for equal-width bins, ``"quantile"`` for equal-count bins.

    Returns:
        A :class:`CalibrationCurve` of arrays of shape (n_nonempty_bins,).

    Example:
        >>> curve = calibration_curve([0, 0, 1, 1], [0.25, 0.5, 0.75, 1.0], n_bins=2)
        >>> curve.prob_pred.tolist(), curve.prob_true.tolist(), curve.counts.tolist()
        ([0.375, 0.875], [0.0, 1.0], [2, 2])
    """
    labels, probs = _check_binary_probs(y_true, y_prob)
    bins = _bin_ids(probs, n_bins, strategy)
    counts = np.bincount(bins, minlength=n_bins)
    sum_pred = np.bincount(bins, weights=probs, minlength=n_bins)
    sum_true = np.bincount(bins, weights=labels, minlength=n_bins)
    nonempty = counts > 0
    return CalibrationCurve(
        prob_pred=sum_pred[nonempty] / counts[nonempty],
        prob_true=sum_true[nonempty] / counts[nonempty],
        counts=counts[nonempty].astype(np.int64),
    )


def expected_calibration_error(
    y_true: npt.ArrayLike,
    y_prob: npt.ArrayLike,
    *,
    n_bins: int = 10,
    strategy: BinStrategy = "uniform",
) -> float:
    """Expected calibration error: count-weighted mean |observed rate - mean prediction| per bin.

    ``ECE = sum_b (n_b / n) * |mean(y_true in b) - mean(y_prob in b)|``; lower is better,
    0 is perfectly calibrated at this binning. With finite samples it has a noise floor of
    roughly ``sum_b (n_b / n) * sqrt(p_b (1 - p_b) / n_b)`` even for a perfect model.

    Args:
        y_true: (n_samples,) binary labels 0/1.
        y_prob: (n_samples,) predicted probabilities of label 1, in [0, 1].
        n_bins: number of bins, as in :func:`calibration_curve`.
        strategy: ``"uniform"`` or ``"quantile"``, as in :func:`calibration_curve`.

    Returns:
        The ECE, in [0, 1].

    Example:
        >>> expected_calibration_error([0, 1, 1, 1], [0.25, 0.25, 0.75, 0.75], n_bins=2)
        0.25
    """
    curve = calibration_curve(y_true, y_prob, n_bins=n_bins, strategy=strategy)
    weights = curve.counts / curve.counts.sum()
    return float(np.sum(weights * np.abs(curve.prob_true - curve.prob_pred)))


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
        arrays = [np.asarray(r, dtype=np.int64).reshape(-1) for r in relevant]
        unique = [np.unique(a) for a in arrays]
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
    recommended: npt.ArrayLike, relevant: RelevantItems, *, k: int
) -> npt.NDArray[np.float64]:
    """Per-user AP@k: mean of precision@i at each relevant rank i <= k, over min(k, n_relevant).

    ``AP@k = sum_{i<=k} P@i * rel_i / min(k, n_relevant)``; the mean over users is MAP@k.

    Args:
        recommended: (n_users, K) item ids, best first, padded with -1.
        relevant: each user's relevant items (:data:`RelevantItems`).
        k: cutoff rank.

    Returns:
        (n_users,) scores in [0, 1], NaN for a user without relevant items.

    Example:
        >>> average_precision_at_k_score([[1, 5, 2]], [[1, 2]], k=3).tolist()  # (1 + 2/3) / 2
        [0.8333333333333333]
    """
    gains, rel = _gains_at(recommended, relevant, k)
    hits = (gains > 0).astype(np.float64)
    precision_at_i = np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1)
    numerator = (precision_at_i * hits).sum(axis=1)
    return _per_relevant(numerator, np.minimum(rel.counts, hits.shape[1]))


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
    scores = np.asarray(values, dtype=np.float64).reshape(-1)
    if scores.size == 0:
        raise ValueError("bootstrap_mean_ci needs at least one value")
    if not np.isfinite(scores).all():
        raise ValueError("bootstrap_mean_ci needs finite values; drop users with NaN scores")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    n = scores.size
    means = np.empty(n_resamples, dtype=np.float64)
    chunk = max(1, (1 << 22) // n)  # bounded memory: at most ~4M indices at a time
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        means[start:stop] = scores[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return MeanCI(float(scores.mean()), float(low), float(high))
