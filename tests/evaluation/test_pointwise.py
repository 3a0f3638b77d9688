"""Pointwise metrics: hand-computed cases, agreement with scikit-learn, errors."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.calibration import calibration_curve as sk_calibration_curve
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import mean_absolute_error, mean_squared_error
from sklearn.metrics import roc_auc_score as sk_roc_auc_score

from mlsd.evaluation import metrics, pointwise
from mlsd.evaluation.pointwise import (
    calibration_curve,
    expected_calibration_error,
    grouped_auc_score,
    log_loss,
    mae_loss,
    rmse_loss,
    roc_auc_score,
)

# --- calibration ------------------------------------------------------------------------------


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


# --- ROC AUC and grouped AUC ------------------------------------------------------------------


def test_auc_hand_computed_with_ties() -> None:
    # Pairs (pos, neg): (0.8, 0.1) win, (0.8, 0.4) win, (0.4, 0.1) win, (0.4, 0.4) tie -> 3.5 / 4.
    assert roc_auc_score([0, 0, 1, 1], [0.1, 0.4, 0.4, 0.8]) == pytest.approx(0.875)
    assert roc_auc_score([1, 0], [0.2, 0.9]) == 0.0
    assert roc_auc_score([True, False, True], [5.0, 5.0, 5.0]) == 0.5  # all tied: coin flip


@settings(max_examples=200, deadline=None)
@given(
    labels=st.lists(st.integers(0, 1), min_size=2, max_size=60),
    seed=st.integers(0, 2**32 - 1),
    n_distinct=st.integers(1, 8),
)
def test_auc_matches_sklearn_including_ties(labels: list[int], seed: int, n_distinct: int) -> None:
    y_true = np.array(labels)
    if y_true.min() == y_true.max():
        y_true[0] = 1 - y_true[0]
    rng = np.random.default_rng(seed)
    y_score = rng.integers(0, n_distinct, size=y_true.size) * 0.5 - 1.0  # few values: many ties
    assert roc_auc_score(y_true, y_score) == pytest.approx(sk_roc_auc_score(y_true, y_score))


def test_auc_is_invariant_to_monotone_transforms_and_flips_with_negation() -> None:
    rng = np.random.default_rng(5)
    y_score = rng.normal(size=400)
    y_true = (rng.uniform(size=400) < 1 / (1 + np.exp(-2 * y_score))).astype(int)
    auc = roc_auc_score(y_true, y_score)
    assert auc > 0.7
    assert roc_auc_score(y_true, np.exp(3 * y_score)) == pytest.approx(auc)
    assert roc_auc_score(y_true, -y_score) == pytest.approx(1 - auc)


def test_auc_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="only label 1"):
        roc_auc_score([1, 1, 1], [0.1, 0.2, 0.3])


def test_grouped_auc_hand_computed_and_unweighted() -> None:
    y_true = [1, 0, 0, 1, 0, 0, 1, 1]
    y_score = [0.9, 0.1, 0.2, 0.3, 0.5, 0.4, 0.7, 0.8]
    groups = [7, 7, 7, 3, 3, 3, 9, 9]
    # group 7 (3 samples): positive on top -> 1.0; group 3 (3 samples): positive last -> 0.0;
    # group 9: only positives -> skipped.
    assert grouped_auc_score(y_true, y_score, groups) == pytest.approx(0.5)
    # Move sample 2 (label 0, score 0.2) to group 3: group 7 keeps 2 samples (AUC 1); group 3
    # has 4, its positive (0.3) beats 1 of 3 negatives (AUC 1/3). Size weights are 2:4.
    groups[2] = 3
    assert grouped_auc_score(y_true, y_score, groups) == pytest.approx((2 * 1 + 4 / 3) / 6)
    assert grouped_auc_score(y_true, y_score, groups, weighted=False) == pytest.approx(2 / 3)


def test_grouped_auc_differs_from_global_auc_when_groups_differ_in_base_score() -> None:
    # Within each user the order is perfect, but user "b" scores everything higher, so globally
    # b's negatives outrank a's positive: GAUC = 1, global AUC < 1.
    y_true = [1, 0, 1, 0]
    y_score = [0.3, 0.1, 0.9, 0.7]
    groups = ["a", "a", "b", "b"]
    assert grouped_auc_score(y_true, y_score, groups) == 1.0
    assert roc_auc_score(y_true, y_score) == pytest.approx(0.75)


@pytest.mark.parametrize("weighted", [True, False])
def test_grouped_auc_matches_per_group_sklearn(weighted: bool) -> None:
    rng = np.random.default_rng(6)
    n = 3000
    groups = rng.integers(0, 150, size=n)
    y_score = np.round(rng.normal(size=n), 1)  # rounded: ties within groups
    y_true = (rng.uniform(size=n) < 1 / (1 + np.exp(-y_score - 0.1 * (groups % 7)))).astype(int)
    aucs, sizes = [], []
    for g in np.unique(groups):
        mask = groups == g
        if 0 < y_true[mask].sum() < mask.sum():
            aucs.append(sk_roc_auc_score(y_true[mask], y_score[mask]))
            sizes.append(mask.sum())
    expected = np.average(aucs, weights=sizes if weighted else None)
    got = grouped_auc_score(y_true, y_score, groups, weighted=weighted)
    assert got == pytest.approx(expected)


def test_grouped_auc_is_nan_when_no_group_has_both_labels() -> None:
    assert np.isnan(grouped_auc_score([1, 0, 1], [0.2, 0.3, 0.4], [1, 2, 3]))


# --- log loss and regression ------------------------------------------------------------------


def test_log_loss_hand_computed_and_clipped() -> None:
    expected = -(np.log(0.8) + np.log(1 - 0.4)) / 2
    assert log_loss([1, 0], [0.8, 0.4]) == pytest.approx(expected)
    # A certain mistake costs -log(eps), not infinity.
    assert log_loss([1], [0.0]) == pytest.approx(-np.log(1e-15))
    assert log_loss([1], [0.0], eps=1e-3) == pytest.approx(-np.log(1e-3))
    assert log_loss([1, 0], [1.0, 0.0]) == pytest.approx(0.0, abs=1e-12)


def test_log_loss_of_base_rate_is_label_entropy() -> None:
    y_true = np.array([1, 0, 0, 0] * 25)
    entropy = -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))
    assert log_loss(y_true, np.full(100, 0.25)) == pytest.approx(entropy)
    assert log_loss(y_true, np.full(100, 0.5)) > entropy  # any other constant is worse


@pytest.mark.parametrize("seed", range(5))
def test_log_loss_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y_prob = rng.uniform(0.001, 0.999, size=500)
    y_true = (rng.uniform(size=500) < y_prob).astype(int)
    assert log_loss(y_true, y_prob) == pytest.approx(sk_log_loss(y_true, y_prob, labels=[0, 1]))


def test_regression_losses_hand_computed() -> None:
    y_true, y_pred = [1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 3.0, 1.0]  # errors 1, 0, 0, 3
    assert rmse_loss(y_true, y_pred) == pytest.approx(np.sqrt(10 / 4))
    assert mae_loss(y_true, y_pred) == pytest.approx(1.0)
    assert rmse_loss(y_true, y_true) == 0.0


@settings(max_examples=100, deadline=None)
@given(
    pairs=st.lists(
        st.tuples(st.floats(-1e6, 1e6, allow_nan=False), st.floats(-1e6, 1e6, allow_nan=False)),
        min_size=1,
        max_size=50,
    )
)
def test_regression_losses_match_sklearn(pairs: list[tuple[float, float]]) -> None:
    y_true, y_pred = np.array(pairs).T
    rmse = rmse_loss(y_true, y_pred)
    assert rmse == pytest.approx(np.sqrt(mean_squared_error(y_true, y_pred)), rel=1e-9, abs=1e-9)
    assert mae_loss(y_true, y_pred) == pytest.approx(
        mean_absolute_error(y_true, y_pred), rel=1e-9, abs=1e-9
    )
    assert rmse >= mae_loss(y_true, y_pred) - 1e-9  # quadratic mean >= arithmetic mean


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: roc_auc_score([0, 1], [0.5]), "y_score must have the same length"),
        (lambda: roc_auc_score([0, 2], [0.5, 0.1]), "binary labels"),
        (lambda: roc_auc_score([0, 1], [0.5, np.nan]), "y_score holds NaN at index 1"),
        (lambda: grouped_auc_score([0, 1], [0.5, 0.1], [1]), "groups must have shape"),
        (lambda: log_loss([0, 1], [0.5, 0.5], eps=0.0), r"eps must be in \(0, 0.5\)"),
        (lambda: log_loss([0, 1], [0.5, 1.2]), r"in \[0, 1\]"),
        (lambda: rmse_loss([1.0, np.inf], [1.0, 2.0]), "y_true must be finite"),
        (lambda: mae_loss([1.0, 2.0], [1.0, np.inf]), "y_pred must be finite"),
        (lambda: mae_loss([], []), "empty"),
        (lambda: rmse_loss([[1.0]], [[1.0]]), "1-D"),
    ],
)
def test_pointwise_bad_inputs_raise_clear_errors(call, message) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_every_pointwise_name_stays_importable_from_metrics() -> None:
    for name in ("calibration_curve", "expected_calibration_error", "roc_auc_score", "log_loss"):
        assert getattr(metrics, name) is getattr(pointwise, name)
    for name in ("grouped_auc_score", "rmse_loss", "mae_loss", "CalibrationCurve"):
        assert getattr(metrics, name) is getattr(pointwise, name)


def test_docstring_examples_hold() -> None:
    result = doctest.testmod(pointwise)
    assert result.attempted >= 7
    assert result.failed == 0
