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
