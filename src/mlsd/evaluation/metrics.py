"""Offline metrics as pure functions, scikit-learn style: ``f(y_true, y_prob, *, options)``.

Calibration metrics ask whether a predicted probability means what it says: among exposures
scored 0.02, about 2% should be clicks. Ranking metrics only need the order of the scores;
a bidder, a pacing controller or a downsampled model's correction need the values as well.
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
