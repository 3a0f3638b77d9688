"""The shared scores → top-k step: ordering, ties, padding, seen items and cold users."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mlsd.models.retrieval.base import PAD_ITEM, InteractionMatrix
from mlsd.models.retrieval.topk import check_fitted, recommend_from_scores, top_k_items

ITEM_IDS = np.array([10, 20, 30, 40], dtype=np.int64)


def test_top_k_sorts_breaks_ties_by_column_and_pads() -> None:
    scores = np.array([[0.1, 0.9, 0.5, 0.9], [-np.inf, 2.0, np.nan, -np.inf]])
    items, values = top_k_items(scores, 3, item_ids=ITEM_IDS)
    assert items.tolist() == [[20, 40, 30], [20, PAD_ITEM, PAD_ITEM]]
    assert values.dtype == np.float32
    assert values[0].tolist() == pytest.approx([0.9, 0.9, 0.5])
    assert np.isneginf(values[1, 1:]).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_items_tied_at_the_kth_score_are_the_lowest_columns_as_serving_keeps(seed: int) -> None:
    # Counts tie a lot (a popularity list over a long tail): of the items tied for the last
    # slots, the list keeps the lowest ids, as the serving sources' ``best`` does.
    from mlsd.serving.sources import best

    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=(20, 300)).astype(np.float32)
    scores[rng.random(scores.shape) < 0.1] = -np.inf
    scores[3] = -np.inf  # a row with nothing to list
    scores[4, :5] = 2.0  # fewer finite scores than k
    scores[4, 5:] = -np.inf
    item_ids = np.arange(300, dtype=np.int64) * 7
    for k in (1, 10, 150, 299):
        items, values = top_k_items(scores, k, item_ids=item_ids)
        for row in range(len(scores)):
            finite = np.isfinite(scores[row])
            want_items, want_values = best(item_ids[finite], scores[row][finite], k)
            real = items[row] != PAD_ITEM
            np.testing.assert_array_equal(items[row][real], want_items)
            np.testing.assert_array_equal(values[row][real], want_values)


def test_k_beyond_the_columns_and_k_zero() -> None:
    items, _ = top_k_items(np.ones((2, 4)), 6, item_ids=ITEM_IDS)
    assert items[:, 4:].tolist() == [[PAD_ITEM] * 2] * 2
    assert top_k_items(np.ones((2, 4)), 0, item_ids=ITEM_IDS)[0].shape == (2, 0)
    with pytest.raises(ValueError, match="k must be >= 0"):
        top_k_items(np.ones((2, 4)), -1, item_ids=ITEM_IDS)


def test_warm_users_are_scored_seen_items_masked_cold_users_fall_back() -> None:
    events = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [10, 30, 40]})
    interactions = InteractionMatrix.from_events(events, ITEM_IDS)
    warm_scores = np.array([4.0, 3.0, 2.0, 1.0], dtype=np.float32)
    fallback = np.array([0.0, 0.0, 1.0, 2.0], dtype=np.float32)

    def score_rows(rows: np.ndarray) -> np.ndarray:
        return np.tile(warm_scores, (len(rows), 1))

    items, _ = recommend_from_scores(
        [1, 7, 2], 2, interactions=interactions, score_rows=score_rows, fallback_scores=fallback
    )
    assert items.tolist() == [[20, 40], [40, 30], [10, 20]]
    kept, _ = recommend_from_scores(
        [1],
        2,
        interactions=interactions,
        score_rows=score_rows,
        fallback_scores=fallback,
        exclude_seen=False,
    )
    assert kept.tolist() == [[10, 20]]


def test_check_fitted_names_the_class() -> None:
    class Model:
        pass

    with pytest.raises(RuntimeError, match=r"Model is not fitted yet; call Model.fit\(train\)"):
        check_fitted(Model(), "weights_")
