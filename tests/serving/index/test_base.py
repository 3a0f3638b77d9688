"""The shared contract every ``VectorIndex`` backend meets, and the base helpers' own tests.

A backend's test module is a few lines::

    class TestMyIndex(VectorIndexContract):
        exact = False
        def make_index(self, tmp_path: Path) -> VectorIndex:
            return MyIndex(MyConfig(...))
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from mlsd.serving.index import (
    FLAT_MAX_ITEMS,
    HNSW_MAX_ITEMS,
    INDEX_BACKENDS,
    PAD_ID,
    FlatConfig,
    FlatIndex,
    HNSWConfig,
    HNSWIndex,
    IVFConfig,
    IVFIndex,
    MilvusIndex,
    VectorIndex,
    choose_index,
    index_for_queries,
    l2_normalize,
    load_index,
    recall_at_k,
)
from mlsd.serving.index.base import META_FILE, check_items

DIM = 16


@dataclass(frozen=True)
class Clustered:
    """Items around a few centres with varied norms (as a model's embeddings), and queries."""

    item_ids: np.ndarray  # (n,) int64, large and shuffled: never equal to positions
    item_embeddings: np.ndarray  # (n, DIM) float32
    queries: np.ndarray  # (n_q, DIM) float32

    def exact(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force top-``k`` ids and inner products, computed in float64 with numpy."""
        scores = self.queries.astype(np.float64) @ self.item_embeddings.astype(np.float64).T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return self.item_ids[order], np.take_along_axis(scores, order, axis=1)

    def true_scores(self, ids: np.ndarray) -> np.ndarray:
        """Inner product of each query with the items ``ids`` (n_q, k); ``-inf`` at padding."""
        row = {int(item): r for r, item in enumerate(self.item_ids)}
        out = np.full(ids.shape, -np.inf)
        for q, row_ids in enumerate(ids):
            for j, item in enumerate(row_ids):
                if item != PAD_ID:
                    out[q, j] = float(self.queries[q] @ self.item_embeddings[row[int(item)]])
        return out


@functools.cache
def clustered(n_items: int = 3_000, n_queries: int = 60, seed: int = 0) -> Clustered:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(30, DIM))
    members = rng.integers(0, len(centres), size=n_items)
    directions = centres[members] + 0.4 * rng.normal(size=(n_items, DIM))
    norms = rng.lognormal(mean=0.0, sigma=0.5, size=(n_items, 1))
    embeddings = (l2_normalize(directions) * norms).astype(np.float32)
    ids = rng.choice(10**12, size=n_items, replace=False).astype(np.int64) + 10**9
    queries = centres[rng.integers(0, len(centres), size=n_queries)]
    queries = queries + 0.5 * rng.normal(size=queries.shape)
    return Clustered(ids, embeddings, queries.astype(np.float32))


class VectorIndexContract:
    """Inherit, set ``exact``, implement :meth:`make_index`; every test here runs for it."""

    exact: ClassVar[bool] = False
    """Exact backends must return the brute-force top-k; approximate ones a high recall."""
    exact_scores: ClassVar[bool] = True
    """Scores are the true inner products of the returned items (not so for plain PQ)."""
    min_recall: ClassVar[float] = 0.9

    def make_index(self, tmp_path: Path) -> VectorIndex:
        raise NotImplementedError

    @pytest.fixture
    def data(self) -> Clustered:
        return clustered()

    @pytest.fixture
    def built(self, tmp_path: Path, data: Clustered) -> VectorIndex:
        index = self.make_index(tmp_path)
        assert index.build(data.item_ids, data.item_embeddings) is index
        return index

    def test_size_and_memory(self, built: VectorIndex, data: Clustered) -> None:
        assert built.ntotal == len(data.item_ids)
        assert built.dim == DIM
        assert built.memory_bytes() >= len(data.item_ids) * 8  # at least the ids

    def test_shapes_dtypes_and_order(self, built: VectorIndex, data: Clustered) -> None:
        ids, scores = built.search(data.queries, 25)
        assert ids.shape == scores.shape == (len(data.queries), 25)
        assert ids.dtype == np.int64
        assert scores.dtype == np.float32
        assert (np.diff(scores, axis=1) <= 1e-5).all()
        for row in ids:
            assert len(set(row.tolist())) == 25

    def test_against_brute_force(self, built: VectorIndex, data: Clustered) -> None:
        k = 10
        ids, scores = built.search(data.queries, k)
        exact_ids, exact_scores = data.exact(k)
        recall = recall_at_k(ids, exact_ids, k)
        if self.exact:
            # Same items in the same order, up to exact ties (none in continuous data).
            np.testing.assert_array_equal(ids, exact_ids)
            np.testing.assert_allclose(scores, exact_scores, rtol=1e-5, atol=1e-5)
        else:
            assert recall >= self.min_recall, recall
        if self.exact_scores:
            np.testing.assert_allclose(scores, data.true_scores(ids), rtol=1e-5, atol=1e-5)

    def test_ids_are_the_given_ids_not_positions(self, built: VectorIndex, data: Clustered) -> None:
        ids, _ = built.search(data.queries, 10)
        assert set(ids.ravel().tolist()) <= set(data.item_ids.tolist())
        assert not np.isin(ids, np.arange(built.ntotal)).any()  # positions would be small
        # Each probe's exact best item (an id far from any position) is among its top 10.
        probe = data.item_embeddings[:20] * 10
        top, _ = built.search(probe, 10)
        exact_top = data.item_ids[np.argmax(probe @ data.item_embeddings.T, axis=1)]
        assert (top == exact_top[:, None]).any(axis=1).mean() >= self.min_recall

    def test_k_beyond_ntotal_pads(self, built: VectorIndex, data: Clustered) -> None:
        n = built.ntotal
        ids, scores = built.search(data.queries[:3], n + 7)
        assert ids.shape == (3, n + 7)
        assert (ids[:, n:] == PAD_ID).all()
        assert np.isneginf(scores[:, n:]).all()
        for row, row_scores in zip(ids, scores, strict=True):
            real = row[row != PAD_ID]
            assert len(real) == len(set(real.tolist()))
            # Padding only at the end, -inf exactly where the padding is.
            assert (row[: len(real)] != PAD_ID).all()
            assert np.isfinite(row_scores[: len(real)]).all()
            if self.exact:
                assert len(real) == n

    def test_save_load_round_trip(
        self, built: VectorIndex, data: Clustered, tmp_path: Path
    ) -> None:
        before = built.search(data.queries, 10)
        built.save(tmp_path / "saved")
        assert (tmp_path / "saved" / META_FILE).is_file()
        for loaded in (type(built).load(tmp_path / "saved"), load_index(tmp_path / "saved")):
            assert type(loaded) is type(built)
            assert (loaded.ntotal, loaded.dim) == (built.ntotal, built.dim)
            after = loaded.search(data.queries, 10)
            np.testing.assert_array_equal(after[0], before[0])
            np.testing.assert_array_equal(after[1], before[1])

    def test_empty_index_is_a_clear_error(self, tmp_path: Path, data: Clustered) -> None:
        index = self.make_index(tmp_path)
        assert index.ntotal == 0
        with pytest.raises(ValueError, match=r"empty.*build"):
            index.search(data.queries, 5)
        with pytest.raises(ValueError, match="no items"):
            index.build(np.empty(0, np.int64), np.empty((0, DIM), np.float32))

    def test_wrong_dim_names_the_expected_dim(self, built: VectorIndex, data: Clustered) -> None:
        with pytest.raises(ValueError, match=rf"\(n_queries, {DIM}\).*dimension is {DIM}"):
            built.search(np.ones((2, DIM + 1), np.float32), 5)

    def test_one_vector_and_no_queries(self, built: VectorIndex, data: Clustered) -> None:
        ids, _ = built.search(data.queries[0], 5)
        assert ids.shape == (1, 5)
        np.testing.assert_array_equal(ids[0], built.search(data.queries[:1], 5)[0][0])
        ids, scores = built.search(np.empty((0, DIM), np.float32), 5)
        assert ids.shape == scores.shape == (0, 5)

    def test_equal_scores_go_to_the_lower_item_id(self, tmp_path: Path) -> None:
        # 10 items score 2, 70 tie at 1 (as ALS's items without events tie at 0), stored
        # highest id first; the query reads dimension 0 only, so the ties are exact.
        rng = np.random.default_rng(0)
        ids = np.arange(1_000, 920, -1, dtype=np.int64)
        vectors = rng.normal(size=(80, DIM)).astype(np.float32)
        vectors[:, 0] = np.where(np.arange(80) < 10, 2.0, 1.0)
        index = self.make_index(tmp_path).build(ids, vectors)
        query = np.zeros((2, DIM), np.float32)
        query[:, 0] = 1.0
        expected = [*range(991, 1_001), *range(921, 926)]  # as offline top-k lists break ties
        for k in (15, 16, 60):
            got, scores = index.search(query, k)
            for row, row_scores in zip(got, scores, strict=True):
                for score in np.unique(row_scores[np.isfinite(row_scores)]):  # in id order
                    tied = row[row_scores == score]
                    assert (np.diff(tied) > 0).all(), (k, tied)
            if self.exact:  # and the lowest ids of a tie are the ones kept
                assert got[:, :15].tolist() == [expected, expected], k
                assert scores[0, :15].tolist() == [2.0] * 10 + [1.0] * 5

    def test_rebuild_replaces_the_items(
        self, built: VectorIndex, data: Clustered, tmp_path: Path
    ) -> None:
        other = clustered(n_items=2_000, seed=1)
        built.build(other.item_ids, other.item_embeddings)
        assert built.ntotal == 2_000
        ids, _ = built.search(data.queries, 10)
        assert set(ids.ravel().tolist()) <= set(other.item_ids.tolist())


# -- the base helpers -------------------------------------------------------------------------


def test_recall_at_k_counts_overlap_per_query() -> None:
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    approx = np.array([[4, 3, 9, 9], [5, 6, 7, 8]])
    assert recall_at_k(approx, exact, 4) == pytest.approx(6 / 8)
    assert recall_at_k(approx, exact, 2) == pytest.approx(2 / 4)  # only the first two count
    padded = np.array([[1, PAD_ID, PAD_ID]])
    assert recall_at_k(np.array([[1, 7, PAD_ID]]), padded, 3) == 1.0
    with pytest.raises(ValueError, match="n_queries"):
        recall_at_k(approx[:1], exact, 4)


@pytest.mark.parametrize(
    ("ids", "embeddings", "message"),
    [
        (np.array([1, 1]), np.ones((2, 3)), "not distinct"),
        (np.array([1, 2, 3]), np.ones((2, 3)), "3 ids but item_embeddings has 2 rows"),
        (np.array([1, PAD_ID]), np.ones((2, 3)), "padding id"),
        (np.array([1, 2]), np.array([[1.0, np.nan, 0.0], [0.0, 0.0, 1.0]]), "NaN/inf in rows"),
        (np.array([1.5, 2.5]), np.ones((2, 3)), "integers"),
        (np.array([1, 2]), np.ones(2), r"\(n_items, dim\)"),
    ],
)
def test_bad_items_are_named(ids: np.ndarray, embeddings: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_items(ids, embeddings)


def test_search_rejects_bad_k_and_nan_queries() -> None:
    data = clustered()
    index = FlatIndex().build(data.item_ids, data.item_embeddings)
    for k in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="k="):
            index.search(data.queries, k)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full((1, DIM), np.nan, np.float32), 3)


def test_l2_normalize_turns_mips_into_cosine() -> None:
    data = clustered()
    unit = l2_normalize(data.item_embeddings)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)
    assert not l2_normalize(np.zeros((1, 3))).any()  # zero rows stay zero, no NaN
    ids, _ = FlatIndex().build(data.item_ids, unit).search(l2_normalize(data.queries), 5)
    cosine = l2_normalize(data.queries) @ unit.T
    np.testing.assert_array_equal(ids[:, 0], data.item_ids[np.argmax(cosine, axis=1)])
    raw_top = FlatIndex().build(data.item_ids, data.item_embeddings).search(data.queries, 5)[0]
    assert (raw_top[:, 0] != ids[:, 0]).any()  # norms matter to MIPS, not to cosine


def test_registry_is_explicit_and_named_by_backend() -> None:
    assert {
        "flat": FlatIndex,
        "hnsw": HNSWIndex,
        "ivf": IVFIndex,
        "milvus": MilvusIndex,
    } == INDEX_BACKENDS
    for name, backend in INDEX_BACKENDS.items():
        assert backend.backend == name


def test_choose_index_by_catalog_size() -> None:
    assert type(choose_index(FLAT_MAX_ITEMS - 1, 64)) is FlatIndex
    hnsw = choose_index(FLAT_MAX_ITEMS, 64, hnsw=HNSWConfig(m=8))
    assert isinstance(hnsw, HNSWIndex)
    assert hnsw.config.m == 8
    big = choose_index(HNSW_MAX_ITEMS, 64)
    assert isinstance(big, IVFIndex)
    assert big.config.pq_m == 16
    assert big.config.refine_factor > 0
    assert type(choose_index(10, 64, flat_max_items=5, hnsw_max_items=20)) is HNSWIndex
    custom = choose_index(10, 48, flat_max_items=1, hnsw_max_items=1, ivf=IVFConfig(nprobe=4))
    assert isinstance(custom, IVFIndex)
    assert (custom.config.nprobe, custom.config.pq_m) == (4, 12)
    with pytest.raises(ValueError, match="n_items"):
        choose_index(0, 64)


def _factor_like(n_items: int, dim: int, *, tail: bool, seed: int = 0) -> np.ndarray:
    """Item vectors with ALS-like long-tailed norms (a few long, most near zero), or not."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n_items, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    if tail:
        vectors *= (rng.pareto(1.2, size=n_items) ** 2 + 1e-3)[:, None].astype(np.float32)
    return vectors


def test_index_for_queries_takes_exact_tiers_where_the_queries_stop_early() -> None:
    dim, n_items = 8, 4_000
    items = _factor_like(n_items, dim, tail=True)
    ids = np.arange(n_items, dtype=np.int64) * 7 + 3
    users = np.random.default_rng(1).normal(size=(300, dim)).astype(np.float32)
    tiers = FlatConfig(norm_tiers=True, first_tier=256)
    index = index_for_queries(
        ids, items, users, k=20, flat_max_items=500, max_scan=2_000, tiers=tiers
    )
    assert isinstance(index, FlatIndex)
    assert index.config.norm_tiers
    got, _ = index.search(users[:50], 20)
    exact = ids[np.argsort(-(users[:50] @ items.T), axis=1, kind="stable")[:, :20]]
    np.testing.assert_array_equal(got, exact)
    # The same items without the tail: every query scans everything, so the size decides.
    flat_norms = _factor_like(n_items, dim, tail=False)
    graph = index_for_queries(
        ids, flat_norms, users, k=20, flat_max_items=500, max_scan=2_000, tiers=tiers
    )
    assert isinstance(graph, HNSWIndex)
    assert graph.ntotal == n_items


def test_index_for_queries_keeps_small_catalogs_and_unknown_queries_by_size() -> None:
    items = _factor_like(300, 4, tail=True)
    ids = np.arange(300, dtype=np.int64)
    small = index_for_queries(ids, items, items[:10])
    assert type(small) is FlatIndex
    assert not small.config.norm_tiers
    assert small.ntotal == 300
    no_queries = index_for_queries(ids, items, np.empty((0, 4), np.float32), flat_max_items=100)
    assert isinstance(no_queries, HNSWIndex)
    with pytest.raises(ValueError, match="item_embeddings of shape"):
        index_for_queries(ids, items[:, 0], items[:10])
    with pytest.raises(ValueError, match="norm_tiers=True"):
        index_for_queries(ids, items, items[:10], tiers=FlatConfig())


def test_load_index_names_unknown_backends(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a saved vector index"):
        load_index(tmp_path)
    (tmp_path / META_FILE).write_text('{"backend": "annoy"}')
    with pytest.raises(ValueError, match="unknown backend 'annoy'"):
        load_index(tmp_path)
    data = clustered()
    FlatIndex().build(data.item_ids, data.item_embeddings).save(tmp_path / "flat")
    with pytest.raises(ValueError, match="backend 'flat'"):
        HNSWIndex.load(tmp_path / "flat")
