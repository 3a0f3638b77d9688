"""The Milvus backend against milvus-lite: pymilvus starts its gRPC server on loopback, in process.

One ``.db`` per module (one server), one collection per test.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from mlsd.serving.index import MilvusConfig, MilvusIndex, VectorIndex, recall_at_k
from mlsd.serving.index.faiss_index import default_nlist
from tests.serving.index.test_base import VectorIndexContract, clustered

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def milvus_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("milvus") / "items.db")


def _index(
    uri: str,
    index_type: str,
    params: dict[str, int] | None = None,
    search_params: dict[str, int] | None = None,
) -> MilvusIndex:
    """An unbuilt index on a fresh collection of the module's milvus-lite database."""
    collection = f"items_{uuid.uuid4().hex[:12]}"
    config = MilvusConfig(uri, collection, index_type, params, search_params)
    return MilvusIndex(config)


class TestMilvusHNSW(VectorIndexContract):
    @pytest.fixture(autouse=True)
    def _uri(self, milvus_uri: str) -> None:
        self.uri = milvus_uri

    def make_index(self, tmp_path: Path) -> VectorIndex:
        return _index(
            self.uri, "HNSW", params={"M": 8, "efConstruction": 40}, search_params={"ef": 32}
        )


def _recall(index: VectorIndex, k: int = 10) -> float:
    data = clustered()
    return recall_at_k(index.search(data.queries, k)[0], data.exact(k)[0], k)


def test_flat_is_exact_and_ivf_params_reach_the_index(milvus_uri: str) -> None:
    data = clustered()
    flat = _index(milvus_uri, "FLAT").build(data.item_ids, data.item_embeddings)
    ids, scores = flat.search(data.queries, 10)
    exact_ids, exact_scores = data.exact(10)
    np.testing.assert_array_equal(ids, exact_ids)
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5, atol=1e-5)
    # nlist and nprobe must reach milvus-lite: one of 8 cells misses neighbours, all 8 find
    # all (were nlist lost, milvus-lite's default 128 cells would leave 8 probes short).
    ivf = _index(milvus_uri, "IVF_FLAT", params={"nlist": 8}, search_params={"nprobe": 1})
    ivf.build(data.item_ids, data.item_embeddings)
    assert _recall(ivf) < 0.9
    assert _recall(ivf.set_search(nprobe=8)) == 1.0
    assert ivf.memory_bytes() > flat.memory_bytes()  # + centroids and list ids


def test_ivf_defaults_are_sized_for_the_catalog(milvus_uri: str, tmp_path: Path) -> None:
    """A fixed 1,024 cells left a small catalog's cells mostly empty: a 32-cell search
    returned fewer items than asked for."""
    data = clustered()
    n = len(data.item_ids)
    ivf = _index(milvus_uri, "IVF_FLAT").build(data.item_ids, data.item_embeddings)
    assert ivf.config.params == {"nlist": default_nlist(n)}
    assert ivf.config.search_params == {"nprobe": min(32, default_nlist(n))}
    ids, _ = ivf.search(data.queries, 100)
    assert (ids != -1).all()  # every list full
    assert _recall(ivf) >= 0.9
    ivf.save(tmp_path / "ivf")
    assert MilvusIndex.load(tmp_path / "ivf").config.params == ivf.config.params
    with pytest.raises(ValueError, match=f"nlist=5000 exceeds the {n} items"):
        _index(milvus_uri, "IVF_FLAT", params={"nlist": 5000}).build(
            data.item_ids, data.item_embeddings
        )


def test_saved_config_names_the_collection(milvus_uri: str, tmp_path: Path) -> None:
    data = clustered()
    index = _index(milvus_uri, "HNSW").build(data.item_ids, data.item_embeddings)
    index.save(tmp_path)
    meta = json.loads((tmp_path / "index.json").read_text())
    assert meta["backend"] == "milvus"
    assert meta["config"]["uri"] == milvus_uri
    assert meta["config"]["collection"] == index.config.collection
    assert meta["build_id"]
    loaded = MilvusIndex.load(tmp_path)
    assert loaded.search(data.queries, 5)[0].tolist() == index.search(data.queries, 5)[0].tolist()
    # Another build under the same name, of the same size: the saved index must not answer
    # from it (two exports sharing a collection served each other's vectors).
    index.build(data.item_ids, data.item_embeddings[::-1].copy())
    with pytest.raises(ValueError, match="not the saved build"):
        MilvusIndex.load(tmp_path)
    # An index.json without a build id (an older save) still checks the size.
    meta.pop("build_id")
    (tmp_path / "index.json").write_text(json.dumps(meta))
    index.build(data.item_ids[:100], data.item_embeddings[:100])
    with pytest.raises(ValueError, match="holds 100; it changed since save"):
        MilvusIndex.load(tmp_path)
    index.close()
    loaded.close()


def test_a_database_saved_with_its_index_loads_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A relative uri names a file of the working directory at build; save records where the
    # database is relative to the index directory (it lies inside), so another process,
    # started elsewhere, finds it.
    data = clustered()
    monkeypatch.chdir(tmp_path)
    config = MilvusConfig("saved/items.db", f"items_{uuid.uuid4().hex[:12]}", "FLAT")
    index = MilvusIndex(config).build(data.item_ids, data.item_embeddings)
    assert index.config.uri == str(tmp_path / "saved" / "items.db")
    index.save(Path("saved"))
    meta = json.loads((tmp_path / "saved" / "index.json").read_text())
    assert meta["config"]["uri"] == "items.db"
    assert meta["uri_in_index_dir"] is True
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = MilvusIndex.load(Path("../saved"))
    assert loaded.config.uri == str(tmp_path / "saved" / "items.db")
    assert loaded.search(data.queries, 5)[0].tolist() == index.search(data.queries, 5)[0].tolist()
    assert not list(elsewhere.iterdir())  # no empty database opened here
    loaded.close()
    index.close()


def test_an_exported_milvus_source_loads_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pandas as pd

    from mlsd.models.retrieval.base import RetrievalData
    from mlsd.models.retrieval.export import export_source
    from mlsd.models.retrieval.implicit_mf import ALSRetriever
    from mlsd.serving.sources import FactorSource, UserQuery, load_source

    rng = np.random.default_rng(0)
    n = 2_000
    events = pd.DataFrame({
        "user_id": rng.integers(0, 50, n), "item_id": rng.integers(0, 80, n),
        "ts": pd.to_datetime(rng.integers(0, 10**6, n), unit="s", utc=True),
        "event": "x", "value": 1.0,
    })  # fmt: skip
    users, items = pd.DataFrame({"user_id": range(50)}), pd.DataFrame({"item_id": range(80)})
    train = RetrievalData(events, users, items, pd.Timestamp(10**6, unit="s", tz="UTC"))
    retriever = ALSRetriever(factors=8, iterations=2, num_threads=1).fit(train)
    for name in ("exporter", "server"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "exporter")
    artifact = export_source(retriever, tmp_path / "artifact", index="milvus")
    monkeypatch.chdir(tmp_path / "server")
    source = load_source(artifact)
    assert isinstance(source, FactorSource)
    empty = np.empty(0, dtype=np.int64)
    items_found, _ = source.candidates(UserQuery(0, empty, empty, {}, 10**6), 10)
    assert len(items_found) == 10
    # The database travels with the artifact (milvus-lite's .db is a directory).
    assert [p.name for p in (artifact / "index").glob("*.db")] == ["milvus_items.db"]
    assert not list((tmp_path / "exporter").iterdir())


def test_each_export_gets_a_collection_of_its_own() -> None:
    from mlsd.models.retrieval.export import make_index

    first, second = make_index("milvus", 100, 8), make_index("milvus", 100, 8)
    assert isinstance(first, MilvusIndex)
    assert isinstance(second, MilvusIndex)
    assert first.config.collection != second.config.collection


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="index_type='ANNOY'"):
        MilvusConfig(index_type="ANNOY")
    assert MilvusConfig(index_type="HNSW").build_params == {"M": 32, "efConstruction": 200}
    assert MilvusConfig(index_type="IVF_FLAT", search_params={"nprobe": 3}).query_params == {
        "nprobe": 3
    }
