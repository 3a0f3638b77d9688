"""Calibration metrics: hand-computed cases, agreement with scikit-learn, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.calibration import calibration_curve as sk_calibration_curve

from mlsd.evaluation.metrics import calibration_curve, expected_calibration_error


def test_ece_hand_computed_two_bins() -> None:
    # bin [0, 0.5]: preds 0.1, 0.2 (mean 0.15), labels 0, 0 -> gap 0.15, weight 2/5
    # bin (0.5, 1]: preds 0.6, 0.7, 0.9 (mean 0.7333), labels 1, 1, 1 -> gap 0.2667, weight 3/5
    y_true = [0, 0, 1, 1, 1]
    y_prob = [0.1, 0.2, 0.6, 0.7, 0.9]
    expected = 2 / 5 * 0.15 + 3 / 5 * (1 - (0.6 + 0.7 + 0.9) / 3)
    assert expected_calibration_error(y_true, y_prob, n_bins=2) == pytest.approx(expected)
    assert expected == pytest.approx(0.22)


def test_ece_constant_prediction_is_gap_to_base_rate() -> None:
    y_true = np.array([1, 0, 1, 0, 0, 0, 0, 0, 1, 0])  # base rate 0.3
    assert expected_calibration_error(y_true, np.full(10, 0.05)) == pytest.approx(0.25)
    assert expected_calibration_error(y_true, np.full(10, 0.3)) == pytest.approx(0.0)


def test_ece_zero_when_each_bin_matches_its_rate() -> None:
    # 4 samples at 0.25 with one positive, 4 at 0.75 with three positives.
    y_true = [1, 0, 0, 0, 1, 1, 1, 0]
    y_prob = [0.25] * 4 + [0.75] * 4
    assert expected_calibration_error(y_true, y_prob, n_bins=10) == pytest.approx(0.0)
    assert expected_calibration_error(y_true, y_prob, strategy="quantile") == pytest.approx(0.0)


def test_ece_one_bin_is_gap_of_means() -> None:
    rng = np.random.default_rng(0)
    y_prob = rng.uniform(size=1000)
    y_true = rng.integers(0, 2, size=1000)
    expected = abs(y_true.mean() - y_prob.mean())
    assert expected_calibration_error(y_true, y_prob, n_bins=1) == pytest.approx(expected)


def test_ece_ignores_sample_order_and_accepts_booleans() -> None:
    rng = np.random.default_rng(1)
    y_prob = rng.uniform(size=500)
    y_true = rng.uniform(size=500) < y_prob**2
    perm = rng.permutation(500)
    ece = expected_calibration_error(y_true, y_prob)
    assert ece > 0.05  # p**2 labels are miscalibrated by design
    assert expected_calibration_error(y_true[perm], y_prob[perm]) == pytest.approx(ece)


def test_ece_of_calibrated_model_is_near_noise_floor() -> None:
    rng = np.random.default_rng(2)
    y_prob = rng.uniform(size=200_000)
    y_true = rng.uniform(size=y_prob.size) < y_prob
    # Noise floor: sum_b (n_b/n) sqrt(p_b(1-p_b)/n_b) <= sqrt(0.25 / 20_000) ~ 0.0035.
    assert expected_calibration_error(y_true, y_prob) < 0.006
    # Squeezing towards 0.5 breaks calibration by |p - 0.5| / 2 on average = 0.125.
    assert expected_calibration_error(y_true, 0.5 + (y_prob - 0.5) / 2) == pytest.approx(
        0.125, abs=0.01
    )


def test_calibration_curve_hand_computed() -> None:
    curve = calibration_curve([0, 1, 0, 1, 1], [0.05, 0.15, 0.15, 0.95, 1.0], n_bins=4)
    # Bins [0, .25], (.25, .5], (.5, .75], (.75, 1]; the middle two are empty and left out.
    np.testing.assert_allclose(curve.prob_pred, [(0.05 + 0.15 + 0.15) / 3, 0.975])
    np.testing.assert_allclose(curve.prob_true, [1 / 3, 1.0])
    np.testing.assert_array_equal(curve.counts, [3, 2])


def test_values_on_bin_edges_go_to_the_lower_bin() -> None:
    curve = calibration_curve([0, 1, 1], [0.0, 0.5, 1.0], n_bins=2)
    np.testing.assert_array_equal(curve.counts, [2, 1])
    np.testing.assert_allclose(curve.prob_pred, [0.25, 1.0])


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
@pytest.mark.parametrize("n_bins", [1, 5, 10, 17])
def test_calibration_curve_matches_sklearn(strategy: str, n_bins: int) -> None:
    rng = np.random.default_rng(n_bins)
    # Beta-distributed scores crowd near 0 like click rates; a few sit exactly on edges.
    y_prob = np.concatenate([rng.beta(0.5, 4.0, size=3000), [0.0, 0.1, 0.2, 0.5, 1.0]])
    y_true = (rng.uniform(size=y_prob.size) < y_prob).astype(int)
    curve = calibration_curve(y_true, y_prob, n_bins=n_bins, strategy=strategy)  # type: ignore[arg-type]
    sk_true, sk_pred = sk_calibration_curve(y_true, y_prob, n_bins=n_bins, strategy=strategy)
    np.testing.assert_allclose(curve.prob_true, sk_true)
    np.testing.assert_allclose(curve.prob_pred, sk_pred)
    assert curve.counts.sum() == y_prob.size
    assert np.all(curve.counts > 0)


def test_quantile_bins_hold_equal_counts() -> None:
    y_prob = np.linspace(0.001, 0.05, 1000)  # all in the first uniform bin
    y_true = np.zeros(1000, dtype=int)
    assert len(calibration_curve(y_true, y_prob, n_bins=10).counts) == 1
    quantile = calibration_curve(y_true, y_prob, n_bins=10, strategy="quantile")
    np.testing.assert_array_equal(quantile.counts, np.full(10, 100))


@pytest.mark.parametrize(
    ("y_true", "y_prob", "kwargs", "message"),
    [
        ([0, 1], [0.5], {}, "same length"),
        ([], [], {}, "empty"),
        ([0, 2], [0.5, 0.5], {}, "binary labels"),
        ([0, 1], [0.5, 1.5], {}, r"in \[0, 1\]"),
        ([0, 1], [0.5, np.nan], {}, "NaN"),
        ([[0, 1]], [[0.5, 0.5]], {}, "1-D"),
        ([0, 1], [0.5, 0.5], {"n_bins": 0}, "positive integer"),
        ([0, 1], [0.5, 0.5], {"strategy": "equal"}, "'uniform' or 'quantile'"),
    ],
)
def test_bad_inputs_raise_clear_errors(y_true, y_prob, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        expected_calibration_error(y_true, y_prob, **kwargs)
