"""Faiss backends, in process: exact ``flat``, graph ``hnsw``, inverted-file ``ivf`` (flat or PQ).

All three use Faiss's native inner-product metric (``METRIC_INNER_PRODUCT``), so scores are
``query · item`` and nothing is normalised (see :mod:`mlsd.serving.index.base` for cosine).
IVF trains its coarse quantizer with spherical k-means, Faiss's default for inner product.

MIPS is harder than cosine when item norms are long-tailed, as in ALS item factors (a few
popular items 100x longer than the median): HNSW and IVF on inner product stall below ~0.96
recall@100 on such vectors however far they search (``bench/ann.py``). The classic reduction
to L2 search (append ``sqrt(max_norm² - |x|²)`` to each item, ``0`` to the query) was tried
and is worse there (recall@100 ~0.2-0.3: every item lands near one hyperplane far from the
queries), so it is not offered. ``FlatConfig(norm_tiers=True)`` uses the long tail instead:
exact search that stops once the unscanned items' norms prove they cannot enter the top k.

Faiss numbers items by insertion position; the id map (``item_ids_``, position → item id)
turns positions into the caller's ids. ``save`` writes three files into a directory, none of
them a pickle: ``index.faiss`` (``faiss.write_index``), ``item_ids.npy`` and ``index.json``.

Threads: Faiss's OpenMP thread count is process-wide, so every ``build`` and ``search`` sets it
from the config first. ``search_threads=1`` is the serving default: a request is one query, and
a server gets its parallelism from concurrent requests, not from splitting one query.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import faiss as _faiss
import numpy as np
import numpy.typing as npt

from mlsd.serving.index.base import PAD_ID, FloatArray, IntArray, VectorIndex, write_meta

# Faiss's bundled stubs are partial (no SearchParametersHNSW, no keyword constructors for search
# parameters, base-class return types), so this module uses it untyped.
faiss: Any = _faiss

INDEX_FILE = "index.faiss"
IDS_FILE = "item_ids.npy"
_BOUND_SLACK = 1e-5
"""Relative margin on the norm bound of tiered search, for float32 rounding of the scores."""


def _check_positive(owner: object, **values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"{type(owner).__name__}.{name}={value!r}: must be >= 1")


@dataclass(frozen=True)
class FlatConfig:
    """Exact search: each query is scored against every item, or against tiers of items.

    Attributes:
        norm_tiers: store the items by decreasing norm and search in two passes. Every query
            scores the ``max(first_tier, k)`` longest items; its k-th score there, ``s``, rules
            out by Cauchy-Schwarz every item with ``|q| · norm <= s``, so the second pass
            scores only the items before that point (rounded up to ``first_tier / 4``; queries
            with the same reach share one Faiss call). Still exact; fast when a few items have
            much larger norms than the rest, as popular items do in ALS / matrix factorisation
            embeddings. (On 1M ALS items of dimension 32, k = 241: 0.12 ms per query in
            batches, against 0.17 ms for tiers of 4x growth that re-check the bound after each.)
        first_tier: items every query scores in the first pass.
        max_scan: with ``norm_tiers``, scan at most the ``max_scan`` largest-norm items
            (``None``: all). Bounds the latency of the few queries without an early stop, at
            the price of exactness for them.
        build_threads: OpenMP threads while adding items (``None``: all cores).
        search_threads: OpenMP threads per ``search`` call.
    """

    norm_tiers: bool = False
    first_tier: int = 16_384
    max_scan: int | None = None
    build_threads: int | None = None
    search_threads: int = 1

    def __post_init__(self) -> None:
        _check_positive(
            self,
            first_tier=self.first_tier,
            max_scan=self.max_scan,
            build_threads=self.build_threads,
            search_threads=self.search_threads,
        )
        if self.max_scan is not None and not self.norm_tiers:
            raise ValueError("FlatConfig.max_scan needs norm_tiers=True")


@dataclass(frozen=True)
class HNSWConfig:
    """Hierarchical navigable small-world graph (``faiss.IndexHNSWFlat``, vectors kept in full).

    Attributes:
        m: neighbours per node (``2m`` on the bottom layer); memory grows by ``8m`` bytes/item.
        ef_construction: candidate list size while inserting; better graph, slower build.
        ef_search: candidate list size while searching (raised to ``k`` when smaller);
            the recall/latency knob, changeable after build with :meth:`HNSWIndex.set_search`.
        build_threads, search_threads: as in :class:`FlatConfig`.
    """

    m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    build_threads: int | None = None
    search_threads: int = 1

    def __post_init__(self) -> None:
        _check_positive(
            self,
            m=self.m,
            ef_construction=self.ef_construction,
            ef_search=self.ef_search,
            build_threads=self.build_threads,
            search_threads=self.search_threads,
        )


@dataclass(frozen=True)
class IVFConfig:
    """Inverted file: k-means cells, search visits the ``nprobe`` cells closest to the query.

    Attributes:
        nlist: cells; ``None`` picks ``4·√n``, capped so each cell gets >= 39 training points.
        nprobe: cells visited per query; the recall/latency knob (:meth:`IVFIndex.set_search`).
        pq_m: ``None`` stores full vectors (IVF-Flat); else product quantization with
            ``pq_m`` sub-vectors of ``nbits`` bits each (IVF-PQ), ``pq_m`` must divide dim.
        nbits: bits per PQ sub-vector code.
        refine_factor: ``0`` returns PQ's approximate scores; ``r > 0`` also keeps the full
            vectors and re-scores the best ``r·k`` PQ candidates exactly (``+ 4·dim`` bytes/item).
        build_threads, search_threads: as in :class:`FlatConfig`.
    """

    nlist: int | None = None
    nprobe: int = 32
    pq_m: int | None = None
    nbits: int = 8
    refine_factor: int = 0
    build_threads: int | None = None
    search_threads: int = 1

    def __post_init__(self) -> None:
        _check_positive(
            self,
            nlist=self.nlist,
            nprobe=self.nprobe,
            pq_m=self.pq_m,
            nbits=self.nbits,
            build_threads=self.build_threads,
            search_threads=self.search_threads,
        )
        if self.refine_factor < 0:
            raise ValueError(f"IVFConfig.refine_factor={self.refine_factor}: must be >= 0")
        if self.refine_factor and self.pq_m is None:
            raise ValueError("IVFConfig.refine_factor needs pq_m: IVF-Flat scores are exact")


def default_nlist(n_items: int) -> int:
    """``4·√n`` cells, at most ``n / 39`` so k-means has enough points per cell (>= 1)."""
    return max(1, min(round(4 * math.sqrt(n_items)), n_items // 39))


class FaissIndex(VectorIndex):
    """Shared Faiss plumbing: threads, the position → id map, save/load."""

    config_type: ClassVar[type[Any]]

    def __init__(self, config: Any = None) -> None:
        super().__init__()
        self.config = self.config_type() if config is None else config
        if not isinstance(self.config, self.config_type):
            raise TypeError(
                f"{type(self).__name__} takes a {self.config_type.__name__}, "
                f"got {type(config).__name__}"
            )
        self.index_: Any = None
        self.item_ids_: IntArray = np.empty(0, dtype=np.int64)

    @abstractmethod
    def _make(self, n_items: int, dim: int) -> Any:
        """A fresh, empty Faiss index for ``n_items`` vectors of ``dim``."""

    def _search_params(self, k: int) -> Any:
        """Faiss per-call search parameters for a top-``k`` search (``None``: the index's own)."""
        return None

    def _faiss_bytes(self) -> int:
        return int(self.index_.sa_code_size()) * self.ntotal

    def memory_bytes(self) -> int:
        """Estimated bytes: the Faiss structures plus the id map (8 bytes/item)."""
        if self.index_ is None:
            return 0
        return self._faiss_bytes() + self.item_ids_.nbytes

    def _build(self, item_ids: IntArray, item_embeddings: FloatArray) -> None:
        faiss.omp_set_num_threads(self.config.build_threads or os.cpu_count() or 1)
        index = self._make(*item_embeddings.shape)
        if not index.is_trained:
            index.train(item_embeddings)
        index.add(item_embeddings)
        self.index_ = index
        self.item_ids_ = item_ids.copy()

    def _search(self, queries: FloatArray, k: int) -> tuple[IntArray, FloatArray]:
        faiss.omp_set_num_threads(self.config.search_threads)
        scores, positions = self.index_.search(queries, k, params=self._search_params(k))
        ids = np.where(positions >= 0, self.item_ids_[positions], PAD_ID).astype(np.int64)
        return ids, scores.astype(np.float32, copy=False)

    def save(self, path: Path) -> None:
        """Write ``index.faiss``, ``item_ids.npy`` and ``index.json`` into directory ``path``."""
        if self.index_ is None:
            raise ValueError(f"{type(self).__name__} is empty: build it before save")
        path = Path(path)
        write_meta(path, self._meta(dataclasses.asdict(self.config)))
        faiss.write_index(self.index_, str(path / INDEX_FILE))
        np.save(path / IDS_FILE, self.item_ids_, allow_pickle=False)

    @classmethod
    def load(cls, path: Path) -> Self:
        """Read a directory written by :meth:`save`; checks the files agree with each other."""
        path = Path(path)
        meta = cls._read_meta(path)
        loaded = cls(cls.config_type(**meta["config"]))
        loaded.index_ = faiss.read_index(str(path / INDEX_FILE))
        loaded.item_ids_ = np.load(path / IDS_FILE, allow_pickle=False).astype(np.int64)
        sizes = {meta["ntotal"], loaded.index_.ntotal, len(loaded.item_ids_)}
        if len(sizes) != 1 or loaded.index_.d != meta["dim"]:
            raise ValueError(
                f"{path}: index.json says {meta['ntotal']} items of dim {meta['dim']}, "
                f"{INDEX_FILE} holds {loaded.index_.ntotal} of dim {loaded.index_.d}, "
                f"{IDS_FILE} {len(loaded.item_ids_)} ids; the directory is inconsistent"
            )
        loaded._dim = int(meta["dim"])
        loaded._ntotal = int(meta["ntotal"])
        loaded._after_load()
        return loaded

    def _after_load(self) -> None:
        """Restore derived state after :meth:`load` (nothing by default)."""


class FlatIndex(FaissIndex):
    """Exact MIPS (``faiss.IndexFlatIP``): the reference every approximate index is held to.

    With ``FlatConfig(norm_tiers=True)`` the items are stored by decreasing norm, and
    ``last_scanned_`` (``(n_q,)`` int64) tells how many items each query of the last search
    scored to prove its top k (or ``max_scan`` was reached).
    """

    backend = "flat"
    config_type = FlatConfig
    config: FlatConfig

    def __init__(self, config: FlatConfig | None = None) -> None:
        super().__init__(config)
        self.neg_norms_: npt.NDArray[np.float64] = np.empty(0)
        self.last_scanned_: IntArray = np.empty(0, dtype=np.int64)
        self._mine = threading.local()  # this thread's search: the service searches from two

    @property
    def exact(self) -> bool:
        """True unless ``max_scan`` cuts the tiered scan short."""
        return not (self.config.norm_tiers and self.config.max_scan is not None)

    def _make(self, n_items: int, dim: int) -> Any:
        return faiss.IndexFlatIP(dim)

    def _build(self, item_ids: IntArray, item_embeddings: FloatArray) -> None:
        if self.config.norm_tiers:
            order = np.argsort(-np.linalg.norm(item_embeddings, axis=1), kind="stable")
            item_ids, item_embeddings = item_ids[order], item_embeddings[order]
        super()._build(item_ids, item_embeddings)
        self._set_norms()

    def _after_load(self) -> None:
        self._set_norms()

    def _vectors(self) -> FloatArray:
        """The stored ``(ntotal, dim)`` vectors, a view into Faiss's memory (no copy)."""
        n, dim = self.index_.ntotal, self.index_.d
        vectors: FloatArray = faiss.rev_swig_ptr(self.index_.get_xb(), n * dim).reshape(n, dim)
        return vectors

    def _set_norms(self) -> None:
        if not self.config.norm_tiers:
            return
        norms = np.linalg.norm(self._vectors(), axis=1).astype(np.float64)
        if (np.diff(norms) > 1e-6 * norms[0]).any():
            raise ValueError("FlatIndex(norm_tiers=True): stored vectors are not sorted by norm")
        self.neg_norms_ = -norms

    def _searched(self, rows: IntArray, n_queries: int, *, first: bool) -> None:
        """``last_scanned_`` over every query of the search, when a tie searched some again
        (wider: each query's figure is its widest search's). Merged in this thread's own
        arrays: another thread's search may set ``last_scanned_`` meanwhile."""
        if not self.config.norm_tiers:
            return
        scanned: IntArray = self._mine.scanned
        if first:
            self._mine.merged = scanned.copy()
        else:
            self._mine.merged[rows] = scanned
        self.last_scanned_ = self._mine.merged

    def _scan(
        self, queries: FloatArray, start: int, end: int, k: int
    ) -> tuple[FloatArray, IntArray]:
        """Top ``k`` of the stored items ``[start, end)``: scores and positions (``-1``: none)."""
        scores, pos = faiss.knn(
            queries, self._vectors()[start:end], min(k, end - start), faiss.METRIC_INNER_PRODUCT
        )
        return scores, np.where(pos >= 0, pos + start, -1)

    def _search(self, queries: FloatArray, k: int) -> tuple[IntArray, FloatArray]:
        """Two passes (see :class:`FlatConfig`): the first tier for every query, then for each
        query the items its first-tier k-th score cannot rule out, in groups of equal reach."""
        if not self.config.norm_tiers:
            return super()._search(queries, k)
        faiss.omp_set_num_threads(self.config.search_threads)
        stop = min(self.ntotal, self.config.max_scan or self.ntotal)
        first = min(max(self.config.first_tier, k), stop)  # at least k: a k-th score to bound
        scores, pos = self._scan(queries, 0, first, k)
        if scores.shape[1] < k:  # fewer than k items in all: pad
            pad = k - scores.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            pos = np.pad(pos, ((0, 0), (0, pad)), constant_values=-1)
        reach = np.minimum(self._reach(queries, scores[:, k - 1]), stop)
        step = max(1, self.config.first_tier // 4)
        reach = np.where(reach > first, np.minimum(stop, -(-reach // step) * step), first)
        for end in np.unique(reach[reach > first]).tolist():
            rows = np.nonzero(reach == end)[0]
            more_scores, more_pos = self._scan(queries[rows], first, end, k)
            both = np.concatenate([scores[rows], more_scores], axis=1)
            top = np.argsort(-both, axis=1, kind="stable")[:, :k]
            scores[rows] = np.take_along_axis(both, top, axis=1)
            pos[rows] = np.take_along_axis(
                np.concatenate([pos[rows], more_pos], axis=1), top, axis=1
            )
        self.last_scanned_ = self._mine.scanned = reach.astype(np.int64)
        ids = np.where(pos >= 0, self.item_ids_[pos], PAD_ID).astype(np.int64)
        return ids, scores

    def _reach(self, queries: FloatArray, kth: FloatArray) -> IntArray:
        """Per query, how many of the largest-norm items could score above ``kth``: those with
        ``|q| · norm > kth`` (Cauchy-Schwarz), with a relative slack of :data:`_BOUND_SLACK`
        for float32 rounding. A query of norm 0 scores 0 everywhere."""
        q_norms = np.linalg.norm(queries, axis=1).astype(np.float64)
        kth = kth.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            floor = np.where(q_norms > 0, kth / q_norms, np.where(kth >= 0, np.inf, -np.inf))
            floor = np.where(np.isfinite(floor), floor - np.abs(floor) * _BOUND_SLACK, floor)
        reach: IntArray = np.searchsorted(self.neg_norms_, -floor, side="left").astype(np.int64)
        return reach


class HNSWIndex(FaissIndex):
    """Approximate MIPS on an HNSW graph (``faiss.IndexHNSWFlat`` with inner product)."""

    backend = "hnsw"
    config_type = HNSWConfig
    config: HNSWConfig

    def _make(self, n_items: int, dim: int) -> Any:
        index = faiss.IndexHNSWFlat(dim, self.config.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.config.ef_construction
        return index

    def _search_params(self, k: int) -> Any:
        # A candidate list shorter than k cannot return k items.
        return faiss.SearchParametersHNSW(efSearch=max(self.config.ef_search, k))

    def set_search(self, *, ef_search: int) -> Self:
        """Change the search-time candidate list size (no rebuild); returns ``self``."""
        self.config = dataclasses.replace(self.config, ef_search=ef_search)
        return self

    def _faiss_bytes(self) -> int:
        hnsw = self.index_.hnsw
        graph = 4 * hnsw.neighbors.size() + 8 * hnsw.offsets.size() + 4 * hnsw.levels.size()
        return int(graph) + int(self.index_.storage.sa_code_size()) * self.ntotal


class IVFIndex(FaissIndex):
    """Approximate MIPS with an inverted file: IVF-Flat, or IVF-PQ (optionally re-ranked)."""

    backend = "ivf"
    config_type = IVFConfig
    config: IVFConfig

    def _make(self, n_items: int, dim: int) -> Any:
        config = self.config
        nlist = config.nlist or default_nlist(n_items)
        if nlist > n_items:
            raise ValueError(f"IVFConfig.nlist={nlist} exceeds the {n_items} items to index")
        quantizer = faiss.IndexFlatIP(dim)
        if config.pq_m is None:
            return faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        if dim % config.pq_m:
            raise ValueError(
                f"IVFConfig.pq_m={config.pq_m} must divide the embedding dimension {dim}"
            )
        if n_items < 2**config.nbits:  # each sub-quantizer's k-means needs a point per code
            raise ValueError(
                f"IVFConfig with pq_m={config.pq_m} needs at least 2**nbits = {2**config.nbits} "
                f"items to train its codes, got {n_items}: lower nbits, or use a Flat or HNSW "
                "index for a catalog this small"
            )
        ivf = faiss.IndexIVFPQ(
            quantizer, dim, nlist, config.pq_m, config.nbits, faiss.METRIC_INNER_PRODUCT
        )
        return faiss.IndexRefineFlat(ivf) if config.refine_factor else ivf

    def _ivf(self) -> Any:
        return faiss.extract_index_ivf(self.index_)

    def _search_params(self, k: int) -> Any:
        ivf_params = faiss.SearchParametersIVF(nprobe=self.config.nprobe)
        if not self.config.refine_factor:
            return ivf_params
        return faiss.IndexRefineSearchParameters(
            k_factor=float(self.config.refine_factor), base_index_params=ivf_params
        )

    def set_search(self, *, nprobe: int | None = None, refine_factor: int | None = None) -> Self:
        """Change cells visited and/or the re-rank factor (no rebuild); returns ``self``.

        ``refine_factor`` can move between positive values only: turning re-ranking on or off
        changes what the index stores, which needs a rebuild.
        """
        changes: dict[str, int] = {}
        if nprobe is not None:
            changes["nprobe"] = nprobe
        if refine_factor is not None:
            if (refine_factor > 0) != (self.config.refine_factor > 0):
                raise ValueError(
                    f"refine_factor {self.config.refine_factor} -> {refine_factor}: re-ranking "
                    "can only be switched on or off by rebuilding with a new IVFConfig"
                )
            changes["refine_factor"] = refine_factor
        self.config = dataclasses.replace(self.config, **changes)
        return self

    @property
    def nlist(self) -> int:
        """Number of cells of the built index (``0`` before build)."""
        return 0 if self.index_ is None else int(self._ivf().nlist)

    def _faiss_bytes(self) -> int:
        ivf = self._ivf()
        total = self.ntotal * (int(ivf.code_size) + 8)  # codes + Faiss's per-entry id
        total += int(ivf.nlist) * int(ivf.d) * 4  # coarse centroids
        if self.config.pq_m is not None:
            total += int(faiss.downcast_index(ivf).pq.centroids.size()) * 4
        if self.config.refine_factor:
            total += self.ntotal * int(ivf.d) * 4  # the full vectors kept for re-ranking
        return total
