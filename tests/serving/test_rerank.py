"""Re-ranking: filtering, order, category cap, MMR diversity, freshness, batching, config errors."""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import numpy as np
import pytest

from mlsd.evaluation.metrics import intra_list_diversity_score
from mlsd.serving.rerank import (
    PAD_ID,
    RerankConfig,
    SeenItems,
    boost_ages,
    rerank,
    rerank_lists,
    rows_isin,
)

# Item id -> category for ids 0..9: three of category 0, three of 1, two of 2, two unknown.
CATEGORIES = np.array([0, 0, 0, 1, 1, 1, 2, 2, -1, -1])


def _reference_mmr(
    ids: np.ndarray,
    scores: np.ndarray,
    *,
    k: int,
    config: RerankConfig,
    categories: np.ndarray,
    ages: np.ndarray | None = None,
) -> np.ndarray:
    """Textbook MMR: recompute every remaining candidate's objective at every pick."""
    spread = np.ptp(scores)
    rel = (scores - scores.min()) / spread if spread > 0 else np.ones_like(scores)
    if config.freshness_weight and ages is not None:
        rel = rel + config.freshness_weight * 0.5 ** (ages / config.freshness_half_life_days)
    cats = categories[ids]
    picked: list[int] = []
    for _ in range(k):
        best, best_key = None, None
        for j in range(len(ids)):
            same = [cats[p] == cats[j] for p in picked]
            capped = config.max_per_category and cats[j] >= 0  # unknown: not capped
            if j in picked or (capped and sum(same) >= config.max_per_category):
                continue
            objective = config.mmr_lambda * rel[j] - (1 - config.mmr_lambda) * max(same, default=0)
            key = (objective, rel[j], -j)  # ties: higher relevance, then earlier candidate
            if best_key is None or key > best_key:
                best, best_key = j, key
        if best is None:
            break
        picked.append(best)
    return ids[picked]


def test_seen_and_blocklisted_items_never_appear() -> None:
    rng = np.random.default_rng(0)
    ids = rng.permutation(10)
    scores = rng.normal(size=10)
    config = RerankConfig(mmr_lambda=0.5, blocklist=frozenset({3, 7}))
    for seen in ({0, 9}, np.array([0, 9]), [0, 9]):
        shown = rerank(ids, scores, k=10, config=config, item_categories=CATEGORIES, seen=seen)
        assert set(shown.item_ids.tolist()) == set(range(10)) - {0, 3, 7, 9}
    # Seen ids that are not candidates are fine; asking for more than remain returns fewer.
    shown = rerank(ids, scores, k=8, config=config, item_categories=CATEGORIES, seen={0, 99})
    assert len(shown.item_ids) == 7
    assert {0, 3, 7}.isdisjoint(shown.item_ids.tolist())


def test_pure_relevance_keeps_the_ranker_order_and_original_scores() -> None:
    rng = np.random.default_rng(1)
    ids = rng.permutation(10)
    scores = rng.normal(size=10) * 50 + 3  # any scale: normalisation must not change the order
    shown = rerank(ids, scores, k=6, config=RerankConfig(), item_categories=CATEGORIES)
    order = np.argsort(-scores)[:6]
    np.testing.assert_array_equal(shown.item_ids, ids[order])
    np.testing.assert_array_equal(shown.scores, scores[order])  # ranker scores, not objectives


@pytest.mark.parametrize(
    "config", [RerankConfig(), RerankConfig(mmr_lambda=0.6, max_per_category=2)], ids=str
)
def test_shown_values_label_the_list_without_ordering_it(config: RerankConfig) -> None:
    # Serving orders by the ranker's scores and shows calibrated probabilities, which tie
    # where the scores do not: the order must come from the scores alone, on both paths.
    rng = np.random.default_rng(11)
    ids = rng.permutation(10)
    scores = rng.normal(size=10)
    shown_values = np.round(1.0 / (1.0 + np.exp(-scores)), 1)  # a step function of the score
    plain = rerank(ids, scores, k=6, config=config, item_categories=CATEGORIES, seen={ids[0]})
    labelled = rerank(
        ids, scores, k=6, config=config, item_categories=CATEGORIES, seen={ids[0]},
        shown=shown_values,
    )  # fmt: skip
    np.testing.assert_array_equal(labelled.item_ids, plain.item_ids)
    position = {item: p for p, item in enumerate(ids.tolist())}
    picked = [position[i] for i in labelled.item_ids.tolist()]
    np.testing.assert_array_equal(labelled.scores, shown_values[picked])
    batch = rerank_lists(
        np.stack([ids, ids[::-1]]), np.stack([scores, scores[::-1]]), k=6, config=config,
        item_categories=CATEGORIES, seen=[{ids[0]}, {ids[0]}],
        shown=np.stack([shown_values, shown_values[::-1]]),
    )  # fmt: skip
    for row in range(2):
        np.testing.assert_array_equal(batch.item_ids[row], plain.item_ids)
        np.testing.assert_array_equal(batch.scores[row], labelled.scores)
    with pytest.raises(ValueError, match="shown must have the scores' shape"):
        rerank(ids, scores, k=3, config=config, item_categories=CATEGORIES, shown=[0.5])


def test_category_cap_holds_and_fills_from_the_next_categories() -> None:
    ids = np.arange(10)
    scores = np.linspace(1.0, 0.1, 10)  # category 0 on top, then 1, then 2, then unknown
    config = RerankConfig(max_per_category=2)
    shown = rerank(ids, scores, k=8, config=config, item_categories=CATEGORIES)
    np.testing.assert_array_equal(shown.item_ids, [0, 1, 3, 4, 6, 7, 8, 9])
    # The cap can leave fewer than k: three categories x 1 item, and the unknown ones.
    capped = rerank(
        ids, scores, k=8, config=RerankConfig(max_per_category=1), item_categories=CATEGORIES
    )
    np.testing.assert_array_equal(capped.item_ids, [0, 3, 6, 8, 9])
    # Items of unknown category are not capped: a catalog without categories keeps its lists.
    unknown = np.full(10, -1)
    for lam in (1.0, 0.6):
        config = RerankConfig(mmr_lambda=lam, max_per_category=3)
        shown = rerank(ids, scores, k=8, config=config, item_categories=unknown)
        np.testing.assert_array_equal(shown.item_ids, ids[:8])


def test_mmr_raises_the_number_of_categories_in_the_top_k() -> None:
    # Category 0 holds the three best scores; pure relevance shows no other category in the top 3.
    ids = np.arange(10)
    scores = np.array([1.0, 0.98, 0.96, 0.7, 0.65, 0.6, 0.5, 0.45, 0.2, 0.1])
    top_relevance = rerank(ids, scores, k=3, config=RerankConfig(), item_categories=CATEGORIES)
    diverse = rerank(
        ids, scores, k=3, config=RerankConfig(mmr_lambda=0.5), item_categories=CATEGORIES
    )
    assert len(set(CATEGORIES[top_relevance.item_ids])) == 1
    assert len(set(CATEGORIES[diverse.item_ids])) == 3
    assert diverse.item_ids[0] == 0  # the first pick is still the most relevant item
    ild = intra_list_diversity_score(
        np.stack([top_relevance.item_ids, diverse.item_ids]), CATEGORIES, k=3
    )
    np.testing.assert_allclose(ild, [0.0, 1.0])
    # A weak diversity preference (0.9) keeps the near-tied category-0 items: gaps 0.02 < 0.1/0.9.
    mild = rerank(ids, scores, k=3, config=RerankConfig(mmr_lambda=0.9), item_categories=CATEGORIES)
    np.testing.assert_array_equal(mild.item_ids, [0, 1, 2])


def test_unknown_category_counts_as_one_category() -> None:
    ids = np.array([8, 9, 0])
    scores = np.array([1.0, 0.9, 0.1])
    shown = rerank(
        ids, scores, k=2, config=RerankConfig(mmr_lambda=0.0), item_categories=CATEGORIES
    )
    np.testing.assert_array_equal(shown.item_ids, [8, 0])  # 8 and 9 are both unknown (-1)


def test_freshness_boost_moves_a_newer_item_up() -> None:
    ids = np.array([0, 3, 6])
    scores = np.array([0.9, 0.8, 0.1])  # normalised: 1.0, 0.875, 0.0
    ages = np.array([400.0, 0.0, 200.0])
    plain = rerank(ids, scores, k=3, config=RerankConfig(), item_categories=CATEGORIES)
    np.testing.assert_array_equal(plain.item_ids, [0, 3, 6])
    config = RerankConfig(freshness_weight=0.3, freshness_half_life_days=30.0)
    fresh = rerank(ids, scores, k=3, config=config, item_categories=CATEGORIES, item_age_days=ages)
    np.testing.assert_array_equal(fresh.item_ids, [3, 0, 6])  # 0.875 + 0.3 > 1.0 + ~0
    # The boost halves every half-life: two half-lives old, item 3 gets 0.075 and stays second.
    older = rerank(
        ids,
        scores,
        k=3,
        config=config,
        item_categories=CATEGORIES,
        item_age_days=np.array([400.0, 60.0, 200.0]),
    )
    np.testing.assert_array_equal(older.item_ids, [0, 3, 6])
    # Unknown age (NaN) gets no boost rather than a full one.
    unknown = rerank(
        ids,
        scores,
        k=3,
        config=config,
        item_categories=CATEGORIES,
        item_age_days=np.array([400.0, np.nan, 200.0]),
    )
    np.testing.assert_array_equal(unknown.item_ids, [0, 3, 6])
    with pytest.raises(ValueError, match="needs item_age_days"):
        rerank(ids, scores, k=3, config=config, item_categories=CATEGORIES)


def test_boost_ages_count_from_creation_where_the_catalog_knows_it() -> None:
    # Items: created 400 days ago and first seen 50 days ago; created unknown (-1), first
    # seen 90 days ago; never seen and created 1 day ago; neither known; not created yet (-3).
    first = np.array([50.0, 90.0, -1.0, -1.0, 4.0])
    created = np.array([400.0, -1.0, 1.0, np.nan, -3.0])
    np.testing.assert_array_equal(
        boost_ages(first, created, "created"), [400.0, 90.0, 1.0, np.nan, 4.0]
    )
    np.testing.assert_array_equal(
        boost_ages(first, created, "first_event"), [50.0, 90.0, np.nan, np.nan, 4.0]
    )
    # Through the re-ranker: the never-seen item created a day ago is boosted by "created".
    ids, scores = np.array([0, 3, 6]), np.array([0.9, 0.8, 0.1])
    config = RerankConfig(freshness_weight=2.0, freshness_half_life_days=30.0)
    by_created = boost_ages(first[:3], created[:3], config.freshness_clock)
    shown = rerank(ids, scores, k=3, config=config, item_categories=CATEGORIES,
                   item_age_days=by_created)  # fmt: skip
    assert shown.item_ids[0] == 6  # 0 + 2 * 0.98 beats 1 + 0.0002 and 0.875 + 0.25
    by_first = boost_ages(first[:3], created[:3], "first_event")
    shown = rerank(ids, scores, k=3, config=config, item_categories=CATEGORIES,
                   item_age_days=by_first)  # fmt: skip
    assert shown.item_ids[-1] == 6
    with pytest.raises(ValueError, match="freshness_clock must be one of created, first_event"):
        RerankConfig(freshness_clock="release")  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(30))
def test_greedy_selection_matches_textbook_mmr(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_items = 40
    categories = rng.integers(-1, 4, size=n_items)
    ids = rng.choice(n_items, size=25, replace=False)
    scores = np.round(rng.normal(size=25), 1)  # rounded: ties must break the same way
    ages = rng.uniform(0, 90, size=25)
    config = RerankConfig(
        mmr_lambda=float(rng.choice([0.0, 0.3, 0.7, 1.0])),
        freshness_weight=float(rng.choice([0.0, 0.2])),
        max_per_category=[None, 1, 2, 4][seed % 4],
    )
    k = int(rng.integers(1, 30))
    shown = rerank(ids, scores, k=k, config=config, item_categories=categories, item_age_days=ages)
    expected = _reference_mmr(ids, scores, k=k, config=config, categories=categories, ages=ages)
    np.testing.assert_array_equal(shown.item_ids, expected)


@pytest.mark.parametrize(
    "config",
    [
        RerankConfig(),
        RerankConfig(blocklist=frozenset({4, 7})),
        RerankConfig(freshness_weight=0.3, freshness_half_life_days=5.0),
    ],
)
def test_rerank_lists_without_list_rules_is_each_request_sorted(config: RerankConfig) -> None:
    # The batch fast path (pure relevance, no cap) works on the whole matrix at once: padding
    # anywhere in a row, tied scores (the earlier candidate first), rows left empty by the
    # filters, a constant row; each row must be exactly what its own request gets.
    rng = np.random.default_rng(5)
    n, width = 40, 12
    items = np.stack([rng.choice(50, width, replace=False) for _ in range(n)])
    scores = np.round(rng.random((n, width)), 1)  # many ties
    ages = rng.uniform(-1, 30, size=(n, width))
    ages[rng.random((n, width)) < 0.2] = np.nan
    holes = rng.random((n, width)) < 0.15
    items[holes], scores[holes] = PAD_ID, -np.inf
    scores[3] = np.where(items[3] != PAD_ID, 0.5, -np.inf)
    seen: list[SeenItems] = [rng.choice(50, rng.integers(0, 8), replace=False) for _ in range(n)]
    seen[5], seen[6] = set(items[5].tolist()), {int(items[6, 0]), 10**15}
    categories = rng.integers(-1, 4, size=50)
    for k in (1, 5, width + 3):
        batch = rerank_lists(
            items, scores, k=k, config=config, item_categories=categories,
            item_age_days=ages, seen=seen,
        )  # fmt: skip
        assert batch.item_ids.shape == batch.scores.shape == (n, k)
        for row in range(n):
            single = rerank(
                items[row], scores[row], k=k, config=config, item_categories=categories,
                item_age_days=ages[row], seen=seen[row],
            )  # fmt: skip
            m = len(single.item_ids)
            np.testing.assert_array_equal(batch.item_ids[row, :m], single.item_ids)
            np.testing.assert_array_equal(batch.scores[row, :m], single.scores)
            assert (batch.item_ids[row, m:] == PAD_ID).all()
            assert np.isneginf(batch.scores[row, m:]).all()
    assert (batch.item_ids[5] == PAD_ID).all()


def test_rerank_lists_fast_path_rejects_what_a_request_rejects() -> None:
    config = RerankConfig()
    items = np.array([[1, 2, 3], [4, 5, 4]])
    scores = np.zeros((2, 3))
    with pytest.raises(ValueError, match="item 4 twice"):
        rerank_lists(items, scores, k=2, config=config, item_categories=CATEGORIES)
    items = np.array([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ValueError, match=r"scores\[1\] is nan"):
        rerank_lists(
            items, np.array([[0.0, 1.0, 2.0], [0.0, np.nan, 1.0]]), k=2, config=config,
            item_categories=CATEGORIES,
        )  # fmt: skip
    with pytest.raises(ValueError, match="padding is -1"):
        rerank_lists(items - 3, scores, k=2, config=config, item_categories=CATEGORIES)
    with pytest.raises(ValueError, match="integer ids"):
        rerank_lists(items + 0.5, scores, k=2, config=config, item_categories=CATEGORIES)
    with pytest.raises(ValueError, match="needs item_age_days"):
        rerank_lists(
            items, scores, k=2, config=RerankConfig(freshness_weight=0.1),
            item_categories=CATEGORIES,
        )  # fmt: skip


@pytest.mark.parametrize("high", [60, 1 << 62])
def test_rows_isin_is_isin_row_by_row(high: int) -> None:
    # Small ids pack (row, id) into one key; ids too wide for that are ranked first.
    rng = np.random.default_rng(6)
    values = rng.integers(-1, high, size=(30, 20), dtype=np.int64)
    sets: list[SeenItems] = [
        np.concatenate([rng.choice(values[r], rng.integers(0, 6)), rng.integers(0, high, 3)])
        for r in range(30)
    ]
    sets[0], sets[1] = [], set(values[1, :4].tolist())
    got = rows_isin(values, sets)
    for row in range(30):
        want = np.isin(values[row], np.array(list(cast(Iterable[int], sets[row])), np.int64))
        np.testing.assert_array_equal(got[row], want)
    assert not rows_isin(values, [[] for _ in range(30)]).any()
    assert rows_isin(np.zeros((2, 0), np.int64), [[1], [2]]).shape == (2, 0)
    with pytest.raises(ValueError, match="rows"):
        rows_isin(values, sets[:-1])


def test_rerank_lists_pads_rows_and_matches_single_requests() -> None:
    rng = np.random.default_rng(2)
    items = np.stack([rng.permutation(10) for _ in range(4)])
    scores = rng.normal(size=items.shape)
    items[1, 5:] = PAD_ID
    scores[1, 5:] = -np.inf
    seen: list[SeenItems] = [set(), {0, 1, 2}, np.array([5]), []]
    config = RerankConfig(mmr_lambda=0.6, max_per_category=2, blocklist=frozenset({4}))
    batch = rerank_lists(items, scores, k=7, config=config, item_categories=CATEGORIES, seen=seen)
    assert batch.item_ids.shape == batch.scores.shape == (4, 7)
    for row in range(4):
        single = rerank(
            items[row],
            scores[row],
            k=7,
            config=config,
            item_categories=CATEGORIES,
            seen=seen[row],
        )
        n = len(single.item_ids)
        np.testing.assert_array_equal(batch.item_ids[row, :n], single.item_ids)
        np.testing.assert_array_equal(batch.scores[row, :n], single.scores)
        assert (batch.item_ids[row, n:] == PAD_ID).all()
        assert np.isneginf(batch.scores[row, n:]).all()
    assert (batch.item_ids[1] != PAD_ID).sum() < 7  # 5 candidates, minus seen and blocked
