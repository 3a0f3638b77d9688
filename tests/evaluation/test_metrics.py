"""Calibration and ranking metrics: hand-computed cases, agreement with scikit-learn, errors."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.calibration import calibration_curve as sk_calibration_curve
from sklearn.metrics import ndcg_score

from mlsd.evaluation import metrics
from mlsd.evaluation.metrics import (
    average_precision_at_k_score,
    bootstrap_mean_ci,
    calibration_curve,
    catalog_coverage_score,
    expected_calibration_error,
    hit_rate_at_k_score,
    ndcg_at_k_score,
    precision_at_k_score,
    recall_at_k_score,
    reciprocal_rank_score,
)


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


# --- ranking metrics ---------------------------------------------------------------------------

# Three users; user 2 has a short (padded) list. Relevant: {2, 7}, {9}, {1, 3, 5}.
RECOMMENDED = np.array([[7, 4, 2, 6], [1, 2, 3, 4], [3, 5, -1, -1]])
RELEVANT = [np.array([2, 7]), np.array([9]), np.array([5, 1, 3])]


def test_precision_recall_hit_hand_computed() -> None:
    np.testing.assert_allclose(precision_at_k_score(RECOMMENDED, RELEVANT, k=2), [1 / 2, 0, 2 / 2])
    np.testing.assert_allclose(precision_at_k_score(RECOMMENDED, RELEVANT, k=4), [2 / 4, 0, 2 / 4])
    np.testing.assert_allclose(recall_at_k_score(RECOMMENDED, RELEVANT, k=1), [1 / 2, 0, 1 / 3])
    np.testing.assert_allclose(recall_at_k_score(RECOMMENDED, RELEVANT, k=3), [1.0, 0, 2 / 3])
    np.testing.assert_allclose(hit_rate_at_k_score(RECOMMENDED, RELEVANT, k=1), [1, 0, 1])


def test_ndcg_map_mrr_hand_computed() -> None:
    d = 1 / np.log2(np.arange(2, 6))  # discounts of ranks 1..4
    # user 0: hits at ranks 1 and 3; ideal: ranks 1 and 2.
    # user 2: hits at ranks 1 and 2 of 3 relevant; ideal@4 has 3 relevant in ranks 1..3.
    expected = [(d[0] + d[2]) / (d[0] + d[1]), 0.0, (d[0] + d[1]) / (d[0] + d[1] + d[2])]
    np.testing.assert_allclose(ndcg_at_k_score(RECOMMENDED, RELEVANT, k=4), expected)
    # AP@4: user 0 (1/1 + 2/3) / 2; user 2 (1 + 1) / min(4, 3).
    np.testing.assert_allclose(
        average_precision_at_k_score(RECOMMENDED, RELEVANT, k=4), [(1 + 2 / 3) / 2, 0, 2 / 3]
    )
    np.testing.assert_allclose(reciprocal_rank_score(RECOMMENDED, RELEVANT), [1, 0, 1])
    np.testing.assert_allclose(
        reciprocal_rank_score(np.array([[4, 3, 2, 7]]), [np.array([7, 2])]), [1 / 3]
    )
    assert reciprocal_rank_score(np.array([[4, 3, 2, 7]]), [np.array([7])], k=3).tolist() == [0]


def test_graded_ndcg_hand_computed() -> None:
    # Gains: item 1 -> 3, item 2 -> 1. The list [2, 1] has DCG 1 + 3/log2(3); ideal 3 + 1/log2(3).
    relevant = sp.csr_matrix(np.array([[0.0, 3.0, 1.0]]))
    got = ndcg_at_k_score(np.array([[2, 1]]), relevant, k=2, graded=True)
    np.testing.assert_allclose(got, [(1 + 3 / np.log2(3)) / (3 + 1 / np.log2(3))])
    # Binary NDCG of the same list and set is 1: both items are relevant.
    np.testing.assert_allclose(ndcg_at_k_score(np.array([[2, 1]]), relevant, k=2), [1.0])


def test_csr_and_list_forms_agree_and_k_beyond_the_list_pads() -> None:
    csr = sp.csr_matrix(
        (np.ones(6), ([0, 0, 1, 2, 2, 2], [2, 7, 9, 5, 1, 3])), shape=(3, 12), dtype=np.float64
    )
    for fn in (precision_at_k_score, recall_at_k_score, ndcg_at_k_score):
        np.testing.assert_allclose(fn(RECOMMENDED, csr, k=3), fn(RECOMMENDED, RELEVANT, k=3))
    # k = 10 > K = 4: the missing ranks count as misses.
    np.testing.assert_allclose(precision_at_k_score(RECOMMENDED, RELEVANT, k=10), [0.2, 0, 0.2])


def test_users_without_relevant_items_are_nan_where_undefined() -> None:
    rec = np.array([[1, 2], [3, 4]])
    relevant = [np.array([2]), np.array([], dtype=np.int64)]
    assert np.isnan(recall_at_k_score(rec, relevant, k=2)[1])
    assert np.isnan(ndcg_at_k_score(rec, relevant, k=2)[1])
    assert np.isnan(average_precision_at_k_score(rec, relevant, k=2)[1])
    assert precision_at_k_score(rec, relevant, k=2)[1] == 0.0
    assert reciprocal_rank_score(rec, relevant)[1] == 0.0
    assert recall_at_k_score(rec, relevant, k=2)[0] == 1.0


@pytest.mark.parametrize("k", [1, 3, 10, 40])
@pytest.mark.parametrize("graded", [False, True])
def test_ndcg_matches_sklearn(k: int, graded: bool) -> None:
    """Against sklearn's independent dense implementation (item ids = columns)."""
    rng = np.random.default_rng(k)
    n_users, n_items = 60, 40
    y_true = rng.integers(0, 6, size=(n_users, n_items)) * (
        rng.uniform(size=(n_users, n_items)) < 0.15
    )
    y_true[:, 0] = np.where(y_true.sum(axis=1) == 0, 2, y_true[:, 0])  # every user has one
    if not graded:
        y_true = (y_true > 0).astype(int)
    y_score = rng.normal(size=(n_users, n_items))  # continuous: no ties
    ranked = np.argsort(-y_score, axis=1)
    for width in (n_items, min(k, n_items)):  # the full ranking, and a list cut at k
        got = ndcg_at_k_score(ranked[:, :width], sp.csr_matrix(y_true), k=k, graded=graded)
        assert got.mean() == pytest.approx(ndcg_score(y_true, y_score, k=k))


def test_recall_is_monotone_and_complete_under_full_ranking() -> None:
    rng = np.random.default_rng(3)
    n_users, n_items = 50, 30
    ranked = np.argsort(rng.normal(size=(n_users, n_items)), axis=1)
    relevant = [rng.choice(n_items, size=rng.integers(1, 6), replace=False) for _ in range(n_users)]
    recalls = np.stack([recall_at_k_score(ranked, relevant, k=k) for k in range(1, n_items + 1)])
    assert (np.diff(recalls, axis=0) >= 0).all()
    np.testing.assert_allclose(recalls[-1], 1.0)
    n_rel = np.array([len(r) for r in relevant])
    np.testing.assert_allclose(
        precision_at_k_score(ranked, relevant, k=7) * 7,
        recall_at_k_score(ranked, relevant, k=7) * n_rel,
    )


def test_catalog_coverage() -> None:
    rec = np.array([[1, 2, -1], [2, 3, 99]])
    assert catalog_coverage_score(rec, catalog=np.arange(1, 9)) == pytest.approx(3 / 8)
    assert catalog_coverage_score(rec, catalog=np.arange(1, 9), k=1) == pytest.approx(2 / 8)
    with pytest.raises(ValueError, match="catalog is empty"):
        catalog_coverage_score(rec, catalog=[])


@pytest.mark.parametrize(
    ("recommended", "relevant", "kwargs", "message"),
    [
        (np.array([1, 2]), [np.array([1])], {"k": 1}, "must be 2-D"),
        (np.array([[1.5, 2.0]]), [np.array([1])], {"k": 1}, "integer item ids"),
        (np.array([[1, 1]]), [np.array([1])], {"k": 1}, "row 0 lists an item twice"),
        (np.array([[1, -2]]), [np.array([1])], {"k": 1}, "padding is -1"),
        (np.array([[1, 2]]), [np.array([1]), np.array([2])], {"k": 1}, "relevant has 2 users"),
        (np.array([[1, 2]]), [np.array([-3])], {"k": 1}, "must be >= 0"),
        (np.array([[1, 2]]), [np.array([1])], {"k": 0}, "positive integer"),
    ],
)
def test_ranking_bad_inputs_raise_clear_errors(recommended, relevant, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        recall_at_k_score(recommended, relevant, **kwargs)


def test_graded_ndcg_needs_gains() -> None:
    with pytest.raises(ValueError, match="graded NDCG reads the gains from a CSR"):
        ndcg_at_k_score(RECOMMENDED, RELEVANT, k=2, graded=True)


def test_bootstrap_ci_covers_the_mean_and_shrinks_with_more_users() -> None:
    rng = np.random.default_rng(4)
    small = bootstrap_mean_ci(rng.uniform(size=100), seed=1)
    large = bootstrap_mean_ci(rng.uniform(size=10_000), seed=1)
    assert small.low < small.mean < small.high
    assert large.high - large.low < (small.high - small.low) / 5  # width ~ 1/sqrt(n): 10x
    # Normal approximation for a uniform(0, 1) mean: half-width 1.96 * sqrt(1/12 / n).
    assert (large.high - large.low) / 2 == pytest.approx(1.96 * np.sqrt(1 / 12 / 10_000), rel=0.15)
    assert bootstrap_mean_ci(np.full(5, 0.3)) == pytest.approx((0.3, 0.3, 0.3))
    assert bootstrap_mean_ci([0.1, 0.9], seed=2) == bootstrap_mean_ci([0.1, 0.9], seed=2)
    with pytest.raises(ValueError, match="finite"):
        bootstrap_mean_ci([0.1, np.nan])
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_mean_ci([])


def test_docstring_examples_hold() -> None:
    result = doctest.testmod(metrics)
    assert result.attempted >= 8
    assert result.failed == 0
