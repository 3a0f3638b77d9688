"""The plan's memory of each candidate source is what serving holds: every kind is fit on a small
simulated world, exported and loaded as a replica loads it, and the bytes of every array the
loaded source keeps (numpy, scipy's sparse parts, torch's tensors; Faiss's own structures apart,
which the index tests check) are the plan's, to the byte but for fixed model parts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mlsd.config import load_feed_config
from mlsd.data.sources.synthetic import WorldConfig
from mlsd.models.retrieval.base import RetrievalData, Retriever
from mlsd.models.retrieval.covisitation import CovisitationRetriever
from mlsd.models.retrieval.ease import EASERetriever
from mlsd.models.retrieval.export import export_source
from mlsd.models.retrieval.popularity import PopularityRetriever
from mlsd.models.retrieval.segment_popularity import SegmentPopularityRetriever
from mlsd.plan.capacity import (
    SEGMENT_LIST_ITEMS,
    PopularityList,
    SegmentLists,
    SourceMemory,
    VectorSource,
    covisitation_bytes,
    ease_bytes,
)
from mlsd.plan.commands import memory_sources
from mlsd.plan.requirements import Requirements
from mlsd.serving import sources
from mlsd.serving.sources import CandidateSource, load_source
from tests.feed_world import retrieval_world


def held_bytes(root: object) -> int:
    """Bytes of the arrays reachable from ``root``'s attributes, each buffer counted once."""
    seen: set[int] = set()
    buffers: dict[int, int] = {}

    def visit(obj: Any) -> None:
        if id(obj) in seen or isinstance(obj, str | bytes | int | float | bool | type(None)):
            return
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            while isinstance(obj.base, np.ndarray):  # a view: count what it views
                obj = obj.base
            buffers[id(obj)] = obj.nbytes
        elif isinstance(obj, torch.Tensor):
            buffers[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        elif isinstance(obj, torch.nn.Module):
            for tensor in [*obj.parameters(), *obj.buffers()]:
                visit(tensor)
        elif isinstance(obj, dict):
            for value in obj.values():
                visit(value)
        elif isinstance(obj, list | tuple | set):
            for value in obj:
                visit(value)
        elif hasattr(obj, "__dict__") and not callable(obj):
            for value in vars(obj).values():
                visit(value)

    visit(root)
    return sum(buffers.values())


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> RetrievalData:
    config = WorldConfig(n_users=300, n_items=150, n_events=20_000, days=20, seed=3)
    return retrieval_world(tmp_path_factory.mktemp("memory-world"), config)


def loaded(retriever: Retriever, data: RetrievalData, path: Path) -> CandidateSource:
    return load_source(export_source(retriever.fit(data), path / "source", index="flat"))


def planned(source: SourceMemory, items: int, users: int = 1) -> int:
    """The plan's bytes of ``source`` at ``items`` and ``users``, Faiss's vectors apart."""
    req = Requirements(catalog_items=items, users=users, index="flat")
    parts, _ = source.sized("s", req)
    faiss = items * 4 * source.stored_dim if isinstance(source, VectorSource) else 0
    return round(sum(part.bytes for part in parts)) - faiss


def test_popularity(data: RetrievalData, tmp_path: Path) -> None:
    source = loaded(PopularityRetriever(), data, tmp_path)
    assert held_bytes(source) == planned(PopularityList(), len(data.items))


def test_covisitation_at_the_entries_it_keeps(data: RetrievalData, tmp_path: Path) -> None:
    source = loaded(CovisitationRetriever(max_neighbours=20), data, tmp_path)
    assert isinstance(source, sources.CovisitationSource)
    entries = source.covisitation.nnz
    assert 0 < entries <= len(data.items) * 20  # the plan's bound: max_neighbours an item
    assert held_bytes(source) == covisitation_bytes(len(data.items), entries)


def test_ease_at_its_active_items(data: RetrievalData, tmp_path: Path) -> None:
    source = loaded(EASERetriever(l2=50.0), data, tmp_path)
    assert isinstance(source, sources.EASESource)
    active = len(source.active_items)
    assert held_bytes(source) == ease_bytes(len(data.items), active)


VECTOR_SECTIONS = {
    "als": "factors = 16\niterations = 3\nnum_threads = 1",
    "bpr": "factors = 16\niterations = 5\nnum_threads = 1",
    "two_tower": "dim = 16\nhistory_len = 20\nmax_epochs = 1\nval_frac = 0.0",
}


def fixed_bytes(source: CandidateSource) -> int:
    """What a vector source keeps whatever the catalog and the users: ALS's fold-in ``YᵀY``
    (dim x dim float64), the user tower's layers but its history embeddings."""
    if isinstance(source, sources.FactorSource):
        return 0 if source.fold_in is None else source.fold_in.gram.nbytes
    assert isinstance(source, sources.TwoTowerSource)
    tower = source.user_tower.named_parameters()
    return sum(4 * p.numel() for name, p in tower if not name.startswith("history_items"))


@pytest.mark.parametrize("name", sorted(VECTOR_SECTIONS))
def test_vector_sources_beside_faiss_as_the_config_plans_them(
    data: RetrievalData, tmp_path: Path, name: str
) -> None:
    config = tmp_path / "feed.toml"
    config.write_text(
        f'[retrieval]\nsources = ["{name}"]\n[retrieval.{name}]\n{VECTOR_SECTIONS[name]}\n'
    )
    feed = load_feed_config(config)
    model = memory_sources(feed)[name]
    assert isinstance(model, VectorSource)
    source = loaded(feed.retrieval.factories()[name](), data, tmp_path)
    users = len(getattr(source, "user_ids", ()))  # the users it keeps a vector for
    assert (users > 0) == model.user_vectors
    assert held_bytes(source) == planned(model, len(data.items), max(users, 1)) + fixed_bytes(
        source
    )


def test_segment_popularity_is_its_lists_plus_what_the_plan_leaves_to_a_warning(
    data: RetrievalData, tmp_path: Path
) -> None:
    source = loaded(SegmentPopularityRetriever(half_life_days=(30.0,)), data, tmp_path)
    assert isinstance(source, sources.SegmentPopularSource)
    assert source.scoring is not None
    items, tables = source.scoring
    rows = sum(len(table) for table in tables)
    top = min(SEGMENT_LIST_ITEMS, len(items))
    unplanned = 4 * rows * len(items) + len(source.lists) * top * 12  # tables, profile lists
    assert held_bytes(source) == planned(SegmentLists(), len(data.items)) + unplanned
    assert SEGMENT_LIST_ITEMS == sources.SEGMENT_TOP_N
