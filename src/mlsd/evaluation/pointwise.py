"""Pointwise metrics: one prediction per sample, scored against one label, as pure functions.

Calibration metrics ask whether a predicted probability means what it says: among exposures
scored 0.02, about 2% should be clicks. ROC AUC only needs the order of the scores; a bidder,
a pacing controller or a downsampled model's correction need the values as well, which is what
log loss and calibration measure. Grouped AUC ranks within each user (or query) only, as a
feed does: a global AUC also rewards separating heavy from light users, which no single
request ever needs.

``*_score`` is higher-is-better and ``*_loss`` lower-is-better, as in scikit-learn.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import numpy.typing as npt

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


def _check_pair(
    y_true: npt.ArrayLike, y_other: npt.ArrayLike, other: str
) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.float64]]:
    """Validate two non-empty 1-D arrays of equal length; the second as float64, no NaN."""
    labels = np.asarray(y_true)
    values = np.asarray(y_other, dtype=np.float64)
    if labels.ndim != 1 or values.ndim != 1:
        raise ValueError(
            f"y_true and {other} must be 1-D, got shapes {labels.shape} and {values.shape}"
        )
    if labels.shape != values.shape:
        raise ValueError(
            f"y_true and {other} must have the same length, got {labels.size} and {values.size}"
        )
    if labels.size == 0:
        raise ValueError(f"y_true and {other} are empty; the metric needs at least one sample")
    if np.isnan(values).any():
        raise ValueError(f"{other} holds NaN at index {int(np.flatnonzero(np.isnan(values))[0])}")
    return labels, values


def _check_binary_labels(labels: npt.NDArray[np.generic]) -> npt.NDArray[np.float64]:
    unique = np.unique(labels)
    if not np.isin(unique, [0, 1]).all():
        raise ValueError(
            f"y_true must hold binary labels 0/1 (or booleans), got values {unique[:10].tolist()}"
        )
    return labels.astype(np.float64)


def _check_binary_probs(
    y_true: npt.ArrayLike, y_prob: npt.ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Validate labels in {0, 1} and probabilities in [0, 1]; return both as float64 1-D."""
    labels, probs = _check_pair(y_true, y_prob, "y_prob")
    if probs.min() < 0.0 or probs.max() > 1.0:
        raise ValueError(
            f"y_prob must hold probabilities in [0, 1], got range [{probs.min()}, {probs.max()}]"
        )
    return _check_binary_labels(labels), probs


def _check_regression(
    y_true: npt.ArrayLike, y_pred: npt.ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    labels, preds = _check_pair(y_true, y_pred, "y_pred")
    targets = labels.astype(np.float64)
    for name, values in (("y_true", targets), ("y_pred", preds)):
        if not np.isfinite(values).all():
            raise ValueError(f"{name} must be finite, got {values[~np.isfinite(values)][0]}")
    return targets, preds


# --- Calibration ------------------------------------------------------------------------------


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


def log_loss(y_true: npt.ArrayLike, y_prob: npt.ArrayLike, *, eps: float = 1e-15) -> float:
    """Mean binary cross-entropy ``-mean(y log p + (1 - y) log(1 - p))``, natural log.

    Probabilities are clipped to ``[eps, 1 - eps]`` so one confident mistake costs
    ``-log(eps)`` (about 34.5 nats at the default) instead of infinity.

    Args:
        y_true: (n_samples,) binary labels 0/1.
        y_prob: (n_samples,) predicted probabilities of label 1, in [0, 1].
        eps: clipping bound, in (0, 0.5).

    Returns:
        The loss in nats, >= 0; a constant prediction at the base rate ``p`` scores the
        entropy ``-(p log p + (1 - p) log(1 - p))``, the baseline to beat.

    Example:
        >>> round(log_loss([1, 0], [0.5, 0.5]), 4)  # log 2
        0.6931
    """
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    labels, probs = _check_binary_probs(y_true, y_prob)
    probs = np.clip(probs, eps, 1.0 - eps)
    return float(-np.mean(labels * np.log(probs) + (1.0 - labels) * np.log1p(-probs)))


# --- Ranking quality of scores ----------------------------------------------------------------


def _auc_per_group(
    labels: npt.NDArray[np.float64], scores: npt.NDArray[np.float64], codes: npt.NDArray[np.intp]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """AUC of each group code in ``0..codes.max()`` (NaN without both classes), and sizes.

    One sort for all groups: Mann-Whitney U from within-group average ranks, so tied scores
    count 1/2 and a million impressions take one ``lexsort`` instead of a Python loop.
    """
    n_groups = int(codes.max()) + 1
    order = np.lexsort((scores, codes))
    group, score, label = codes[order], scores[order], labels[order]
    new_block = np.ones(len(order), dtype=bool)  # a block is a run of tied (group, score)
    new_block[1:] = (group[1:] != group[:-1]) | (score[1:] != score[:-1])
    block_start = np.flatnonzero(new_block)
    block_end = np.append(block_start[1:], len(order))
    mean_position = (block_start + block_end - 1) / 2.0
    sizes = np.bincount(group, minlength=n_groups)
    group_start = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = mean_position[np.cumsum(new_block) - 1] - group_start[group] + 1.0
    n_pos = np.bincount(group, weights=label, minlength=n_groups)
    n_neg = sizes - n_pos
    pos_rank_sum = np.bincount(group, weights=rank * label, minlength=n_groups)
    both = (n_pos > 0) & (n_neg > 0)
    u_statistic = pos_rank_sum - n_pos * (n_pos + 1.0) / 2.0
    auc = np.where(both, u_statistic / np.where(both, n_pos * n_neg, 1.0), np.nan)
    return np.asarray(auc, dtype=np.float64), sizes.astype(np.int64)


def roc_auc_score(y_true: npt.ArrayLike, y_score: npt.ArrayLike) -> float:
    """Area under the ROC curve: the chance a random positive outscores a random negative.

    Ties count 1/2 (average ranks), as in ``sklearn.metrics.roc_auc_score``.

    Args:
        y_true: (n_samples,) binary labels 0/1.
        y_score: (n_samples,) scores, any scale (only their order matters), no NaN.

    Returns:
        AUC in [0, 1]; 0.5 is random order.

    Example:
        >>> roc_auc_score([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
        0.75
    """
    labels, scores = _check_pair(y_true, y_score, "y_score")
    labels = _check_binary_labels(labels)
    auc, _ = _auc_per_group(labels, scores, np.zeros(len(labels), dtype=np.intp))
    if np.isnan(auc[0]):
        raise ValueError(
            f"y_true holds only label {int(labels[0])}; ROC AUC needs positives and negatives"
        )
    return float(auc[0])


def grouped_auc_score(
    y_true: npt.ArrayLike, y_score: npt.ArrayLike, groups: npt.ArrayLike, *, weighted: bool = True
) -> float:
    """Mean per-group ROC AUC (GAUC) over the groups that hold both labels.

    Groups with a single class have no AUC and are skipped; they are typically users with
    no click at all, which is why the global AUC and GAUC can disagree.

    Args:
        y_true: (n_samples,) binary labels 0/1.
        y_score: (n_samples,) scores, no NaN.
        groups: (n_samples,) group key of each sample (user or request id; any dtype).
        weighted: weight each group by its number of samples (impressions), as in DIN's
            GAUC; ``False`` gives every qualifying group the same weight.

    Returns:
        GAUC in [0, 1], or NaN if no group holds both labels.

    Example:
        >>> grouped_auc_score([0, 1, 0, 1, 1], [0.2, 0.1, 0.3, 0.9, 0.5], ["a", "a", "b", "b", "c"])
        0.5
    """
    labels, scores = _check_pair(y_true, y_score, "y_score")
    labels = _check_binary_labels(labels)
    keys = np.asarray(groups)
    if keys.shape != labels.shape:
        raise ValueError(f"groups must have shape {labels.shape} like y_true, got {keys.shape}")
    _, codes = np.unique(keys, return_inverse=True)
    auc, sizes = _auc_per_group(labels, scores, codes.reshape(-1).astype(np.intp))
    qualifies = ~np.isnan(auc)
    if not qualifies.any():
        return float("nan")
    weights = sizes[qualifies] if weighted else np.ones(int(qualifies.sum()))
    return float(np.average(auc[qualifies], weights=weights))


# --- Regression ---------------------------------------------------------------------------------


def rmse_loss(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> float:
    """Root mean squared error, in the units of ``y_true``; large errors dominate.

    Args:
        y_true: (n_samples,) finite targets.
        y_pred: (n_samples,) finite predictions.

    Returns:
        RMSE >= 0.

    Example:
        >>> rmse_loss([1.0, 2.0, 3.0], [1.0, 2.0, 6.0])  # sqrt(9 / 3)
        1.7320508075688772
    """
    targets, preds = _check_regression(y_true, y_pred)
    return float(np.sqrt(np.mean((targets - preds) ** 2)))


def mae_loss(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> float:
    """Mean absolute error, in the units of ``y_true``; robust to a few large errors.

    Args:
        y_true: (n_samples,) finite targets.
        y_pred: (n_samples,) finite predictions.

    Returns:
        MAE >= 0.

    Example:
        >>> mae_loss([1.0, 2.0, 3.0], [1.0, 2.0, 6.0])
        1.0
    """
    targets, preds = _check_regression(y_true, y_pred)
    return float(np.mean(np.abs(targets - preds)))
