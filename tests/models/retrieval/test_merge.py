"""Candidate merge: quotas, dedupe by priority, fill to k, sources kept; the merged retriever."""

from __future__ import annotations

from typing import Self

import numpy as np
import numpy.typing as npt
import pytest

from mlsd.models.retrieval import merge
from mlsd.models.retrieval.base import (
    PAD_ITEM,
    FloatArray,
    IntArray,
    InteractionMatrix,
    RetrievalData,
    Retriever,
)
from mlsd.models.retrieval.merge import (
    NO_SOURCE,
    Fusion,
    MergedRetriever,
    merge_by_segment,
    merge_candidates,
    merged_entries,
    quota_counts,
)
from mlsd.models.retrieval.popularity import PopularityRetriever
from mlsd.models.retrieval.topk import recommend_from_scores
from tests.models.retrieval.contract import RetrieverContract

A = np.array([[1, 2, 3, 4, 5, 6], [1, 2, -1, -1, -1, -1]])
B = np.array([[3, 9, 8, 7, 1, 10], [3, 4, 5, 6, 7, 8]])


def test_hand_computed_merge_interleaves_dedupes_and_keeps_sources() -> None:
    merged = merge_candidates({"a": A, "b": B}, {"a": 0.5, "b": 0.5}, k=6)
    # User 0: a claims 1, 2, 3; b skips 3 (claimed by a) and claims 9, 8, 7. Order by the best
    # (rank - 0.5) / 3 over the proposers: 1 and 3 (b's first) at 1/6, 9 and 2 at 1/2, 8, 7.
    # User 1: a runs out after 1, 2; b claims 3, 4, 5, and fills the slot a left with 6.
    np.testing.assert_array_equal(merged.item_ids, [[1, 3, 9, 2, 8, 7], [1, 3, 2, 4, 5, 6]])
    np.testing.assert_array_equal(merged.source, [[0, 0, 1, 0, 1, 1], [0, 1, 0, 1, 1, 1]])
    assert merged.sources_of(0, 0) == ("a", "b")  # item 1: b lists it too
    assert merged.sources_of(0, 1) == ("a", "b")  # item 3: claimed by a, proposed by both
    assert merged.sources_of(0, 2) == ("b",)
    assert merged.source_of(0, 1) == "a"
    assert merged.source_of(1, 1) == "b"
    assert merged.share_by_source() == pytest.approx({"a": 5 / 12, "b": 7 / 12})


def test_earlier_source_claims_a_shared_item_even_when_it_ranks_it_lower() -> None:
    first = np.array([[10, 11, 12, 99]])
    second = np.array([[99, 20, 21, 22]])
    merged = merge_candidates({"first": first, "second": second}, {"first": 0.5, "second": 0.5}, 4)
    # first's quota of 2 is 10, 11 (99 is beyond it), so second may claim 99.
    assert merged.item_ids[0].tolist() == [10, 99, 11, 20]
    merged = merge_candidates({"first": first, "second": second}, {"first": 1.0, "second": 0.0}, 4)
    assert merged.item_ids[0].tolist() == [10, 11, 12, 99]
    assert merged.sources_of(0, 3) == ("first", "second")
    assert merged.source_of(0, 3) == "first"


def test_sources_that_agree_keep_their_order_whatever_the_quotas() -> None:
    """Cold users get the same fallback list from every source: the merge must not reshuffle it."""
    same = np.array([[5, 4, 3, 2, 1, 0, 9, 8]])
    for quotas in ({"x": 0.2, "y": 0.3, "z": 0.5}, {"x": 0.0, "y": 0.9, "z": 0.1}):
        merged = merge_candidates({"x": same, "y": same, "z": same}, quotas, 8)
        np.testing.assert_array_equal(merged.item_ids, same)
        assert set(merged.sources_of(0, 0)) == {"x", "y", "z"}


def test_a_single_source_with_the_whole_quota_is_returned_unchanged() -> None:
    merged = merge_candidates({"a": A}, {"a": 1.0}, k=6)
    np.testing.assert_array_equal(merged.item_ids, A)
    assert (merged.source[A != PAD_ITEM] == 0).all()
    assert (merged.source[A == PAD_ITEM] == NO_SOURCE).all()
    assert (merged.proposers[A == PAD_ITEM] == 0).all()


def test_a_source_without_quota_only_fills_and_k_beyond_the_union_pads() -> None:
    merged = merge_candidates({"a": A, "b": B}, {"a": 0.5}, k=4)
    np.testing.assert_array_equal(merged.item_ids, [[1, 2, 3, 4], [1, 2, 3, 4]])
    np.testing.assert_array_equal(merged.source, [[0, 0, 0, 0], [0, 0, 1, 1]])
    wide = merge_candidates({"a": A, "b": B}, {"a": 0.5, "b": 0.5}, k=12)
    assert sorted(wide.item_ids[0][wide.item_ids[0] != PAD_ITEM].tolist()) == [*range(1, 11)]
    assert wide.item_ids[0, 10:].tolist() == [PAD_ITEM, PAD_ITEM]
    assert (wide.item_ids[1, 8:] == PAD_ITEM).all()  # user 1 has 8 distinct items


def test_cold_rows_are_merged_with_the_cold_quotas() -> None:
    cold = np.array([False, True])
    merged = merge_by_segment({"a": A, "b": B}, {"a": 1.0}, 4, cold=cold, cold_quotas={"b": 1.0})
    warm_only = merge_candidates({"a": A[:1], "b": B[:1]}, {"a": 1.0}, 4)
    cold_only = merge_candidates({"a": A[1:], "b": B[1:]}, {"b": 1.0}, 4)
    np.testing.assert_array_equal(merged.item_ids, [warm_only.item_ids[0], cold_only.item_ids[0]])
    np.testing.assert_array_equal(merged.source, [warm_only.source[0], cold_only.source[0]])
    np.testing.assert_array_equal(merged.proposers[1], cold_only.proposers[0])
    assert merged.item_ids[1].tolist() == [3, 4, 5, 6]  # b's list, not a's [1, 2]
    # Without cold quotas (or cold rows) it is the plain merge.
    plain = merge_candidates({"a": A, "b": B}, {"a": 1.0}, 4)
    for same in (
        merge_by_segment({"a": A, "b": B}, {"a": 1.0}, 4, cold=cold),
        merge_by_segment({"a": A, "b": B}, {"a": 1.0}, 4, cold_quotas={"b": 1.0}),
    ):
        np.testing.assert_array_equal(same.item_ids, plain.item_ids)


def test_random_lists_keep_the_invariants() -> None:
    rng = np.random.default_rng(0)
    n_users, n_items, length, k = 40, 60, 25, 30
    lists = {
        name: np.stack([rng.permutation(n_items)[:length] for _ in range(n_users)])
        for name in ("x", "y", "z")
    }
    lists["z"][:, 10:] = PAD_ITEM  # z runs short, its unused quota must be filled
    quotas = {"x": 0.5, "y": 0.2, "z": 0.3}
    merged = merge_candidates(lists, quotas, k)
    for u in range(n_users):
        row = merged.item_ids[u]
        union = set().union(*(set(lst[u].tolist()) for lst in lists.values())) - {PAD_ITEM}
        assert len(set(row.tolist())) == k  # full, no duplicates
        assert set(row.tolist()) <= union
        for j, item in enumerate(row):
            proposers = {name for name, lst in lists.items() if item in lst[u]}
            assert set(merged.sources_of(u, j)) == proposers
            assert merged.source_of(u, j) in proposers
        # x (first) always gets its full quota of 15, y its 6 (from what x left).
        assert (merged.source[u] == 0).sum() >= 15
        assert set(lists["x"][u][:15].tolist()) <= set(row[merged.source[u] == 0].tolist())


def test_merged_entries_are_the_merged_set() -> None:
    rng = np.random.default_rng(1)
    lists = {
        name: np.stack([rng.permutation(50)[:20] for _ in range(30)]) for name in ("x", "y", "z")
    }
    lists["y"][:, 12:] = PAD_ITEM
    for quotas in ({"x": 0.5, "y": 0.3, "z": 0.2}, {"y": 0.9}, {"x": 3, "z": 0.4}):
        merged = merge_candidates(lists, quotas, 25)
        entries = merged_entries(lists, quotas, 25)
        for u in range(30):
            claimed = {
                (name, int(item))
                for name, lst in lists.items()
                for item in lst[u][entries[name][u]]
            }
            expected = {
                (merged.source_names[s], int(item))
                for s, item in zip(merged.source[u], merged.item_ids[u], strict=True)
                if item != PAD_ITEM
            }
            assert claimed == expected


def test_chunking_does_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    lists = {n: np.stack([rng.permutation(50)[:20] for _ in range(30)]) for n in ("p", "q")}
    whole = merge_candidates(lists, {"p": 0.6, "q": 0.4}, 20)
    monkeypatch.setattr(merge, "_MAX_CHUNK_CELLS", 100)  # 1 user per block
    chunked = merge_candidates(lists, {"p": 0.6, "q": 0.4}, 20)
    np.testing.assert_array_equal(whole.item_ids, chunked.item_ids)
    np.testing.assert_array_equal(whole.proposers, chunked.proposers)


def test_large_ids_give_the_same_merge_as_small_ids() -> None:
    """Ids far above the list width take the sort path instead of the dense table."""
    rng = np.random.default_rng(2)
    lists = {n: np.stack([rng.permutation(40)[:15] for _ in range(10)]) for n in ("p", "q")}
    lists["q"][:, 12:] = PAD_ITEM
    shift = 10**12
    shifted = {n: np.where(lst == PAD_ITEM, PAD_ITEM, lst + shift) for n, lst in lists.items()}
    small = merge_candidates(lists, {"p": 0.3, "q": 0.7}, 20)
    large = merge_candidates(shifted, {"p": 0.3, "q": 0.7}, 20)
    np.testing.assert_array_equal(
        np.where(small.item_ids == PAD_ITEM, PAD_ITEM, small.item_ids + shift), large.item_ids
    )
    np.testing.assert_array_equal(small.proposers, large.proposers)
    np.testing.assert_array_equal(small.source, large.source)


def test_memory_does_not_grow_with_the_id_space() -> None:
    """Disjoint lists over a big catalog: the dedupe table is users × list width, not × catalog."""
    import tracemalloc

    n_users, length = 500, 100
    ids = np.arange(n_users * 2 * length, dtype=np.int64).reshape(2, n_users, length) * 7
    tracemalloc.start()
    merged = merge_candidates({"p": ids[0], "q": ids[1]}, {"p": 0.5, "q": 0.5}, length)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (merged.item_ids != PAD_ITEM).all()
    # A users × distinct-items table would be 500 × 100,000 × 9 bytes = 450 MB.
    assert peak < 40e6, peak


def test_quota_counts() -> None:
    assert quota_counts([0.5, 0.3, 0.2], 7).tolist() == [4, 2, 1]
    assert quota_counts([1 / 3, 1 / 3, 1 / 3], 200).tolist() == [67, 67, 66]
    assert quota_counts([0.25, 0.25], 200).tolist() == [50, 50]  # sum < 1: the rest fills
    assert quota_counts([150, 100], 200).tolist() == [150, 50]  # counts capped at k in order
    assert quota_counts([0.0, 1.0], 5).tolist() == [0, 5]


@pytest.mark.parametrize(
    ("quotas", "message"),
    [
        ([0.7, 0.6], r"sum to 1.300 > 1"),
        ([1.5], r"must be in \[0, 1\]"),
        ([-2], r"must be >= 0"),
        ([True], "fraction of k"),
        (["half"], "fraction of k"),
    ],
)
def test_bad_quotas_raise(quotas: list[object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        quota_counts(quotas, 10)  # type: ignore[arg-type]


def test_bad_candidates_raise() -> None:
    with pytest.raises(ValueError, match=r"unknown source\(s\) \['c'\]"):
        merge_candidates({"a": A}, {"c": 0.5}, 4)
    with pytest.raises(ValueError, match=r"candidates\['b'\] has shape \(1, 6\)"):
        merge_candidates({"a": A, "b": B[:1]}, {"a": 0.5}, 4)


class _HighestIdRetriever(Retriever):
    """Recommends the highest item ids: a second source unlike popularity."""

    name = "highest_id"

    def fit(self, train: RetrievalData) -> Self:
        self.interactions_ = InteractionMatrix.from_events(train.events, train.items["item_id"])
        return self

    def recommend(
        self, user_ids: npt.ArrayLike, k: int, *, exclude_seen: bool = True
    ) -> tuple[IntArray, FloatArray]:
        scores = self.interactions_.item_ids.astype(np.float32)
        return recommend_from_scores(
            user_ids,
            k,
            interactions=self.interactions_,
            score_rows=lambda rows: np.broadcast_to(scores, (len(rows), len(scores))),
            fallback_scores=scores,
            exclude_seen=exclude_seen,
        )


def _merged() -> MergedRetriever:
    sources = {"popularity": PopularityRetriever(), "highest_id": _HighestIdRetriever()}
    return MergedRetriever(sources, {"popularity": 0.75, "highest_id": 0.25})


class TestMergedRetriever(RetrieverContract):
    def make_retriever(self) -> Retriever:
        return _merged()


def test_merged_retriever_is_the_merge_of_its_fitted_sources(
    contract_data: RetrievalData,
) -> None:
    retriever = _merged().fit(contract_data)
    assert set(retriever.fit_seconds_) == {"popularity", "highest_id"}
    users = contract_data.events["user_id"].drop_duplicates().to_numpy()[:5]
    lists = {n: s.recommend(users, 20)[0] for n, s in retriever.sources.items()}
    expected = merge_candidates(lists, retriever.quotas, 20)
    candidates = retriever.recommend_candidates(users, 20)
    items, scores = retriever.recommend(users, 20)
    np.testing.assert_array_equal(items, expected.item_ids)
    np.testing.assert_array_equal(candidates.source, expected.source)
    assert (candidates.source == 0).sum() == 5 * 15
    assert (candidates.source == 1).sum() == 5 * 5
    assert (np.diff(scores, axis=1) < 0).all()


def test_merged_retriever_gives_cold_users_the_cold_quotas(contract_data: RetrievalData) -> None:
    sources = {"popularity": PopularityRetriever(), "highest_id": _HighestIdRetriever()}
    quotas = {"popularity": 0.0, "highest_id": 1.0}
    retriever = MergedRetriever(sources, quotas, cold_quotas={"popularity": 1.0}).fit(contract_data)
    warm_user = int(contract_data.events["user_id"].iloc[0])
    cold_user = int(contract_data.events["user_id"].max()) + 1
    candidates = retriever.recommend_candidates(np.array([warm_user, cold_user]), 10)
    assert (candidates.source[0] == 1).all()  # warm: all highest_id
    assert (candidates.source[1] == 0).all()  # cold: all popularity
    popular, _ = sources["popularity"].recommend(np.array([cold_user]), 10)
    np.testing.assert_array_equal(candidates.item_ids[1], popular[0])


def test_merged_retriever_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="unknown source"):
        MergedRetriever({"popularity": PopularityRetriever()}, {"als": 0.5})
    with pytest.raises(ValueError, match="unknown source"):
        MergedRetriever({"popularity": PopularityRetriever()}, {}, cold_quotas={"als": 0.5})
    with pytest.raises(ValueError, match="at least one source"):
        MergedRetriever({}, {})
    with pytest.raises(RuntimeError, match="not fitted"):
        _merged().recommend(np.array([1]), 5)


def test_quotas_are_checked_by_type_on_every_merge() -> None:
    # The merge caches its slot counts per quotas: a count 1, a fraction 1.0 and True differ.
    lists = {"a": np.array([[1, 2, 3]]), "b": np.array([[4, 5, 6]])}
    assert sorted(merge_candidates(lists, {"a": 1, "b": 2}, 3).source[0]) == [0, 1, 1]
    assert sorted(merge_candidates(lists, {"a": 1.0, "b": 2}, 3).source[0]) == [0, 0, 0]
    with pytest.raises(ValueError, match="quota"):
        merge_candidates(lists, {"a": True}, 3)
    with pytest.raises(ValueError, match="quota"):
        merge_candidates(lists, {"a": [1]}, 3)  # type: ignore[dict-item]


# --- reciprocal-rank fusion ----------------------------------------------------------------------

RRF = Fusion("rrf", rank_constant=1.0)


def test_hand_computed_fusion_puts_items_several_sources_rank_high_first() -> None:
    # User 0, c = 1, equal weights 0.5: 1 = .5/2 + .5/6 = .333, 3 = .5/4 + .5/2 = .375,
    # 2 = .5/3, 9 = .5/3 (a tie: a claimed 2 first), 4 = .5/5, 8 = .5/4.
    merged = merge_candidates({"a": A, "b": B}, {"a": 0.5, "b": 0.5}, k=6, fusion=RRF)
    np.testing.assert_array_equal(merged.item_ids[0], [3, 1, 2, 9, 8, 4])
    # Credited to the source contributing most: 3 to b (rank 1 there), 1 to a.
    np.testing.assert_array_equal(merged.source[0], [1, 0, 0, 1, 1, 0])
    assert merged.sources_of(0, 0) == ("a", "b")
    # User 1: a lists 1, 2 only; b's 3..8 fill the rest by their fused scores.
    np.testing.assert_array_equal(merged.item_ids[1], [1, 3, 2, 4, 5, 6])


def test_fusion_weights_are_scale_free_and_weight_zero_sources_only_fill() -> None:
    lists = {"a": A, "b": B}
    once = merge_candidates(lists, {"a": 0.2, "b": 0.6}, k=6, fusion=RRF)
    other = merge_candidates(lists, {"a": 0.6, "b": 0.2}, k=6, fusion=RRF)
    np.testing.assert_array_equal(
        once.item_ids, merge_candidates(lists, {"a": 0.1, "b": 0.3}, k=6, fusion=RRF).item_ids
    )
    assert not np.array_equal(once.item_ids, other.item_ids)  # the ratio of weights counts
    # b has no weight: a's items first in a's order, then b's in b's order (user 1: a has 2).
    only_a = merge_candidates(lists, {"a": 1.0}, k=6, fusion=RRF)
    np.testing.assert_array_equal(only_a.item_ids, [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
    np.testing.assert_array_equal(only_a.source[1], [0, 0, 1, 1, 1, 1])
    # Beyond the union: padded, as with quotas.
    short = merge_candidates({"a": A[1:]}, {"a": 1.0}, k=4, fusion=RRF)
    np.testing.assert_array_equal(short.item_ids, [[1, 2, PAD_ITEM, PAD_ITEM]])
    np.testing.assert_array_equal(short.source, [[0, 0, NO_SOURCE, NO_SOURCE]])


def _random_lists(seed: int, n_items: int = 60) -> dict[str, IntArray]:
    rng = np.random.default_rng(seed)
    lists = {
        name: np.stack([rng.permutation(n_items)[:25] for _ in range(40)])
        for name in ("x", "y", "z")
    }
    lists["z"][:, 10:] = PAD_ITEM
    return lists


def test_fusion_matches_a_direct_sum_of_reciprocal_ranks() -> None:
    lists = _random_lists(3)
    weights = {"x": 0.5, "y": 0.2, "z": 0.3}
    merged = merge_candidates(lists, weights, 30, fusion=Fusion("rrf", rank_constant=10.0))
    for u in range(40):
        score: dict[int, float] = {}
        first: dict[int, int] = {}
        for s, (name, lst) in enumerate(lists.items()):
            for rank, item in enumerate(lst[u].tolist()):
                if item != PAD_ITEM:
                    score[item] = score.get(item, 0.0) + weights[name] / (10.0 + rank + 1)
                    first[item] = min(first.get(item, s * 25 + rank), s * 25 + rank)
        expected = sorted(score, key=lambda item: (-score[item], first[item]))[:30]
        assert merged.item_ids[u].tolist() == expected
        for j, item in enumerate(expected):
            assert set(merged.sources_of(u, j)) == {
                name for name, lst in lists.items() if item in lst[u]
            }


def test_fused_entries_chunks_and_large_ids_agree_with_the_fused_merge(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lists = _random_lists(4)
    weights = {"x": 0.3, "y": 0.7}
    merged = merge_candidates(lists, weights, 25, fusion=RRF)
    entries = merged_entries(lists, weights, 25, fusion=RRF)
    for u in range(40):
        claimed = {(n, int(i)) for n, lst in lists.items() for i in lst[u][entries[n][u]]}
        expected = {
            (merged.source_names[s], int(item))
            for s, item in zip(merged.source[u], merged.item_ids[u], strict=True)
        }
        assert claimed == expected
    large = {n: np.where(lst >= 0, lst + 10**12, PAD_ITEM) for n, lst in lists.items()}
    np.testing.assert_array_equal(
        merge_candidates(large, weights, 25, fusion=RRF).item_ids - 10**12, merged.item_ids
    )
    monkeypatch.setattr(merge, "_MAX_CHUNK_CELLS", 100)  # 1 user per block
    np.testing.assert_array_equal(
        merge_candidates(lists, weights, 25, fusion=RRF).item_ids, merged.item_ids
    )


def test_fused_cold_rows_use_the_cold_weights_and_the_retriever_passes_the_fusion(
    contract_data: RetrievalData,
) -> None:
    cold = np.array([False, True])
    by_segment = merge_by_segment(
        {"a": A, "b": B}, {"a": 1.0}, 6, cold=cold, cold_quotas={"b": 1.0}, fusion=RRF
    )
    np.testing.assert_array_equal(by_segment.item_ids[0], [1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(by_segment.item_ids[1], B[1])
    sources = {"popularity": PopularityRetriever(), "highest_id": _HighestIdRetriever()}
    weights = {"popularity": 0.5, "highest_id": 0.5}
    retriever = MergedRetriever(sources, weights, fusion=RRF).fit(contract_data)
    users = contract_data.events["user_id"].drop_duplicates().to_numpy()[:5]
    lists = {n: s.recommend(users, 20)[0] for n, s in retriever.sources.items()}
    np.testing.assert_array_equal(
        retriever.recommend(users, 20)[0],
        merge_candidates(lists, weights, 20, fusion=RRF).item_ids,
    )


@pytest.mark.parametrize(
    ("method", "constant", "message"),
    [("borda", 60.0, "use 'quotas' or 'rrf'"), ("rrf", 0.0, "rank_constant must be > 0")],
)
def test_a_bad_fusion_is_refused(method: str, constant: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Fusion(method, constant)  # type: ignore[arg-type]
