"""ALS and BPR through ``implicit``: contract, factors, seeds, and ALS against popularity."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from mlsd.models.retrieval.base import RetrievalData, Retriever
from mlsd.models.retrieval.implicit_mf import ALSRetriever, BPRRetriever
from mlsd.models.retrieval.popularity import PopularityRetriever
from tests.models.retrieval.contract import RetrieverContract
from tests.models.retrieval.test_popularity import hand_made, ml100k_temporal, recall_at_k


class TestALSRetriever(RetrieverContract):
    def make_retriever(self) -> Retriever:
        return ALSRetriever(factors=8, iterations=3, num_threads=1)


class TestBPRRetriever(RetrieverContract):
    def make_retriever(self) -> Retriever:
        return BPRRetriever(factors=8, iterations=5, learning_rate=0.05, num_threads=1)


def test_als_factors_cover_every_user_and_catalog_item(contract_data: RetrievalData) -> None:
    model = ALSRetriever(factors=6, iterations=3).fit(contract_data)
    n_users = contract_data.events["user_id"].nunique()
    assert model.user_factors_.shape == (n_users, 6)
    assert model.item_factors_.shape == (len(contract_data.items), 6)
    assert model.item_factors_.dtype == np.float32


def test_bpr_item_factors_carry_a_bias_column(contract_data: RetrievalData) -> None:
    model = BPRRetriever(factors=6, iterations=3).fit(contract_data)
    assert model.item_factors_.shape == (len(contract_data.items), 7)
    np.testing.assert_array_equal(model.user_factors_[:, -1], 1.0)


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: ALSRetriever(factors=8, iterations=3, seed=seed),
        lambda seed: BPRRetriever(factors=8, iterations=5, seed=seed, num_threads=1),
    ],
    ids=["als", "bpr"],
)
def test_a_seed_fixes_the_factors(
    make: Callable[[int], ALSRetriever | BPRRetriever], contract_data: RetrievalData
) -> None:
    first, again, other = (make(seed).fit(contract_data) for seed in (3, 3, 4))
    np.testing.assert_array_equal(first.item_factors_, again.item_factors_)
    assert not np.allclose(first.item_factors_, other.item_factors_)


def test_scores_are_factor_inner_products(contract_data: RetrievalData) -> None:
    model = ALSRetriever(factors=8, iterations=3).fit(contract_data)
    user = int(model.interactions_.user_ids[5])
    items, scores = model.recommend([user], 5, exclude_seen=False)
    cols = np.searchsorted(model.interactions_.item_ids, items[0])
    expected = model.item_factors_[cols] @ model.user_factors_[5]
    np.testing.assert_allclose(scores[0], expected, rtol=1e-5, atol=1e-6)


def test_half_life_lowers_the_confidence_of_old_events() -> None:
    data = hand_made([(1, 1, "2023-01-01"), (1, 2, "2024-01-30"), (2, 1, "2024-01-29")])
    plain = ALSRetriever(factors=2, iterations=2).fit(data)
    decayed = ALSRetriever(factors=2, iterations=2, half_life_days=7.0).fit(data)
    assert not np.allclose(plain.user_factors_, decayed.user_factors_)


def test_an_empty_window_is_refused_with_a_reason() -> None:
    data = hand_made([(1, 99, "2024-01-30")])  # item 99 is not in the catalog
    with pytest.raises(ValueError, match="no events on catalog items"):
        ALSRetriever().fit(data)


@pytest.mark.dataset
def test_als_beats_popularity_on_the_ml100k_temporal_protocol(
    ml100k_dir: Path, tmp_path: Path
) -> None:
    """Recall@100 over the 301 test users; cold ones get the same popularity from both.

    The popularity is plain counts: a 30-day half-life popularity (0.372) still beats ALS here
    (ML-100K's test window favours what is rated *now*); see the baselines' report.
    """
    train, relevant = ml100k_temporal(ml100k_dir, tmp_path)
    popularity = PopularityRetriever(half_life_days=None)
    als = ALSRetriever(factors=16, iterations=15, fallback=popularity).fit(train)
    bpr = BPRRetriever(factors=16, iterations=50, num_threads=1, fallback=popularity).fit(train)
    baseline = recall_at_k(popularity.fit(train), relevant, 100)
    als_recall = recall_at_k(als, relevant, 100)
    assert als_recall > baseline, (als_recall, baseline)  # measured 0.346 vs 0.334
    # BPR is reported, not required to beat popularity (it does not, here); on warm users
    # (the cold ones get popularity) it must still be far above chance.
    warm = [u for u in relevant if u in set(train.events["user_id"].tolist())]
    bpr_warm = recall_at_k(bpr, relevant, 100, users=warm)
    chance = 100 / train.items["item_id"].nunique()
    assert bpr_warm > 3 * chance, (bpr_warm, chance)
