"""Ranking and beyond-accuracy metrics: hand-computed cases, agreement with sklearn, errors."""

from __future__ import annotations

import doctest
import itertools

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import ndcg_score

from mlsd.evaluation import metrics
from mlsd.evaluation.metrics import (
    average_precision_at_k_score,
    bootstrap_mean_ci,
    catalog_coverage_score,
    hit_rate_at_k_score,
    intra_list_diversity_score,
    ndcg_at_k_score,
    novelty_score,
    paired_bootstrap_ci,
    precision_at_k_score,
    recall_at_k_score,
    reciprocal_rank_score,
)

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


def test_map_with_the_published_denominator_hand_computed() -> None:
    """Microsoft Recommenders' MAP divides by #relevant; mlsd's by min(k, #relevant)."""
    recommended = np.array([[1, 9, 2, 8], [7, 6, 5, 4], [3, 1, 9, 8]])
    # user 0: 5 relevant, hits at ranks 1 and 3 -> sum of P@i = 1 + 2/3
    # user 1: 2 relevant, none in the list; user 2: no relevant items
    relevant = [np.array([1, 2, 10, 11, 12]), np.array([1, 2]), np.array([], dtype=np.int64)]
    mlsd = average_precision_at_k_score(recommended, relevant, k=4)
    published = average_precision_at_k_score(recommended, relevant, k=4, denominator="relevant")
    np.testing.assert_allclose(mlsd[:2], [(1 + 2 / 3) / 4, 0.0])
    np.testing.assert_allclose(published[:2], [(1 + 2 / 3) / 5, 0.0])
    assert np.isnan(mlsd[2])
    assert np.isnan(published[2])
    # the identity the report uses: published = mlsd * min(k, n_rel) / n_rel
    np.testing.assert_allclose(published[0], mlsd[0] * min(4, 5) / 5)
    with pytest.raises(ValueError, match="denominator"):
        average_precision_at_k_score(recommended, relevant, k=4, denominator="k")  # type: ignore[arg-type]


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
    assert np.isnan(recall_at_k_score(rec, [[2], []], k=2)[1])  # [] is no ids, not float ones


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
        (np.array([[1, 2]]), [[1.9]], {"k": 1}, r"relevant\[0\] must hold integer item ids"),
        (np.array([[1], [2]]), [[1], [2.0]], {"k": 1}, r"relevant\[1\] .* got dtype float64"),
        (np.array([[1, 2]]), [np.array([1])], {"k": 0}, "positive integer"),
    ],
)
def test_ranking_bad_inputs_raise_clear_errors(recommended, relevant, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        recall_at_k_score(recommended, relevant, **kwargs)


def test_graded_ndcg_needs_gains() -> None:
    with pytest.raises(ValueError, match="graded NDCG reads the gains from a CSR"):
        ndcg_at_k_score(RECOMMENDED, RELEVANT, k=2, graded=True)


# --- beyond accuracy --------------------------------------------------------------------------

# Item id -> category: items 0-2 in category 0, items 3-4 in category 1, item 5 in 2, 6-7 unknown.
CATEGORIES = np.array([0, 0, 0, 1, 1, 2, -1, -1])


def test_intra_list_diversity_hand_computed() -> None:
    rec = np.array([[0, 1, 2, 3], [0, 3, 5, -1], [0, 1, -1, -1], [6, 7, 5, 0], [4, -1, -1, -1]])
    got = intra_list_diversity_score(rec, CATEGORIES, k=4)
    # row 0: categories 0,0,0,1 -> 3 same pairs of 6; row 1: all different; row 2: one pair, same;
    # row 3: -1,-1,2,0 -> the two unknowns count as one category, 1 same pair of 6; row 4: 1 item.
    np.testing.assert_allclose(got[:4], [0.5, 1.0, 0.0, 5 / 6])
    assert np.isnan(got[4])
    # k cuts the list before pairs are counted: the top 2 of row 0 are both category 0.
    assert intra_list_diversity_score(rec, CATEGORIES, k=2)[0] == 0.0


def _brute_force_diversity(row: np.ndarray, categories: np.ndarray) -> float:
    items = [i for i in row if i != -1]
    pairs = list(itertools.combinations(items, 2))
    if not pairs:
        return float("nan")
    return float(sum(categories[a] != categories[b] for a, b in pairs) / len(pairs))


def test_intra_list_diversity_matches_brute_force() -> None:
    rng = np.random.default_rng(7)
    n_items = 60
    categories = rng.integers(-1, 5, size=n_items)
    rec = np.stack([rng.permutation(n_items)[:12] for _ in range(200)])
    rec[rng.uniform(size=rec.shape) < 0.1] = -1  # padding in the middle must be skipped too
    for k in (1, 5, 12, 30):
        expected = [_brute_force_diversity(row[:k], categories) for row in rec]
        np.testing.assert_allclose(
            intra_list_diversity_score(rec, categories, k=k), expected, equal_nan=True
        )


def test_novelty_hand_computed_and_unseen_items_get_the_floor() -> None:
    popularity = np.array([1.0, 0.5, 0.25, 0.0, 0.125])
    rec = np.array([[0, 1, 2], [3, 4, -1], [-1, -1, -1]])
    got = novelty_score(rec, popularity, k=3)
    # row 0: 0 + 1 + 2 bits; row 1: item 3 unseen -> floor 0.125 -> 3 bits, item 4 -> 3 bits.
    np.testing.assert_allclose(got[:2], [1.0, 3.0])
    assert np.isnan(got[2])
    assert novelty_score(rec, popularity, k=1)[0] == 0.0  # the item everyone saw: no surprise


def test_novelty_matches_direct_formula_and_rewards_the_long_tail() -> None:
    rng = np.random.default_rng(8)
    n_items = 100
    popularity = np.sort(rng.uniform(0.001, 0.9, size=n_items))[::-1]  # item 0 most popular
    head = np.tile(np.arange(10), (5, 1))
    tail = np.tile(np.arange(90, 100), (5, 1))
    assert (novelty_score(tail, popularity, k=10) > novelty_score(head, popularity, k=10)).all()
    rec = np.stack([rng.permutation(n_items)[:10] for _ in range(50)])
    expected = -np.log2(popularity[rec[:, :7]]).mean(axis=1)
    np.testing.assert_allclose(novelty_score(rec, popularity, k=7), expected)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: intra_list_diversity_score([[0, 9]], CATEGORIES, k=2), "only 8 entries"),
        (lambda: intra_list_diversity_score([[0, 1]], [0.5, 1.0], k=2), "integer category"),
        (lambda: intra_list_diversity_score([[0, 1]], [0, -2], k=2), r"-1 \(unknown\)"),
        (lambda: intra_list_diversity_score([[0, 1]], [], k=2), "non-empty 1-D"),
        (lambda: novelty_score([[0, 1]], [3.0, 5.0], k=2), "not counts"),
        (lambda: novelty_score([[0, 1]], [0.0, 0.0], k=2), "all zero"),
        (lambda: novelty_score([[0, 1]], [0.5, 0.5], k=0), "positive integer"),
    ],
)
def test_beyond_accuracy_bad_inputs_raise_clear_errors(call, message) -> None:
    with pytest.raises(ValueError, match=message):
        call()


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


def test_paired_ci_sees_a_small_lift_that_the_two_means_intervals_hide() -> None:
    rng = np.random.default_rng(7)
    baseline = rng.uniform(0.0, 1.0, size=300)  # users differ a lot: hard and easy ones
    method = np.clip(baseline * 1.04 + rng.normal(0.0, 0.01, size=300), 0.0, None)
    mine, theirs = bootstrap_mean_ci(method, seed=3), bootstrap_mean_ci(baseline, seed=3)
    assert mine.low < theirs.high  # unpaired, the intervals overlap
    paired = paired_bootstrap_ci(method, baseline, seed=3)
    assert paired.ratio == pytest.approx(method.mean() / baseline.mean())
    assert paired.difference == pytest.approx(method.mean() - baseline.mean())
    assert 1.0 < paired.ratio_low < paired.ratio < paired.ratio_high < 1.08
    assert 0.0 < paired.difference_low < paired.difference < paired.difference_high


def test_paired_ci_uses_the_resamples_of_the_mean_ci() -> None:
    values = np.random.default_rng(2).uniform(size=50)
    mean = bootstrap_mean_ci(values, seed=5, n_resamples=400)
    # Against a constant baseline, the ratio's draws are the mean's draws divided by it.
    paired = paired_bootstrap_ci(values, np.full(50, 0.5), seed=5, n_resamples=400)
    assert (paired.ratio_low, paired.ratio_high) == pytest.approx((mean.low / 0.5, mean.high / 0.5))
    assert paired_bootstrap_ci(values, values, seed=1) == pytest.approx((1, 1, 1, 0, 0, 0))


def test_paired_ci_leaves_out_resamples_where_the_baseline_scores_nothing() -> None:
    """A baseline that scores on 1 user of 50 misses all of them in about a third of the
    resamples; those have no ratio, and the interval comes from the others."""
    baseline = np.zeros(50)
    baseline[0] = 1.0
    # Twice the baseline on every user: each resample that has a ratio has exactly 2.
    assert paired_bootstrap_ci(2 * baseline, baseline)[:3] == pytest.approx((2, 2, 2))
    values = np.zeros(50)
    values[:3] = 1.0
    paired = paired_bootstrap_ci(values, baseline)
    assert paired.ratio == pytest.approx(3.0)
    assert 0.0 < paired.ratio_low < paired.ratio < paired.ratio_high < np.inf
    # One resample (seed 2) that misses user 0: the ratio stands, its bounds have no draw.
    single = paired_bootstrap_ci(values, baseline, n_resamples=1, seed=2)
    assert single.ratio == pytest.approx(3.0)
    assert np.isnan(single.ratio_low)
    assert np.isnan(single.ratio_high)


def test_paired_ci_refuses_unpaired_or_unusable_input() -> None:
    with pytest.raises(ValueError, match=r"one score per user in each array.*\[3, 2\]"):
        paired_bootstrap_ci([0.1, 0.2, 0.3], [0.1, 0.2])
    with pytest.raises(ValueError, match="finite"):
        paired_bootstrap_ci([0.1, 0.2], [0.1, np.nan])
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap_ci([0.1], [0.2], confidence=1.0)
    zero = paired_bootstrap_ci([0.1, 0.2], [0.0, 0.0])
    assert np.isnan(zero.ratio)
    assert np.isnan(zero.ratio_low)
    assert zero.difference == pytest.approx(0.15)


def test_docstring_examples_hold() -> None:
    result = doctest.testmod(metrics)
    assert result.attempted >= 8
    assert result.failed == 0
