"""Export a fitted retriever as a serving candidate source (:mod:`mlsd.serving.sources`).

Training side: reads the fitted state of a retriever and writes the artifact directory that
``mlsd.serving.sources.load_source`` reads (layout in that module's docstring). No pickle:
JSON, ``.npz``, a vector index directory, a torch state dict::

    export_source(ALSRetriever().fit(train), Path("artifacts/als"))
    source = load_source(Path("artifacts/als"))
    items, scores = source.candidates(query, 200, exclude=seen)

Embedding-based sources (ALS, BPR, two-tower) put their item vectors in the index
``choose_index`` picks for the catalog size (``index="auto"``), or the backend named. For
ALS and BPR, whose user vectors are known, "auto" is ``index_for_queries``: exact norm-tiered
search when a sample of the users proves it cheap (long-tailed item norms), else by size.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from mlsd.models.retrieval.base import Retriever
from mlsd.models.retrieval.covisitation import CovisitationRetriever
from mlsd.models.retrieval.ease import EASERetriever
from mlsd.models.retrieval.implicit_mf import ALSRetriever, BPRRetriever
from mlsd.models.retrieval.popularity import PopularityRetriever
from mlsd.models.retrieval.segment_popularity import SegmentPopularityRetriever
from mlsd.models.retrieval.topk import check_fitted
from mlsd.models.retrieval.two_tower_train import TwoTowerRetriever
from mlsd.serving.index import INDEX_BACKENDS, VectorIndex, choose_index, index_for_queries
from mlsd.serving.index.milvus_index import MilvusConfig, MilvusIndex
from mlsd.serving.sources import (
    COVISITATION_FILE,
    EASE_FILE,
    FACTORS_FILE,
    FALLBACK_FILE,
    FORMAT_VERSION,
    INDEX_DIR,
    POPULAR_FILE,
    SEGMENT_FILE,
    SEGMENT_TOP_N,
    SOURCE_FILE,
    TWO_TOWER_FILE,
    USER_TOWER_FILE,
    RankedItems,
    TowerSpec,
)

MILVUS_DATABASE = "milvus_items.db"
"""File name of an export's milvus-lite database, in the artifact's index directory."""


def make_index(index: str, n_items: int, dim: int, *, directory: Path | None = None) -> VectorIndex:
    """``"auto"``: :func:`choose_index` for the catalog; else a backend of ``INDEX_BACKENDS``.

    ``"milvus"``: a milvus-lite collection of its own (another export would replace a shared
    one), in the database :data:`MILVUS_DATABASE` inside ``directory``, the index directory
    the export saves to, so the artifact carries its vectors and loads from any working
    directory (``None``: ``MilvusConfig``'s default, relative to the working directory)."""
    if index == "auto":
        return choose_index(n_items, dim)
    if index not in INDEX_BACKENDS:
        raise ValueError(
            f"export_source: index={index!r}; expected 'auto' or one of {sorted(INDEX_BACKENDS)}"
        )
    if index == "milvus":
        collection = f"item_embeddings_{uuid.uuid4().hex}"
        if directory is None:
            return MilvusIndex(MilvusConfig(collection=collection))
        uri = str(Path(directory).absolute() / MILVUS_DATABASE)
        return MilvusIndex(MilvusConfig(uri=uri, collection=collection))
    return INDEX_BACKENDS[index]()


def _write_json(path: Path, kind: str, name: str, **fields: Any) -> None:
    body = {"format_version": FORMAT_VERSION, "kind": kind, "name": name, **fields}
    (path / SOURCE_FILE).write_text(json.dumps(body, indent=2) + "\n")


def _write_npz(file: Path, **arrays: npt.NDArray[Any]) -> None:
    np.savez(file, allow_pickle=False, **arrays)


def _write_fallback(path: Path, retriever: Any, file: str = FALLBACK_FILE) -> None:
    """The cold-user popularity over the retriever's catalog, best first."""
    popularity = retriever if isinstance(retriever, PopularityRetriever) else retriever.fallback_
    item_ids = retriever.interactions_.item_ids
    ranked = RankedItems.from_scores(item_ids, popularity.popularity_)
    _write_npz(path / file, item_ids=ranked.item_ids, scores=ranked.scores)


def _popular(retriever: PopularityRetriever, path: Path, index: str) -> None:
    _write_json(path, "popular", retriever.name)
    _write_fallback(path, retriever, POPULAR_FILE)


def _covisitation(retriever: CovisitationRetriever, path: Path, index: str) -> None:
    _write_json(path, "covisitation", retriever.name, last_n=retriever.last_n,
                recency_decay=retriever.recency_decay)  # fmt: skip
    m = retriever.covisitation_  # stored as is: serving sums each row in this order
    _write_npz(path / COVISITATION_FILE, item_ids=retriever.interactions_.item_ids,
               indptr=m.indptr, indices=m.indices, data=m.data)  # fmt: skip
    _write_fallback(path, retriever)


def _factors(retriever: ALSRetriever | BPRRetriever, path: Path, index: str) -> None:
    item_ids = retriever.interactions_.item_ids
    item_factors = retriever.item_factors_
    fold: dict[str, Any] = {"fold_in": isinstance(retriever, ALSRetriever)}
    if isinstance(retriever, ALSRetriever):
        fold |= {"regularization": retriever.regularization, "alpha": retriever.alpha,
                 "half_life_days": retriever.half_life_days}  # fmt: skip
    _write_json(path, "factors", retriever.name, **fold)
    # A user the model learned nothing from (every event decayed away) is left out: serving
    # answers them as offline does, by fold-in of what remains of the history or the fallback.
    scored = retriever.scored_users_
    _write_npz(path / FACTORS_FILE, user_ids=retriever.interactions_.user_ids[scored],
               user_factors=retriever.user_factors_[scored], item_ids=item_ids,
               item_factors=item_factors)  # fmt: skip
    if index == "auto":  # the user vectors are known: the index is chosen by searching them
        vectors = index_for_queries(item_ids, item_factors, retriever.user_factors_[scored])
    else:
        vectors = make_index(
            index, len(item_ids), item_factors.shape[1], directory=path / INDEX_DIR
        )
        vectors.build(item_ids, item_factors)
    vectors.save(path / INDEX_DIR)
    _write_fallback(path, retriever)


def _ease(retriever: EASERetriever, path: Path, index: str) -> None:
    _write_json(path, "ease", retriever.name, half_life_days=retriever.half_life_days)
    _write_npz(path / EASE_FILE, item_ids=retriever.interactions_.item_ids,
               active_items=retriever.active_items_, weights=retriever.weights_)  # fmt: skip
    _write_fallback(path, retriever)


def _two_tower(retriever: TwoTowerRetriever, path: Path, index: str) -> None:
    encoding = retriever.encoding_
    spec = TowerSpec(retriever.config, encoding.sizes(), encoding.attribute_names,
                     encoding.attribute_levels)  # fmt: skip
    _write_json(path, "two_tower", retriever.name, **spec.to_dict())
    _write_npz(path / TWO_TOWER_FILE, item_ids=retriever.item_ids_)
    torch.save(retriever.model_.user_tower.state_dict(), path / USER_TOWER_FILE)
    embeddings = retriever.item_embeddings_
    vectors = make_index(index, len(embeddings), embeddings.shape[1], directory=path / INDEX_DIR)
    vectors.build(retriever.item_ids_, embeddings).save(path / INDEX_DIR)
    _write_fallback(path, retriever)


def _segment_popularity(retriever: SegmentPopularityRetriever, path: Path, index: str) -> None:
    """Each attribute profile's list (its top ``SEGMENT_TOP_N``), the global one, and the
    per-column tables that score any other combination of attributes: ``tables`` stacks
    ``segment_tables_`` (``(Σ (n_levels + 1), n_items)`` float32, 4 bytes an entry: 180 MB
    for ML-100K's 45 rows at 1M items), ``table_starts`` is each column's first row."""
    _write_json(path, "segment_popularity", retriever.name,
                columns=list(retriever.segment_columns_),
                levels=[list(v) for v in retriever.level_values_])  # fmt: skip
    item_ids = retriever.interactions_.item_ids
    n = min(SEGMENT_TOP_N, len(item_ids))
    top_ids = np.empty((len(retriever.profile_scores_), n), dtype=np.int64)
    top_scores = np.empty((len(retriever.profile_scores_), n), dtype=np.float32)
    for p, row in enumerate(retriever.profile_scores_):
        ranked = RankedItems.from_scores(item_ids, row)
        top_ids[p], top_scores[p] = ranked.item_ids[:n], ranked.scores[:n]
    tables = retriever.segment_tables_
    sizes = [len(table) for table in tables]
    stacked = np.concatenate(tables) if tables else np.zeros((0, len(item_ids)), np.float32)
    _write_npz(path / SEGMENT_FILE, profile_levels=retriever.profile_levels_,
               top_ids=top_ids, top_scores=top_scores, item_ids=item_ids,
               tables=stacked.astype(np.float32, copy=False),
               table_starts=np.r_[0, np.cumsum(sizes)].astype(np.int64))  # fmt: skip
    ranked = RankedItems.from_scores(item_ids, retriever.popularity_)
    _write_npz(path / FALLBACK_FILE, item_ids=ranked.item_ids, scores=ranked.scores)


Exporter = Callable[[Any, Path, str], None]

EXPORTERS: Mapping[type[Retriever], tuple[str, Exporter]] = {
    PopularityRetriever: ("popularity_", _popular),
    CovisitationRetriever: ("covisitation_", _covisitation),
    ALSRetriever: ("item_factors_", _factors),
    BPRRetriever: ("item_factors_", _factors),
    EASERetriever: ("weights_", _ease),
    TwoTowerRetriever: ("item_embeddings_", _two_tower),
    SegmentPopularityRetriever: ("profile_scores_", _segment_popularity),
}
"""Retriever class (exactly; a subclass may score otherwise) → (fitted attribute, writer)."""


def export_source(retriever: Retriever, path: Path, *, index: str = "auto") -> Path:
    """Write the serving artifact of a fitted retriever into the directory ``path``.

    Args:
        retriever: a fitted retriever of a kind in :data:`EXPORTERS`.
        path: the directory (created; files of an earlier export are overwritten).
        index: vector index backend for ALS / BPR / two-tower item vectors: ``"auto"``
            (:func:`mlsd.serving.index.choose_index`) or a key of ``INDEX_BACKENDS``.

    Returns:
        ``path``; ``mlsd.serving.sources.load_source(path)`` reads it.
    """
    entry = EXPORTERS.get(type(retriever))
    if entry is None:
        known = sorted(kind.__name__ for kind in EXPORTERS)
        raise ValueError(
            f"export_source: no serving form for {type(retriever).__name__}; known: {known}"
        )
    attribute, write = entry
    check_fitted(retriever, attribute)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write(retriever, path, index)
    return path
