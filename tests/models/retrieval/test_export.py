"""Exporting fitted retrievers: the index choice and what cannot be exported.

Round trips (export, `load_source`, the offline answer): `tests/serving/test_sources.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlsd.models.retrieval.base import RetrievalData
from mlsd.models.retrieval.ease import EASERetriever
from mlsd.models.retrieval.export import export_source
from mlsd.models.retrieval.implicit_mf import ALSRetriever
from mlsd.models.retrieval.popularity import PopularityRetriever
from mlsd.serving.index import load_index
from mlsd.serving.sources import SOURCE_FILE, load_source


def test_index_is_chosen_for_the_catalog_or_named(
    contract_data: RetrievalData, tmp_path: Path
) -> None:
    retriever = ALSRetriever(factors=8, iterations=2, num_threads=1).fit(contract_data)
    auto = export_source(retriever, tmp_path / "auto")
    assert load_index(auto / "index").backend == "flat"  # 150 items: exact search
    hnsw = export_source(retriever, tmp_path / "hnsw", index="hnsw")
    assert load_index(hnsw / "index").backend == "hnsw"
    assert load_source(hnsw).name == "als"
    with pytest.raises(ValueError, match="index='annoy'"):
        export_source(retriever, tmp_path / "bad", index="annoy")


def test_source_json_records_the_kind_and_parameters(
    contract_data: RetrievalData, tmp_path: Path
) -> None:
    retriever = ALSRetriever(factors=8, iterations=2, regularization=0.5, num_threads=1)
    path = export_source(retriever.fit(contract_data), tmp_path / "als")
    meta = json.loads((path / SOURCE_FILE).read_text())
    assert meta["kind"] == "factors"
    assert meta["fold_in"] is True
    assert meta["regularization"] == 0.5


def test_unknown_or_unfitted_retrievers_are_refused(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        export_source(EASERetriever(), tmp_path / "ease")

    class Custom(PopularityRetriever):
        pass

    with pytest.raises(ValueError, match="no serving form for Custom"):
        export_source(Custom(), tmp_path / "custom")
