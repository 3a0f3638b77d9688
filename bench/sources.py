"""Serving candidate sources: latency of one request (``candidates(query, k)``), one thread.

Prints one JSON document (progress goes to stderr). The sources are built in memory from
synthetic arrays of the production shape, not from fitted models (fitting at 1M items is
``bench/ann.py``'s job): a 1M-item catalog by default, item vectors 64-dim unit vectors around
random cluster centres in the index :func:`mlsd.serving.index.choose_index` picks (HNSW at 1M,
cached under ``--cache``: its build takes minutes), shared by the ALS and two-tower sources;
a co-visitation CSR with ``--neighbours`` entries per item; EASE on a small catalog
(``--ease-items``: its dense item × item matrix is n² × 4 bytes).
Each query has ``--history`` recent items (also its ``exclude``) and asks for ``--k``. Latency
is wall clock and the thread's CPU time (which other processes on the machine cannot inflate).

    .venv/bin/python bench/sources.py --out sources.json         # 1M items: ~5 min, ~3 GB
    .venv/bin/python bench/sources.py --items 100000 --queries 200
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from mlsd.models.retrieval.two_tower import FeatureSizes, TwoTowerConfig, UserTower
from mlsd.serving.index import VectorIndex, choose_index, l2_normalize, load_index
from mlsd.serving.sources import (
    CandidateSource,
    CovisitationSource,
    EASESource,
    FactorSource,
    FoldIn,
    PopularSource,
    RankedItems,
    TowerSpec,
    TwoTowerSource,
    UserQuery,
)

TARGET_MS = 2.0
ATTRIBUTES = {"age_bucket": 7, "gender": 2, "occupation": 20, "region": 5}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def item_vectors(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """``(n, dim)`` unit vectors around 1,000 random centres (ANN-friendly, not uniform noise)."""
    centres = rng.standard_normal((1000, dim), dtype=np.float32)
    vectors = centres[rng.integers(0, 1000, n)] + rng.standard_normal((n, dim), dtype=np.float32)
    return l2_normalize(vectors)


def covisitation(n: int, neighbours: int, rng: np.random.Generator) -> sp.csr_matrix:
    indices = np.sort(rng.integers(0, n, (n, neighbours), dtype=np.int32), axis=1).ravel()
    data = rng.random(n * neighbours, dtype=np.float32) / neighbours
    indptr = np.arange(0, n * neighbours + 1, neighbours, dtype=np.int64)
    return sp.csr_matrix((data, indices, indptr), shape=(n, n))


def two_tower(index: Any, item_ids: np.ndarray, fallback: RankedItems, dim: int) -> TwoTowerSource:
    config = TwoTowerConfig(dim=dim, history_len=50)
    sizes = FeatureSizes(len(item_ids), 20, tuple(ATTRIBUTES.values()))
    levels = tuple(tuple(f"v{i}" for i in range(n)) for n in ATTRIBUTES.values())
    spec = TowerSpec(config, sizes, tuple(ATTRIBUTES), levels)
    return TwoTowerSource(UserTower(config, sizes), spec, index, item_ids, fallback)


def vector_index(
    args: argparse.Namespace, item_ids: np.ndarray, vectors: np.ndarray
) -> tuple[VectorIndex, float | None]:
    """The index ``choose_index`` picks, loaded from ``--cache`` when built there before."""
    index = choose_index(len(vectors), vectors.shape[1])
    cache = args.cache / f"{index.backend}-{args.items}x{args.dim}-seed{args.seed}"
    if (cache / "index.json").is_file():
        log(f"index from the cache {cache}")
        return load_index(cache), None
    log(f"building {index.backend} over {len(vectors):,} × {vectors.shape[1]}")
    start = time.perf_counter()
    index.build(item_ids, vectors)
    build_s = time.perf_counter() - start
    index.save(cache)
    return index, round(build_s, 1)


def build_sources(args: argparse.Namespace, rng: np.random.Generator) -> dict[str, Any]:
    n, dim = args.items, args.dim
    item_ids = np.arange(1, n + 1, dtype=np.int64)
    fallback = RankedItems.from_scores(item_ids, rng.pareto(1.2, n).astype(np.float32))
    vectors = item_vectors(n, dim, rng)
    index, build_s = vector_index(args, item_ids, vectors)
    user_ids = np.arange(args.users, dtype=np.int64)
    user_factors = vectors[rng.integers(0, n, args.users)] * 3.0
    y = vectors.astype(np.float64)
    fold_in = FoldIn(item_ids, vectors, y.T @ y, 0.05, 2.0, None)
    ease_ids = np.arange(1, args.ease_items + 1, dtype=np.int64)
    ease_weights = rng.standard_normal((args.ease_items, args.ease_items), dtype=np.float32)
    sources: dict[str, Any] = {
        "popular": PopularSource(fallback),
        "covisitation": CovisitationSource(
            item_ids, covisitation(n, args.neighbours, rng), fallback, last_n=20,
            recency_decay=0.9,
        ),
        "als_known_user": FactorSource(index, user_ids, user_factors, fallback, fold_in=fold_in),
        "als_fold_in": FactorSource(index, user_ids, user_factors, fallback, fold_in=fold_in),
        "two_tower": two_tower(index, item_ids, fallback, dim),
        "ease": EASESource(
            ease_ids, np.arange(args.ease_items), ease_weights,
            RankedItems.from_scores(ease_ids, rng.random(args.ease_items, dtype=np.float32)),
        ),
    }  # fmt: skip
    return {"sources": sources, "index": index.backend, "index_build_s": build_s}


def make_queries(
    name: str, args: argparse.Namespace, catalog: int, rng: np.random.Generator
) -> list[UserQuery]:
    now_s = 1_700_000_000
    queries = []
    for i in range(args.queries + args.warmup):
        history = rng.integers(1, catalog + 1, args.history)
        times = np.sort(rng.integers(now_s - 30 * 86_400, now_s, args.history))
        user_id = int(rng.integers(0, args.users)) if name == "als_known_user" else None
        attributes = {a: f"v{rng.integers(0, n)}" for a, n in ATTRIBUTES.items()}
        queries.append(UserQuery(user_id, history, times, attributes, now_s + i))
    return queries


def time_source(
    source: CandidateSource, queries: list[UserQuery], k: int, warmup: int
) -> dict[str, float]:
    wall, cpu = [], []
    for i, query in enumerate(queries):
        exclude = np.unique(query.history)
        start, start_cpu = time.perf_counter(), time.thread_time()
        items, _ = source.candidates(query, k, exclude=exclude)
        if i >= warmup:
            wall.append((time.perf_counter() - start) * 1000)
            cpu.append((time.thread_time() - start_cpu) * 1000)
        if len(items) != k or np.isin(items, exclude).any():
            raise RuntimeError(f"{type(source).__name__}: {len(items)} items or an excluded one")
    stats = {}
    for clock, values in (("wall", wall), ("cpu", cpu)):
        for q in (50, 99):
            stats[f"{clock}_p{q}_ms"] = round(float(np.percentile(values, q)), 3)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--neighbours", type=int, default=30)
    parser.add_argument("--ease-items", type=int, default=5_000)
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "mlsd-sources")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    built = build_sources(args, rng)
    latency: dict[str, dict[str, float]] = {}
    for name, source in built.pop("sources").items():
        catalog = args.ease_items if name == "ease" else args.items
        queries = make_queries(name, args, catalog, rng)
        latency[name] = time_source(source, queries, args.k, args.warmup)
        log(f"{name}: {latency[name]}")
    report = {
        "config": {name: str(v) if isinstance(v, Path) else v for name, v in vars(args).items()},
        **built,
        "target_p99_ms": TARGET_MS,
        "latency": latency,
    }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
