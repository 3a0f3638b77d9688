"""``mlsd feed promote|rollback|versions`` against a real MLflow store (SQLite in tmp_path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mlsd.cli import run
from mlsd.serving.registry import ModelRegistry, RegistryConfig
from tests.serving.test_registry import register_three


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three registered bundles (ndcg@10 0.30, 0.28, 0.33) in the default model, no champion."""
    base = tmp_path_factory.mktemp("registry")
    assert register_three(ModelRegistry(RegistryConfig(), base), base / "bundles") == [1, 2, 3]
    return base


def test_promote_refuse_force_and_rollback(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    where = ["--base-dir", str(store)]

    assert run(["feed", "rollback", *where]) == 1
    assert "no previous champion" in capsys.readouterr().err

    assert run(["feed", "promote", "--version", "1", *where]) == 0
    assert "accepted" in capsys.readouterr().out

    assert run(["feed", "promote", "--version", "2", *where]) == 1
    out = capsys.readouterr().out
    assert "refused" in out
    assert "0.2800" in out
    assert "0.3000" in out
    assert "stored values, each on its own validation window" in out  # says what it compared

    assert run(["feed", "promote", "--version", "2", "--force", *where]) == 0
    out = capsys.readouterr().out
    assert "forced" in out
    assert "overridden" in out
    assert "0.2800" in out

    assert run(["feed", "promote", "--version", "3", *where]) == 0
    assert "accepted" in capsys.readouterr().out

    assert run(["feed", "rollback", *where]) == 0
    assert "v3 -> v2" in capsys.readouterr().out
    assert ModelRegistry(RegistryConfig(), store).champion() == 2

    assert run(["feed", "versions", *where]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "0.2800" in line]
    assert len(rows) == 1
    assert "champion" in rows[0]

    assert run(["feed", "promote", "--version", "9", *where]) == 1
    assert "no version or alias '9'" in capsys.readouterr().err


def test_tracking_uri_from_the_environment(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store_uri = f"sqlite:///{store / 'mlflow.db'}"
    monkeypatch.setenv("MLSD_TRACKING_URI", store_uri)
    assert run(["feed", "versions", "--base-dir", str(tmp_path)]) == 0
    assert "0.3300" in capsys.readouterr().out
    assert not (tmp_path / "mlflow.db").exists()

    # --registry-uri wins over the environment (which now names a store that is never opened).
    monkeypatch.setenv("MLSD_TRACKING_URI", f"sqlite:///{tmp_path / 'unused.db'}")
    assert run(["feed", "versions", "--registry-uri", store_uri]) == 0
    assert "0.3300" in capsys.readouterr().out
    assert not (tmp_path / "unused.db").exists()


def test_train_register_promote_exits_1_when_the_gate_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`feed train --register --promote` refuses like `feed promote`: the message and exit 1."""
    from types import SimpleNamespace

    import mlsd.systems.feed.package as package
    import mlsd.systems.feed.ranking as ranking
    from tests.serving.test_registry import make_bundle

    registry = ModelRegistry(RegistryConfig(), tmp_path)
    champion = registry.register(
        make_bundle(tmp_path / "champion", seed=1), params={}, metrics={"ndcg@10": 0.30}
    )
    assert registry.promote(champion).accepted
    gate_values = iter([0.20, 0.40])  # the first trained model is worse, the second better

    def fake_package(dataset: Path, out: Path, feed: object, **_: object) -> tuple[Path, object]:
        return make_bundle(out, seed=2), SimpleNamespace()

    def fake_register(path: Path, trained: object, registry: ModelRegistry) -> int:
        return registry.register(path, params={}, metrics={"ndcg@10": next(gate_values)})

    monkeypatch.setattr(package, "package_model", fake_package)
    monkeypatch.setattr(ranking, "register_model", fake_register)
    monkeypatch.setattr(ranking, "scores_table", lambda trained: "scores")
    args = ["feed", "train", "--dataset", str(tmp_path), "--register", "--promote"]
    where = ["--base-dir", str(tmp_path)]

    assert run([*args, "--out", str(tmp_path / "m2"), *where]) == 1
    out = capsys.readouterr().out
    assert "refused" in out
    assert "version 2 stays out; champion remains v1" in out
    assert "mlsd feed promote --version 2 --force" in out
    assert ModelRegistry(RegistryConfig(), tmp_path).champion() == 1

    assert run([*args, "--out", str(tmp_path / "m3"), *where]) == 0
    assert "accepted" in capsys.readouterr().out
    assert ModelRegistry(RegistryConfig(), tmp_path).champion() == 3


def test_promote_refuses_another_dataset_and_force_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`register_scores` records the dataset and the evaluation settings of model.json; the
    CLI's stored-value gate refuses a version of other data, and --force says it overrode."""
    import json

    from mlsd.config import FeedConfig
    from mlsd.evaluation.offline import RankerScores
    from mlsd.systems.feed.package import evaluation_settings
    from mlsd.systems.feed.ranking import register_scores
    from tests.serving.test_registry import make_bundle

    registry = ModelRegistry(RegistryConfig(), tmp_path)
    settings = evaluation_settings(FeedConfig())
    assert settings["ranker_windows"] == 3

    def model(name: str, content_hash: str, ndcg: float) -> int:
        path = make_bundle(tmp_path / name, seed=len(name))
        meta = {"sources": ["als"], "n_candidates": 200, "version": name,
                "dataset": {"name": "synthetic", "content_hash": content_hash},
                "evaluation": settings}  # fmt: skip
        (path / "model.json").write_text(json.dumps(meta))
        score = RankerScores("lightgbm", ndcg, 0.7, 0.7, 0.5, 1.0, 1.0)
        return register_scores(path, score, registry)

    first = model("first", "sha256:aaa", 0.30)
    tags = registry._model_version(first).tags
    assert tags["dataset_hash"] == "sha256:aaa"
    assert tags["mlsd.protocol.ranker_windows"] == "3"
    assert tags["mlsd.protocol.ranker_valid_frac"] == "0.2"
    second = model("second", "sha256:bbb", 0.40)
    where = ["--base-dir", str(tmp_path)]

    assert run(["feed", "promote", "--version", str(first), *where]) == 0
    capsys.readouterr()
    assert run(["feed", "promote", "--version", str(second), *where]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "refused" in out
    assert "trained on different datasets" in out
    assert "mlsd feed retrain" in out
    assert run(["feed", "promote", "--version", str(second), "--force", *where]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "accepted (forced)" in out
    assert "trained on different datasets" in out
    assert registry.champion() == second


def test_alias_sets_a_challenger_but_not_the_champion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = ModelRegistry(RegistryConfig(), tmp_path)
    first, second, _ = register_three(registry, tmp_path / "bundles")
    assert registry.promote(first).accepted
    where = ["--base-dir", str(tmp_path)]

    assert run(["feed", "alias", "--name", "challenger", "--version", str(second), *where]) == 0
    assert "alias 'challenger' -> version 2" in capsys.readouterr().out
    assert registry.alias_version("challenger") == second

    assert run(["feed", "alias", "--name", "champion", "--version", str(second), *where]) == 1
    assert "mlsd feed promote" in capsys.readouterr().err
    assert registry.champion() == first


def test_a_missing_arm_alias_names_the_alias_and_the_command(tmp_path: Path) -> None:
    """A registry without a challenger: the error names it and `mlsd feed alias`, not promote
    (which would move the champion)."""
    from mlsd.config import FeedConfig
    from mlsd.systems.feed.serve import ModelLoader

    ModelRegistry(RegistryConfig(), tmp_path).versions()
    features: Any = object()  # never reached: the alias is missing
    loader = ModelLoader(tmp_path, FeedConfig(), model_dir=None, registry_uri=None,
                         base_dir=tmp_path, alias="challenger", features=features)  # fmt: skip
    with pytest.raises(ValueError, match="no version with the alias") as raised:
        loader.prepare()
    message = str(raised.value)
    assert "'challenger'" in message
    assert "mlsd feed alias --name challenger --version N" in message
    assert "promote" not in message
    champion = ModelLoader(tmp_path, FeedConfig(), model_dir=None, registry_uri=None,
                           base_dir=tmp_path, features=features)  # fmt: skip
    with pytest.raises(ValueError, match="mlsd feed promote --version N"):
        champion.prepare()


@pytest.mark.parametrize(
    "command",
    [
        ["versions"],
        ["promote", "--version", "1"],
        ["rollback"],
        ["alias", "--name", "challenger", "--version", "1"],
    ],
)
def test_reading_commands_refuse_a_missing_registry_and_create_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.delenv("MLSD_TRACKING_URI", raising=False)
    monkeypatch.chdir(empty)  # the default --base-dir: the working directory
    assert run(["feed", *command]) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert f"no model registry at {empty / 'mlflow.db'}; pass --base-dir" in said
    assert "make demo" in said
    assert list(empty.iterdir()) == []

    elsewhere = tmp_path / "elsewhere"
    assert run(["feed", *command, "--base-dir", str(elsewhere)]) == 2
    assert f"no model registry at {elsewhere / 'mlflow.db'}" in capsys.readouterr().err
    assert not elsewhere.exists()
    assert list(empty.iterdir()) == []


def test_a_loader_on_a_missing_registry_creates_none(tmp_path: Path) -> None:
    """Serving (and batch-predict) in the wrong folder: the error names it, and neither the
    load nor a follower's check creates an empty registry."""
    from mlsd.config import FeedConfig
    from mlsd.serving.registry import RegistryNotFoundError
    from mlsd.systems.feed.serve import ModelLoader

    features: Any = object()  # never reached: there is no registry
    loader = ModelLoader(tmp_path, FeedConfig(), model_dir=None, registry_uri=None,
                         base_dir=tmp_path, features=features)  # fmt: skip
    with pytest.raises(RegistryNotFoundError, match="no model registry at"):
        loader.prepare()
    assert not loader.changed()
    assert list(tmp_path.iterdir()) == []
