"""The Faiss backends: the shared contract, plus what each backend's knobs must do."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest

from mlsd.serving.index import (
    FlatConfig,
    FlatIndex,
    HNSWConfig,
    HNSWIndex,
    IVFConfig,
    IVFIndex,
    VectorIndex,
    recall_at_k,
)
from mlsd.serving.index.base import PAD_ID
from mlsd.serving.index.faiss_index import IDS_FILE, INDEX_FILE, default_nlist
from tests.serving.index.test_base import DIM, VectorIndexContract, clustered


class TestFlatIndex(VectorIndexContract):
    exact = True

    def make_index(self, tmp_path: Path) -> VectorIndex:
        return FlatIndex(FlatConfig(build_threads=1))


class TestFlatNormTiersIndex(VectorIndexContract):
    exact = True

    def make_index(self, tmp_path: Path) -> VectorIndex:
        return FlatIndex(FlatConfig(norm_tiers=True, first_tier=64, build_threads=1))


class TestHNSWIndex(VectorIndexContract):
    def make_index(self, tmp_path: Path) -> VectorIndex:
        # Small on purpose, so the contract checks a graph that is really approximate.
        return HNSWIndex(HNSWConfig(m=8, ef_construction=40, ef_search=32, build_threads=1))


class TestIVFFlatIndex(VectorIndexContract):
    def make_index(self, tmp_path: Path) -> VectorIndex:
        return IVFIndex(IVFConfig(nlist=32, nprobe=8, build_threads=1))


class TestIVFPQIndex(VectorIndexContract):
    exact_scores = False  # PQ's scores are approximations
    min_recall = 0.8  # 6-bit codes of 2-dim sub-vectors; see test_pq_recall_needs_refine

    def make_index(self, tmp_path: Path) -> VectorIndex:
        return IVFIndex(IVFConfig(nlist=16, nprobe=8, pq_m=8, nbits=6, build_threads=1))


class TestIVFPQRefinedIndex(VectorIndexContract):
    def make_index(self, tmp_path: Path) -> VectorIndex:
        return IVFIndex(
            IVFConfig(nlist=16, nprobe=8, pq_m=8, nbits=6, refine_factor=4, build_threads=1)
        )


def _recall(index: VectorIndex, k: int = 10) -> float:
    data = clustered()
    return recall_at_k(index.search(data.queries, k)[0], data.exact(k)[0], k)


def test_hnsw_ef_search_trades_recall() -> None:
    data = clustered()
    index = HNSWIndex(HNSWConfig(m=8, ef_construction=40, ef_search=10, build_threads=1))
    index.build(data.item_ids, data.item_embeddings)
    low = _recall(index)
    high = _recall(index.set_search(ef_search=200))
    assert index.config.ef_search == 200
    assert high > low
    assert high >= 0.95


def test_ivf_nprobe_trades_recall_and_all_cells_is_exact() -> None:
    data = clustered()
    index = IVFIndex(IVFConfig(nlist=32, nprobe=1, build_threads=1)).build(
        data.item_ids, data.item_embeddings
    )
    assert index.nlist == 32
    low = _recall(index)
    assert low < 0.9
    assert _recall(index.set_search(nprobe=32)) == 1.0  # every cell visited: exhaustive


def test_pq_recall_needs_refine() -> None:
    data = clustered()
    config = IVFConfig(nlist=16, nprobe=16, pq_m=4, nbits=4, build_threads=1)
    plain = IVFIndex(config).build(data.item_ids, data.item_embeddings)
    refined = IVFIndex(dataclasses.replace(config, refine_factor=8))
    refined.build(data.item_ids, data.item_embeddings)
    assert _recall(refined) > _recall(plain)
    assert _recall(refined) >= 0.95
    with pytest.raises(ValueError, match="rebuilding"):
        plain.set_search(refine_factor=4)
    refined.set_search(refine_factor=2)
    assert refined.config.refine_factor == 2


def test_memory_estimates_order_the_backends() -> None:
    data = clustered()
    built = {
        name: index.build(data.item_ids, data.item_embeddings)
        for name, index in {
            "flat": FlatIndex(),
            "hnsw8": HNSWIndex(HNSWConfig(m=8, build_threads=1)),
            "hnsw16": HNSWIndex(HNSWConfig(m=16, build_threads=1)),
            "ivf": IVFIndex(IVFConfig(nlist=16, build_threads=1)),
            "pq": IVFIndex(IVFConfig(nlist=16, pq_m=4, nbits=4, build_threads=1)),
        }.items()
    }
    mem = {name: index.memory_bytes() for name, index in built.items()}
    n = len(data.item_ids)
    assert mem["flat"] == n * DIM * 4 + n * 8
    assert mem["hnsw8"] > mem["flat"] + n * 2 * 8 * 4  # bottom layer: 2m int32 links/item
    assert mem["hnsw16"] > mem["hnsw8"]
    assert mem["pq"] < mem["ivf"] / 2
    assert FlatIndex().memory_bytes() == 0


def test_saved_files_are_faiss_numpy_and_json(tmp_path: Path) -> None:
    data = clustered()
    index = HNSWIndex(HNSWConfig(m=8, ef_search=77, build_threads=1)).build(
        data.item_ids, data.item_embeddings
    )
    index.save(tmp_path)
    assert faiss.read_index(str(tmp_path / INDEX_FILE)).ntotal == len(data.item_ids)
    np.testing.assert_array_equal(np.load(tmp_path / IDS_FILE, allow_pickle=False), data.item_ids)
    meta = json.loads((tmp_path / "index.json").read_text())
    assert meta["backend"] == "hnsw"
    assert meta["config"]["ef_search"] == 77
    assert (meta["dim"], meta["ntotal"]) == (DIM, len(data.item_ids))
    assert HNSWIndex.load(tmp_path).config == index.config


def test_inconsistent_saved_directory_is_refused(tmp_path: Path) -> None:
    data = clustered()
    FlatIndex().build(data.item_ids, data.item_embeddings).save(tmp_path)
    np.save(tmp_path / IDS_FILE, data.item_ids[:-1])
    with pytest.raises(ValueError, match="inconsistent"):
        FlatIndex.load(tmp_path)


def test_search_sets_the_configured_threads() -> None:
    data = clustered()
    index = FlatIndex(FlatConfig(build_threads=2, search_threads=1))
    index.build(data.item_ids, data.item_embeddings)
    assert faiss.omp_get_max_threads() == 2
    index.search(data.queries, 3)
    assert faiss.omp_get_max_threads() == 1


def test_hnsw_returns_k_items_when_ef_search_is_smaller() -> None:
    data = clustered()
    index = HNSWIndex(HNSWConfig(m=8, ef_search=5, build_threads=1)).build(
        data.item_ids, data.item_embeddings
    )
    ids, _ = index.search(data.queries, 50)
    assert (ids != -1).all()


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"HNSWConfig.m=0"):
        HNSWConfig(m=0)
    with pytest.raises(ValueError, match="refine_factor needs pq_m"):
        IVFConfig(refine_factor=2)
    with pytest.raises(TypeError, match="takes a HNSWConfig"):
        HNSWIndex(IVFConfig())
    data = clustered()
    with pytest.raises(ValueError, match="must divide the embedding dimension 16"):
        IVFIndex(IVFConfig(nlist=4, pq_m=5, build_threads=1)).build(
            data.item_ids, data.item_embeddings
        )
    with pytest.raises(ValueError, match="exceeds the 10 items"):
        IVFIndex(IVFConfig(nlist=11, build_threads=1)).build(
            data.item_ids[:10], data.item_embeddings[:10]
        )
    with pytest.raises(
        ValueError, match=r"at least 2\*\*nbits = 256 items to train its codes, got 200"
    ):
        IVFIndex(IVFConfig(nlist=4, pq_m=4, build_threads=1)).build(
            data.item_ids[:200], data.item_embeddings[:200]
        )


def _long_tailed(n_items: int = 2_000, n_big: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """A few long vectors (popular items) among many short ones, as in ALS embeddings."""
    rng = np.random.default_rng(3)
    embeddings = rng.normal(size=(n_items, DIM)).astype(np.float32)
    norms = np.where(np.arange(n_items) < n_big, 10.0, 0.1)
    embeddings *= (norms / np.linalg.norm(embeddings, axis=1))[:, None].astype(np.float32)
    return np.arange(n_items, dtype=np.int64) * 3 + 1, embeddings[rng.permutation(n_items)]


def test_norm_tiers_stop_early_and_stay_exact() -> None:
    ids, embeddings = _long_tailed()
    queries = np.random.default_rng(4).normal(size=(50, DIM)).astype(np.float32)
    tiered = FlatIndex(FlatConfig(norm_tiers=True, first_tier=64, build_threads=1))
    tiered.build(ids, embeddings)
    plain = FlatIndex(FlatConfig(build_threads=1)).build(ids, embeddings)
    got, expected = tiered.search(queries, 10), plain.search(queries, 10)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-5)
    assert np.median(tiered.last_scanned_) == 64  # the 40 long vectors settle most queries
    assert tiered.last_scanned_.max() <= len(ids)


@pytest.mark.parametrize("k", [3, 6])
def test_norm_tiers_second_pass_reaches_exactly_the_items_that_could_score(k: int) -> None:
    rng = np.random.default_rng(5)
    n_items = 3_000
    embeddings = rng.normal(size=(n_items, DIM)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    embeddings *= rng.lognormal(0.0, 1.5, size=n_items)[:, None].astype(np.float32)
    ids = np.arange(n_items, dtype=np.int64) * 5 + 2
    queries = rng.normal(size=(80, DIM)).astype(np.float32) * rng.uniform(0.1, 3, (80, 1))
    queries[7] = 0.0  # scores 0 everywhere: every item ties, the lowest ids win
    exact = queries @ embeddings.T
    tiered = FlatIndex(FlatConfig(norm_tiers=True, first_tier=32, build_threads=1))
    tiered.build(ids, embeddings)
    for width in (k, 100):  # 100: more than the first tier
        got_ids, got_scores = tiered.search(queries, width)
        best = -np.sort(-exact, axis=1)[:, :width]
        np.testing.assert_allclose(got_scores, best, rtol=1e-5, atol=1e-5)
        assert (got_ids != PAD_ID).all()
        np.testing.assert_allclose(
            np.take_along_axis(exact, (got_ids - 2) // 5, axis=1), got_scores, rtol=1e-5, atol=1e-5
        )
    # Each query stopped where the items left cannot beat its k-th score, and the second pass
    # ran for some queries but not all (reaches differ, in steps of first_tier / 4).
    tiered.search(queries, k)
    scores = -np.sort(-exact, axis=1)[:, k - 1]
    scanned = tiered.last_scanned_
    rest = np.append(np.sort(np.linalg.norm(embeddings, axis=1))[::-1], 0.0)[scanned]
    assert (np.linalg.norm(queries, axis=1) * rest <= scores * (1 + 1e-4) + 1e-6).all()
    assert scanned[7] == n_items  # the tie reaches past every tier
    assert tiered.search(queries[7], k)[0].tolist() == [(ids[:k]).tolist()]
    assert (scanned > 32).any()
    assert np.median(scanned) < n_items / 4
    assert ((scanned % 8 == 0) | (scanned == n_items)).all()


def test_max_scan_bounds_the_scan() -> None:
    data = clustered()
    index = FlatIndex(FlatConfig(norm_tiers=True, first_tier=16, max_scan=100, build_threads=1))
    ids, _ = index.build(data.item_ids, data.item_embeddings).search(data.queries, 10)
    assert index.last_scanned_.max() <= 100
    # Cut short, the search is no longer exact; whole, flat search is, tiered or not.
    assert not index.exact
    assert FlatIndex().exact
    assert FlatIndex(FlatConfig(norm_tiers=True)).exact
    assert not HNSWIndex().exact
    assert not IVFIndex().exact
    longest = data.item_ids[np.argsort(-np.linalg.norm(data.item_embeddings, axis=1))[:100]]
    assert set(ids.ravel().tolist()) <= set(longest.tolist())
    with pytest.raises(ValueError, match="max_scan needs norm_tiers"):
        FlatConfig(max_scan=10)


def test_norm_tiers_refuse_unsorted_vectors(tmp_path: Path) -> None:
    data = clustered()
    FlatIndex(FlatConfig(build_threads=1)).build(data.item_ids, data.item_embeddings).save(tmp_path)
    meta = json.loads((tmp_path / "index.json").read_text())
    meta["config"]["norm_tiers"] = True
    (tmp_path / "index.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not sorted by norm"):
        FlatIndex.load(tmp_path)


def test_default_nlist() -> None:
    assert default_nlist(1_000_000) == 4_000
    assert default_nlist(3_000) == 3_000 // 39  # capped: >= 39 training points per cell
    assert default_nlist(5) == 1


def test_a_tie_at_the_kth_place_costs_one_more_search_not_a_doubling_series() -> None:
    data = clustered(n_items=2_000)
    index = FlatIndex(FlatConfig(build_threads=1)).build(data.item_ids, data.item_embeddings)
    widths: list[int] = []
    search = index._search

    def counted(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        widths.append(k)
        return search(queries, k)

    index._search = counted  # type: ignore[method-assign]
    ids, _ = index.search(np.zeros((1, DIM), np.float32), 10)  # every item ties at 0
    assert widths == [11, 2_000]  # one item wider, then up to TIE_MARGIN (here: all)
    np.testing.assert_array_equal(ids[0], np.sort(data.item_ids)[:10])


def test_a_search_in_another_thread_leaves_this_ones_scan_figures_whole() -> None:
    # The service searches one index from two model threads: each merges its own figures.
    data = clustered(n_items=2_000)
    index = FlatIndex(FlatConfig(norm_tiers=True, first_tier=32, build_threads=1))
    index.build(data.item_ids, data.item_embeddings)
    many, one = data.queries[:40], data.queries[:1]

    def elsewhere() -> None:
        thread = threading.Thread(target=index._search, args=(one, 10))
        thread.start()
        thread.join()

    index._search(many, 10)
    elsewhere()  # another thread's search sets last_scanned_ to its one query
    index._searched(np.arange(40), 40, first=True)
    elsewhere()
    index._search(many[3:4], 200)  # this thread's wider pass for query 3
    index._searched(np.array([3]), 40, first=False)
    assert index.last_scanned_.shape == (40,)
    assert index.last_scanned_[3] >= 200
