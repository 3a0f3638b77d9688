"""The model registry on a real MLflow (SQLite + local artifacts): gate, force, rollback, verify."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

from mlsd.serving.registry import (
    CorruptArtifactError,
    HeadToHead,
    ModelRegistry,
    RegistryConfig,
    verify_model_dir,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One MLflow store for the module (creating its tables takes seconds); tests use own names."""
    base = tmp_path_factory.mktemp("registry")
    ModelRegistry(RegistryConfig(), base).versions()  # creates mlflow.db
    return base


def _registry(store: Path, name: str) -> ModelRegistry:
    return ModelRegistry(RegistryConfig(model_name=name, experiment=name), store)


def make_bundle(path: Path, seed: int) -> Path:
    (path / "weights").mkdir(parents=True)
    (path / "bundle.json").write_text(json.dumps({"kind": "lightgbm", "seed": seed}))
    (path / "model.txt").write_text(f"tree\nnum_leaves={seed}\n")
    np.save(path / "weights" / "item_embeddings.npy", np.full((4, 3), seed, dtype=np.float32))
    return path


def register_three(registry: ModelRegistry, tmp_path: Path) -> list[int]:
    return [
        registry.register(
            make_bundle(tmp_path / f"b{i}", seed=i),
            params={"n_estimators": 60 + i, "ranker": "lightgbm"},
            metrics={"ndcg@10": ndcg, "auc": 0.7},
            tags={"dataset": "synthetic"},
        )
        for i, ndcg in enumerate((0.30, 0.28, 0.33), start=1)
    ]


def test_gate_force_and_rollback(store: Path, tmp_path: Path) -> None:
    registry = _registry(store, "flow")
    assert registry.champion() is None
    assert register_three(registry, tmp_path) == [1, 2, 3]

    first = registry.promote(1)
    assert (first.accepted, first.forced, first.previous_champion) == (True, False, None)

    refused = registry.promote(2)
    assert not refused.accepted
    assert not refused.forced
    assert (refused.candidate_value, refused.champion_value) == (0.28, 0.30)
    assert "0.2800" in refused.reason
    assert "0.3000" in refused.reason
    assert registry.champion() == 1

    forced = registry.promote(2, force=True)
    assert (forced.accepted, forced.forced, forced.previous_champion) == (True, True, 1)
    assert registry.champion() == 2

    better = registry.promote(3)
    assert (better.accepted, better.forced, better.previous_champion) == (True, False, 2)
    assert registry.rollback() == 2
    assert registry.champion() == 2
    assert registry.rollback() == 1
    with pytest.raises(ValueError, match="no previous champion"):
        registry.rollback()

    infos = registry.versions()
    assert [(i.version, i.gate_value, i.aliases) for i in infos] == [
        (1, 0.30, ("champion",)),
        (2, 0.28, ()),
        (3, 0.33, ()),
    ]
    assert all(i.gate_metric == "ndcg@10" for i in infos)


def test_tolerance_accepts_slightly_worse(store: Path, tmp_path: Path) -> None:
    registry = _registry(store, "tolerance")
    registry = ModelRegistry(dataclasses.replace(registry.config, gate_tolerance=0.02), store)
    register_three(registry, tmp_path)
    registry.promote(1)
    assert registry.promote(2).accepted  # 0.28 >= 0.30 - 0.02
    with pytest.raises(ValueError, match="no version or alias '9'"):
        registry.promote(9)


def test_a_head_to_head_decides_over_the_stored_values(store: Path, tmp_path: Path) -> None:
    """The stored values are each version's score on its own window; a head-to-head on one
    window overrides them both ways, and is recorded on the candidate version."""
    registry = _registry(store, "head-to-head")
    first, second, third = register_three(registry, tmp_path)  # stored 0.30, 0.28, 0.33
    registry.promote(first)
    window = "held-out users of [t1, t2)"

    # Stored: 0.28 < 0.30 - 0.005 would refuse; on the same window the candidate is better.
    better = registry.promote(second, head_to_head=HeadToHead(first, 0.25, 0.20, window))
    assert (better.accepted, better.forced, better.head_to_head) == (True, False, True)
    assert (better.candidate_value, better.champion_value) == (0.25, 0.20)
    assert "head to head on held-out users of [t1, t2)" in better.reason
    assert registry.champion() == second

    # Stored: 0.33 > 0.28 would accept; on the same window the candidate is worse.
    worse = registry.promote(third, head_to_head=HeadToHead(second, 0.19, 0.25, window))
    assert (worse.accepted, worse.head_to_head) == (False, True)
    assert registry.champion() == second
    # Within the tolerance (0.005) on the same window: accepted.
    close = registry.promote(third, head_to_head=HeadToHead(second, 0.246, 0.25, window))
    assert close.accepted
    assert registry.champion() == third

    recorded = {i.version: i.head_to_head for i in registry.versions()}
    assert recorded[first] is None
    second_gate, third_gate = recorded[second], recorded[third]
    assert second_gate is not None
    assert second_gate["candidate_value"] == 0.25
    assert second_gate["accepted"] is True
    assert third_gate is not None
    assert third_gate["candidate_value"] == 0.246  # the last gate it went through

    # A head-to-head measured against a champion that is no longer the champion is stale.
    with pytest.raises(ValueError, match="champion is now v3"):
        registry.promote(first, head_to_head=HeadToHead(second, 0.9, 0.1, window))
    # Without one, promote compares the stored values and says so.
    stored = registry.promote(second)
    assert not stored.head_to_head
    assert "stored values, each on its own validation window" in stored.reason


def test_download_verifies_the_manifest(store: Path, tmp_path: Path) -> None:
    registry = _registry(store, "download")
    source = make_bundle(tmp_path / "bundle", seed=7)
    version = registry.register(source, params={}, metrics={"ndcg@10": 0.3})
    registry.promote(version)

    bundle = registry.download("champion", tmp_path / "dl")
    assert sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()) == [
        "bundle.json",
        "model.txt",
        "weights/item_embeddings.npy",
    ]
    np.testing.assert_array_equal(
        np.load(bundle / "weights" / "item_embeddings.npy"), np.full((4, 3), 7, np.float32)
    )
    assert "mlsd==" in (bundle.parent / "requirements.txt").read_text()

    (bundle / "model.txt").write_text("tree\nnum_leaves=999\n")
    with pytest.raises(CorruptArtifactError, match=r"bundle/model\.txt \(sha256 mismatch\)") as err:
        verify_model_dir(bundle.parent)
    assert err.value.path == "bundle/model.txt"

    (bundle / "model.txt").unlink()
    (bundle / "extra.bin").write_bytes(b"x")
    with pytest.raises(CorruptArtifactError, match=r"model\.txt \(missing\).*extra\.bin"):
        verify_model_dir(bundle.parent)

    with pytest.raises(ValueError, match="not empty"):
        registry.download(version, tmp_path / "dl")


def test_tampered_store_is_refused(store: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    registry = _registry(store, "tampered")
    version = registry.register(make_bundle(tmp_path / "b", 1), params={}, metrics={"ndcg@10": 0.3})
    client = MlflowClient(registry.tracking_uri, registry.tracking_uri)
    source = str(client.get_model_version("tampered", str(version)).source)
    stored = Path(urlparse(source).path)

    weights = stored / "bundle" / "weights" / "item_embeddings.npy"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(CorruptArtifactError, match=r"item_embeddings\.npy") as err:
        registry.download(version, tmp_path / "dl1")
    assert err.value.path == "bundle/weights/item_embeddings.npy"

    weights.unlink()
    with pytest.raises(CorruptArtifactError, match=r"item_embeddings\.npy \(missing\)"):
        registry.download(version, tmp_path / "dl2")

    # Rewriting the manifest to match does not help: its digest is recorded on the version.
    manifest = json.loads((stored / "manifest.json").read_text())
    del manifest["files"]["bundle/weights/item_embeddings.npy"]
    (stored / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptArtifactError, match=r"manifest\.json"):
        registry.download(version, tmp_path / "dl3")


def test_register_rejects_bad_input(store: Path, tmp_path: Path) -> None:
    registry = _registry(store, "bad")
    with pytest.raises(ValueError, match=r"bundle directory .*missing.* does not exist"):
        registry.register(tmp_path / "missing", params={}, metrics={"ndcg@10": 0.3})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        registry.register(tmp_path / "empty", params={}, metrics={"ndcg@10": 0.3})
    bundle = make_bundle(tmp_path / "b", 1)
    with pytest.raises(ValueError, match="finite 'ndcg@10'"):
        registry.register(bundle, params={}, metrics={"auc": 0.7})
    assert registry.versions() == []


def test_relative_paths_resolve_against_base_dir(tmp_path: Path) -> None:
    registry = ModelRegistry(RegistryConfig(), tmp_path)
    assert registry.tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    absolute = RegistryConfig(tracking_uri="sqlite:////srv/mlflow.db")
    assert ModelRegistry(absolute, tmp_path).tracking_uri == "sqlite:////srv/mlflow.db"
    server = RegistryConfig(tracking_uri="http://mlflow:5000")
    assert ModelRegistry(server, tmp_path).tracking_uri == "http://mlflow:5000"


def _register_tagged(
    registry: ModelRegistry, tmp_path: Path, name: str, ndcg: float, tags: dict[str, str]
) -> int:
    bundle = make_bundle(tmp_path / name, seed=len(name))
    return registry.register(bundle, params={}, metrics={"ndcg@10": ndcg}, tags=tags)


def test_stored_values_of_other_data_or_settings_do_not_compare(
    store: Path, tmp_path: Path
) -> None:
    """Without a head-to-head, a better stored value on another dataset, or under other
    evaluation settings, is refused (pointing to retrain); force overrides and says so."""
    registry = _registry(store, "incomparable")
    same = {"dataset_hash": "sha256:aaa", "mlsd.protocol.ranker_windows": "3"}
    champion = _register_tagged(registry, tmp_path, "champion", 0.30, same)
    assert registry.promote(champion).accepted

    other_data = _register_tagged(
        registry, tmp_path, "other-data", 0.40, {**same, "dataset_hash": "sha256:bbb"}
    )
    refused = registry.promote(other_data)
    assert (refused.accepted, refused.forced) == (False, False)
    assert "trained on different datasets" in refused.reason
    assert "sha256:bbb" in refused.reason
    assert "sha256:aaa" in refused.reason
    assert "mlsd feed retrain" in refused.reason
    assert registry.champion() == champion

    other_settings = _register_tagged(
        registry, tmp_path, "other-settings", 0.40, {**same, "mlsd.protocol.ranker_windows": "1"}
    )
    refused = registry.promote(other_settings)
    assert not refused.accepted
    assert "ranker_windows 1" in refused.reason
    assert "mlsd feed retrain" in refused.reason
    assert registry.champion() == champion

    forced = registry.promote(other_data, force=True)
    assert (forced.accepted, forced.forced) == (True, True)
    assert "trained on different datasets" in forced.reason
    assert registry.champion() == other_data

    # Same data and settings: the stored values compare as before.
    again = _register_tagged(
        registry, tmp_path, "again", 0.41, {**same, "dataset_hash": "sha256:bbb"}
    )
    assert registry.promote(again).accepted

    # A head-to-head scores both on one window, so the datasets may differ.
    newer = _register_tagged(registry, tmp_path, "newer", 0.10, {**same, "dataset_hash": "c"})
    result = registry.promote(newer, head_to_head=HeadToHead(again, 0.3, 0.3, "window"))
    assert result.accepted


def test_a_version_without_evaluation_settings_does_not_compare(
    store: Path, tmp_path: Path
) -> None:
    """A champion registered before versions recorded their evaluation settings stored a value
    computed differently: a newer version's stored value is not compared with it, either way
    round; a head-to-head still decides."""
    registry = _registry(store, "untagged")
    old = _register_tagged(registry, tmp_path, "old", 0.30, {"dataset_hash": "sha256:aaa"})
    assert registry.promote(old).accepted
    tagged = {"dataset_hash": "sha256:aaa", "mlsd.protocol.ranker_windows": "3"}
    new = _register_tagged(registry, tmp_path, "new", 0.40, tagged)
    refused = registry.promote(new)
    assert not refused.accepted
    assert f"v{old} records no evaluation settings" in refused.reason
    assert "mlsd feed retrain" in refused.reason
    assert registry.champion() == old
    assert registry.promote(new, head_to_head=HeadToHead(old, 0.31, 0.30, "window")).accepted
    refused = registry.promote(old)  # the other way round
    assert not refused.accepted
    assert f"v{old} records no evaluation settings" in refused.reason
    assert registry.champion() == new


def test_set_alias_points_other_aliases_but_not_the_champion(store: Path, tmp_path: Path) -> None:
    registry = _registry(store, "aliases")
    first, second, _ = register_three(registry, tmp_path)
    registry.promote(first)
    registry.set_alias("challenger", second)
    assert registry.alias_version("challenger") == second
    assert registry.champion() == first
    registry.set_alias("challenger", first)  # moves
    assert registry.alias_version("challenger") == first
    with pytest.raises(ValueError, match="mlsd feed promote --version 2"):
        registry.set_alias("champion", second)
    assert registry.champion() == first
    with pytest.raises(ValueError, match="no version or alias '9'"):
        registry.set_alias("challenger", 9)
    with pytest.raises(ValueError, match="use a name"):
        registry.set_alias("3", second)


def test_require_existing_names_a_missing_local_store_and_creates_nothing(tmp_path: Path) -> None:
    from mlsd.serving.registry import RegistryNotFoundError

    missing = ModelRegistry(RegistryConfig(), tmp_path)
    assert missing.local_store == tmp_path.resolve() / "mlflow.db"
    assert not missing.exists()
    with pytest.raises(RegistryNotFoundError) as raised:
        missing.require_existing()
    assert raised.value.path == tmp_path.resolve() / "mlflow.db"
    assert "pass --base-dir" in str(raised.value)
    assert list(tmp_path.iterdir()) == []
    server = ModelRegistry(RegistryConfig(tracking_uri="http://127.0.0.1:1"), tmp_path)
    assert server.local_store is None
    assert server.require_existing() is server  # a server is not asked here
    missing.versions()  # a registering caller may still create it
    assert missing.require_existing() is missing
