"""Negative sampling, negative downsampling + recalibration, class weights and SMOTE."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestNeighbors
from sklearn.utils.class_weight import compute_class_weight, compute_sample_weight

from mlsd.data.sampling import (
    NegativeStrategy,
    class_weights,
    downsample_negatives,
    downsample_negatives_mask,
    recalibrate_downsampled,
    sample_negative_items,
    sample_negatives,
    sample_weights,
    smote,
)
from mlsd.data.sources.synthetic import World, WorldConfig
from mlsd.evaluation.metrics import expected_calibration_error


def _dense_positives(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """300 users x ~12 of 20 items each: most uniform draws collide and must be redrawn."""
    rng = np.random.default_rng(seed)
    catalog = np.arange(100, 120)
    users, items = [], []
    for user in range(300):
        chosen = rng.choice(catalog, size=rng.integers(1, 19), replace=False)
        users += [user * 7 + 3] * chosen.size
        items += chosen.tolist()
    return np.array(users), np.array(items), catalog


# --- negative sampling -------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["uniform", "popularity"])
def test_negatives_never_hit_a_users_positives(strategy: NegativeStrategy) -> None:
    users, items, catalog = _dense_positives()
    negatives = sample_negative_items(
        users,
        items,
        catalog,
        n_negatives=5,
        strategy=strategy,
        seed=1,
    )
    positive_pairs = set(zip(users.tolist(), items.tolist(), strict=True))
    drawn_pairs = {
        (u, i) for u, row in zip(users.tolist(), negatives.tolist(), strict=True) for i in row
    }
    assert not positive_pairs & drawn_pairs
    assert np.isin(negatives, catalog).all()


def test_negative_counts_and_frame_layout() -> None:
    users, items, catalog = _dense_positives()
    ts = pd.date_range("2024-01-01", periods=users.size, freq="min", tz="UTC")
    events = pd.DataFrame({"user_id": users, "item_id": items, "ts": ts, "value": 1.0})
    out = sample_negatives(events, catalog, n_negatives=3, seed=0)

    n_pos = len(events)
    assert list(out.columns) == ["user_id", "item_id", "label", "ts"]
    assert len(out) == n_pos * 4
    assert (out["label"] == 1).sum() == n_pos
    assert (out["label"] == 0).sum() == 3 * n_pos
    head = out.iloc[:n_pos]
    np.testing.assert_array_equal(head["item_id"], items)
    assert (head["label"] == 1).all()
    tail = out.iloc[n_pos:]
    # Negatives are grouped by the positive they were drawn for and inherit its user and ts.
    np.testing.assert_array_equal(tail["user_id"], np.repeat(users, 3))
    np.testing.assert_array_equal(tail["ts"], np.repeat(ts, 3))
    assert (tail["label"] == 0).all()


def _chi_square_pvalue(drawn: np.ndarray, catalog: np.ndarray, probs: np.ndarray) -> float:
    observed = np.array([(drawn == item).sum() for item in catalog])
    allowed = probs > 0  # items that cannot be drawn are checked separately
    return float(stats.chisquare(observed[allowed], probs[allowed] * drawn.size).pvalue)


def test_popularity_frequencies_follow_count_to_the_alpha() -> None:
    catalog = np.arange(40) + 1000
    counts = np.arange(40) ** 2  # item 1000 has count 0 and must never be drawn
    # Every positive is item 1001, so item 1001 is excluded for every user.
    users = np.arange(5000)
    items = np.full(5000, 1001)
    drawn = sample_negative_items(
        users,
        items,
        catalog,
        n_negatives=40,
        strategy="popularity",
        alpha=0.75,
        item_counts=counts,
        seed=3,
    ).ravel()

    weights = counts.astype(float) ** 0.75
    weights[1] = 0.0
    expected = weights / weights.sum()
    assert not np.isin(drawn, [1000, 1001]).any()
    assert _chi_square_pvalue(drawn, catalog, expected) > 1e-3
    # The test can tell exponents apart: raw popularity (alpha = 1) is rejected.
    raw = counts.astype(float)
    raw[1] = 0.0
    assert _chi_square_pvalue(drawn, catalog, raw / raw.sum()) < 1e-6


def test_popularity_counts_default_to_the_positives() -> None:
    catalog = np.array([10, 20, 30, 40])
    # Item counts in the window: 10 -> 1, 20 -> 4, 30 -> 9, 40 -> 0; users 0..13.
    items = np.array([10] + [20] * 4 + [30] * 9)
    users = np.arange(items.size)
    drawn = sample_negative_items(
        users, items, catalog, n_negatives=20_000, strategy="popularity", alpha=0.5, seed=4
    )
    # Each user excludes their own item: per-user conditional distribution over the rest.
    weights = np.array([1.0, 2.0, 3.0, 0.0])  # sqrt of counts
    expected = np.zeros(4)
    for item in items:
        w = np.where(catalog == item, 0.0, weights)
        expected += w / w.sum()
    expected /= items.size
    observed = np.array([(drawn == item).mean() for item in catalog])
    np.testing.assert_allclose(observed, expected, atol=0.005)
    assert observed[3] == 0.0


def test_uniform_is_roughly_uniform_over_allowed_items() -> None:
    catalog = np.arange(30)
    users = np.repeat(np.arange(1000), 3)
    items = np.tile([0, 1, 2], 1000)  # every user has items 0, 1, 2
    drawn = sample_negative_items(users, items, catalog, n_negatives=30, seed=5).ravel()
    assert not np.isin(drawn, [0, 1, 2]).any()
    expected = np.r_[np.zeros(3), np.full(27, 1 / 27)]
    assert _chi_square_pvalue(drawn, catalog, expected) > 1e-3


def test_negative_sampling_is_seeded() -> None:
    users, items, catalog = _dense_positives()
    first = sample_negative_items(users, items, catalog, seed=42)
    again = sample_negative_items(users, items, catalog, seed=np.random.default_rng(42))
    other = sample_negative_items(users, items, catalog, seed=43)
    np.testing.assert_array_equal(first, again)
    assert (first != other).any()


def test_user_with_every_item_fails_clearly() -> None:
    catalog = np.arange(5)
    users = np.array([7] * 5 + [8])
    items = np.array([0, 1, 2, 3, 4, 0])
    with pytest.raises(ValueError, match=r"positives for every item.*user_id \[7\]"):
        sample_negative_items(users, items, catalog, seed=0)


def test_user_with_every_popular_item_fails_clearly() -> None:
    # Items 3 and 4 have no interactions, so popularity sampling can never draw them.
    catalog = np.arange(5)
    users = np.array([1, 1, 1, 2])
    items = np.array([0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"user_id \[1\]"):
        sample_negative_items(users, items, catalog, strategy="popularity", seed=0)
    # Uniform sampling can draw 3 and 4, so it succeeds.
    assert np.isin(sample_negative_items(users[:3], items[:3], catalog, seed=0), [3, 4]).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"items": [1, 99]}, "missing from the catalog"),
        ({"catalog": [1, 2, 2, 3]}, "duplicate item ids"),
        ({"catalog": [1.0, 2.0]}, "integer item ids"),
        ({"n_negatives": 0}, "positive integer"),
        ({"strategy": "zipf"}, "'uniform' or 'popularity'"),
        ({"strategy": "popularity", "alpha": -1.0}, "alpha"),
        ({"strategy": "popularity", "item_counts": [1, 2]}, "aligned with catalog"),
        ({"users": [1]}, "same length"),
    ],
)
def test_negative_sampling_bad_inputs(kwargs: dict[str, Any], message: str) -> None:
    args = {"users": [1, 2], "items": [1, 2], "catalog": [1, 2, 3, 4]} | kwargs
    options = {k: v for k, v in args.items() if k not in ("users", "items", "catalog")}
    with pytest.raises(ValueError, match=message):
        sample_negative_items(args["users"], args["items"], args["catalog"], **options)


def test_frame_without_item_id_fails_clearly() -> None:
    with pytest.raises(ValueError, match=r"missing column\(s\) \['item_id'\]"):
        sample_negatives(pd.DataFrame({"user_id": [1]}), [1, 2])


# --- negative downsampling and recalibration ------------------------------------------------


def test_downsampling_keeps_all_positives_and_about_w_of_negatives() -> None:
    rng = np.random.default_rng(0)
    y = (rng.uniform(size=200_000) < 0.02).astype(int)
    keep = downsample_negatives_mask(y, keep_rate=0.1, seed=1)
    assert keep[y == 1].all()
    n_neg = int((y == 0).sum())
    kept = int(keep[y == 0].sum())
    sd = np.sqrt(n_neg * 0.1 * 0.9)
    assert abs(kept - 0.1 * n_neg) < 5 * sd
    np.testing.assert_array_equal(keep, downsample_negatives_mask(y, keep_rate=0.1, seed=1))
    assert downsample_negatives_mask(y, keep_rate=1.0, seed=1).all()


def test_downsample_frame_returns_the_kept_rows() -> None:
    frame = pd.DataFrame({"x": np.arange(1000), "clicked": np.r_[np.ones(100), np.zeros(900)]})
    kept = downsample_negatives(frame, keep_rate=0.5, label_col="clicked", seed=2)
    mask = downsample_negatives_mask(frame["clicked"].to_numpy(), keep_rate=0.5, seed=2)
    pd.testing.assert_frame_equal(kept, frame.loc[mask])
    assert (kept["clicked"] == 1).sum() == 100
    assert 350 < (kept["clicked"] == 0).sum() < 550


@pytest.mark.parametrize("w", [0.0, -0.1, 1.5, float("nan")])
def test_keep_rate_outside_unit_interval_fails_clearly(w: float) -> None:
    with pytest.raises(ValueError, match=r"keep_rate .* must be in \(0, 1\]"):
        downsample_negatives_mask([0, 1], keep_rate=w)
    with pytest.raises(ValueError, match=r"keep_rate .* must be in \(0, 1\]"):
        recalibrate_downsampled([0.5], w)


def test_downsampling_rejects_non_binary_labels() -> None:
    with pytest.raises(ValueError, match="0/1"):
        downsample_negatives_mask([0, 1, 2], keep_rate=0.5)
    with pytest.raises(ValueError, match="no label column 'label'"):
        downsample_negatives(pd.DataFrame({"y": [0]}), keep_rate=0.5)


@pytest.mark.parametrize("w", [0.01, 0.05, 0.1, 0.5, 1.0])
def test_recalibration_inverts_downsampling(w: float) -> None:
    p = np.r_[0.0, np.logspace(-6, 0, 50)]
    p_downsampled = p / (p + (1 - p) * w)  # what a model of the downsampled data learns
    np.testing.assert_allclose(recalibrate_downsampled(p_downsampled, w), p, rtol=1e-9)


def test_recalibration_hand_computed() -> None:
    # 0.5 / (0.5 + 0.5 / 0.1) = 1 / 11
    np.testing.assert_allclose(recalibrate_downsampled([0.5, 0.0, 1.0], 0.1), [1 / 11, 0, 1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        recalibrate_downsampled([1.2], 0.1)


def test_empirical_rate_after_downsampling_recalibrates_to_base_rate() -> None:
    rng = np.random.default_rng(7)
    y = (rng.uniform(size=500_000) < 0.01).astype(int)
    keep = downsample_negatives_mask(y, keep_rate=0.05, seed=8)
    rate_downsampled = y[keep].mean()
    assert rate_downsampled > 0.1  # ~0.168: far from the true 1%
    assert recalibrate_downsampled([rate_downsampled], 0.05)[0] == pytest.approx(y.mean(), rel=0.03)


@pytest.mark.parametrize("w", [0.1, 0.05])
def test_recalibrated_downsampled_model_matches_the_worlds_probabilities(w: float) -> None:
    """Issue requirement: LR on downsampled simulated clicks, recalibrated, has ECE < 0.01.

    The world's click model is logistic in ``click_features``, so LR is well specified. Keeping
    negatives with probability w multiplies the odds by 1/w: the fit learns the true weights
    with intercept ``click_bias - log w`` and predicts ``p' = p / (p + (1 - p) w) > p``
    everywhere. Every calibration bin is then off in the same direction, so the uncorrected
    ECE is ``E[p' - p]`` (~0.25 at w = 0.1 and ~0.38 at w = 0.05 with the world's 5% CTR),
    and recalibration removes it up to estimation and label noise (~1e-3).
    """
    world = World.create(WorldConfig(n_users=2_000, n_items=500, seed=0))
    users, items, ts = world.sample_interactions(400_000, seed=1)
    x_train = world.click_features(users, items, ts)
    p_train = world.click_probability(users, items, ts)
    y_train = np.random.default_rng(2).random(p_train.size) < p_train
    keep = downsample_negatives_mask(y_train, keep_rate=w, seed=3)
    model = LogisticRegression(C=1e6, max_iter=1_000).fit(x_train[keep], y_train[keep])
    assert model.intercept_[0] == pytest.approx(world.click_bias - np.log(w), abs=0.1)

    users, items, ts = world.sample_interactions(200_000, seed=4)  # fresh held-out exposures
    x_test = world.click_features(users, items, ts)
    p_true = world.click_probability(users, items, ts)
    y_test = np.random.default_rng(5).random(p_true.size) < p_true
    raw = model.predict_proba(x_test)[:, 1]
    recalibrated = recalibrate_downsampled(raw, w)

    assert expected_calibration_error(y_test, recalibrated) < 0.01
    assert expected_calibration_error(y_test, recalibrated, strategy="quantile") < 0.01
    assert np.abs(recalibrated - p_true).mean() < 0.005

    derived_gap = np.mean(p_true / (p_true + (1 - p_true) * w) - p_true)
    assert derived_gap > 0.2
    ece_raw = expected_calibration_error(y_test, raw)
    assert ece_raw == pytest.approx(derived_gap, abs=0.01)
    assert np.abs(raw - p_true).mean() == pytest.approx(derived_gap, abs=0.01)


# --- class weights -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "y",
    [
        [0, 0, 0, 0, 1],
        [1, 1, 1, 1, 0, 0],
        [2, 0, 1, 1, 2, 2, 2, 2],
        ["click", "view", "view", "view"],
    ],
)
def test_balanced_class_weights_match_sklearn(y: list[Any]) -> None:
    classes = np.unique(y)
    expected = compute_class_weight("balanced", classes=classes, y=y)
    weights = class_weights(y)
    assert list(weights) == classes.tolist()
    np.testing.assert_allclose(list(weights.values()), expected)
    np.testing.assert_allclose(sample_weights(y), compute_sample_weight("balanced", y))


def test_other_class_weight_kinds() -> None:
    y = [0] * 9 + [1]
    assert class_weights(y, kind="uniform") == {0: 1.0, 1: 1.0}
    sqrt = class_weights(y, kind="balanced_sqrt")
    assert sqrt[0] == pytest.approx(np.sqrt(10 / 18))
    assert sqrt[1] == pytest.approx(np.sqrt(5.0))
    # Balanced weights give each class the same total weight.
    w = sample_weights(y)
    assert w[:9].sum() == pytest.approx(w[9:].sum())


def test_sample_weights_from_a_mapping() -> None:
    np.testing.assert_allclose(sample_weights([1, 0, 1], class_weight={0: 1.0, 1: 3.0}), [3, 1, 3])
    with pytest.raises(ValueError, match=r"no weight for label\(s\) \[2\]"):
        sample_weights([0, 2], class_weight={0: 1.0})
    with pytest.raises(ValueError, match="kind must be"):
        class_weights([0, 1], kind="inverse")  # type: ignore[arg-type]


# --- SMOTE ---------------------------------------------------------------------------------


def _imbalanced(n_major: int = 300, n_minor: int = 30) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(0, 1, (n_major, 3)), rng.normal(3, 0.5, (n_minor, 3))])
    y = np.r_[np.zeros(n_major, int), np.ones(n_minor, int)]
    return x, y


def _distance_to_segment(s: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    ab = b - a
    u = np.clip(np.dot(s - a, ab) / max(np.dot(ab, ab), 1e-300), 0.0, 1.0)
    return float(np.linalg.norm(s - (a + u * ab)))


def test_smote_balances_and_interpolates_between_minority_neighbours() -> None:
    x, y = _imbalanced()
    x_res, y_res = smote(x, y, k_neighbors=5, seed=0)
    assert (y_res == 0).sum() == (y_res == 1).sum() == 300
    np.testing.assert_array_equal(x_res[: len(x)], x)  # input rows first, unchanged
    synthetic = x_res[len(x) :]
    assert (y_res[len(x) :] == 1).all()

    minority = x[y == 1]
    assert (synthetic >= minority.min(axis=0)).all()
    assert (synthetic <= minority.max(axis=0)).all()
    _, neighbours = NearestNeighbors(n_neighbors=6).fit(minority).kneighbors(minority)
    segments = [(i, j) for i, row in enumerate(neighbours) for j in row[1:]]
    for s in synthetic:
        gap = min(_distance_to_segment(s, minority[i], minority[j]) for i, j in segments)
        assert gap < 1e-9


def test_smote_ratio_strategy_and_seed() -> None:
    x, y = _imbalanced()
    x_res, y_res = smote(x, y, sampling_strategy=0.5, seed=1)
    assert (y_res == 1).sum() == 150
    x_again, _ = smote(x, y, sampling_strategy=0.5, seed=1)
    x_other, _ = smote(x, y, sampling_strategy=0.5, seed=2)
    np.testing.assert_array_equal(x_res, x_again)
    assert not np.array_equal(x_res, x_other)


def test_smote_with_too_few_minority_rows_fails_clearly() -> None:
    x, y = _imbalanced(n_minor=5)
    with pytest.raises(ValueError, match=r"at least k_neighbors \+ 1 = 6 rows of class 1.*got 5"):
        smote(x, y, k_neighbors=5)
    _, y_res = smote(x, y, k_neighbors=4, seed=0)  # 5 rows are enough for 4 neighbours
    assert (y_res == 1).sum() == 300


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.zeros(10), np.zeros(10), "2-D"),
        (np.full((10, 2), np.nan), np.r_[np.zeros(5), np.ones(5)], "NaN"),
        (np.zeros((10, 2)), np.zeros(10), "two classes"),
    ],
)
def test_smote_bad_inputs(x: np.ndarray, y: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        smote(x, y)
