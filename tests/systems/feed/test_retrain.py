"""``mlsd feed retrain``: the gate, head to head on the new model's window, keeps a worse model
out and lets a better one in, whatever the stored values say, and the running service reloads
it; a real MLflow SQLite registry, a real feature store, a real uvicorn server."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from mlsd.cli import run
from mlsd.config import load_feed_config
from mlsd.evaluation.offline import TrainedRankers, gate_scores
from mlsd.models.ranking.bundle import RankingBundle
from mlsd.serving.app import create_app
from mlsd.serving.popular import PopularRecommender
from mlsd.serving.registry import ModelRegistry, RegistryConfig
from mlsd.serving.settings import ServiceSettings
from mlsd.systems.feed import retrain as retrain_module
from mlsd.systems.feed.package import package_model
from mlsd.systems.feed.retrain import ReloadError, head_to_head, reload_service
from mlsd.systems.feed.serve import ModelLoader
from tests.feed_world import materialized_world
from tests.serving.test_app import running_server
from tests.systems.feed.test_serve import CONFIG, TOKEN

assert retrain_module.retrain is not None  # importing the module registers the command


@dataclass(frozen=True)
class Setup:
    world: Path
    config: Path
    model: Path
    """A model packaged from the world."""
    trained: TrainedRankers
    """Its training: the held-out rows a head-to-head scores on."""
    inverted: Path
    """The same model with its ranker's coefficients negated: it ranks the candidates upside
    down, a real model that is worse than ``model`` on any window."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    root = tmp_path_factory.mktemp("retrain")
    world, config = materialized_world(root, CONFIG, seed=8)
    model, trained = package_model(
        world, root / "champion", load_feed_config(config), version="old"
    )
    inverted = root / "inverted"
    shutil.copytree(model, inverted)
    ranker_json = inverted / "ranking" / "ranker" / "ranker.json"
    ranker = json.loads(ranker_json.read_text())
    assert ranker["kind"] == "logistic"
    ranker["intercept"] = -ranker["intercept"]
    ranker["numeric_coef"] = [-c for c in ranker["numeric_coef"]]
    ranker["categorical_coef"] = {k: [-c for c in v] for k, v in ranker["categorical_coef"].items()}
    ranker_json.write_text(json.dumps(ranker))
    meta = json.loads((inverted / "model.json").read_text())
    (inverted / "model.json").write_text(json.dumps({**meta, "version": "inverted"}))
    return Setup(world, config, model, trained, inverted)


def champion_with(registry: ModelRegistry, model: Path, ndcg: float) -> int:
    """Register ``model`` with a made-up stored gate value and make it the champion."""
    version = registry.register(model, params={}, metrics={"ndcg@10": ndcg})
    assert registry.promote(version, force=True).accepted
    return version


def retrain_args(world: Path, config: Path, base: Path, *extra: str) -> list[str]:
    return ["feed", "retrain", "--dataset", str(world), "--config", str(config),
            "--base-dir", str(base), "--out", str(base / "new-model"), *extra]  # fmt: skip


def test_the_gate_refuses_a_worse_model_on_the_same_window(setup: Setup, tmp_path: Path) -> None:
    """The stored values (0.99 for the candidate, 0.0 for the champion) would let the worse
    model in; scored head to head on the same held-out rows, it is refused."""
    registry = ModelRegistry(RegistryConfig(), tmp_path)
    champion = champion_with(registry, setup.model, ndcg=0.0)
    worse = registry.register(setup.inverted, params={}, metrics={"ndcg@10": 0.99})
    inverted = RankingBundle.load(setup.inverted / "ranking")
    comparison = head_to_head(registry, setup.trained, inverted)
    assert comparison is not None
    assert comparison.champion_version == champion
    # the same rows as the stored value: the held-out users of the last label window
    assert comparison.champion_value == pytest.approx(gate_scores(setup.trained).valid_ndcg)
    assert comparison.candidate_value < comparison.champion_value - 0.05
    result = registry.promote(worse, head_to_head=comparison)
    assert not result.accepted
    assert result.head_to_head
    assert registry.champion() == champion


def test_a_better_model_is_promoted_head_to_head_and_the_running_service_reloads_it(
    setup: Setup,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The champion's stored 0.99 would refuse any new model; on the new model's window the
    champion (the inverted ranker) is worse, so the retrained model goes in."""
    world, config = setup.world, setup.config
    registry = ModelRegistry(RegistryConfig(), tmp_path)
    old = champion_with(registry, setup.inverted, ndcg=0.99)
    load = ModelLoader(world, load_feed_config(config), model_dir=None, registry_uri=None,
                       base_dir=tmp_path)  # fmt: skip
    app = create_app(load, settings=ServiceSettings(admin_token=TOKEN))
    monkeypatch.setenv("MLSD_ADMIN_TOKEN", TOKEN)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/v1/recommendations/3").json()["model_version"] == "inverted"
        assert run(retrain_args(world, config, tmp_path, "--reload-url", url)) == 0
        served = http.get("/v1/recommendations/3").json()["model_version"]
    out = capsys.readouterr().out
    assert registry.champion() == old + 1
    assert "head to head on the new model's held-out users of" in out
    assert "accepted" in out
    assert "reloaded" in out
    gated = registry.versions()[-1].head_to_head
    assert gated is not None
    assert gated["champion_version"] == old
    assert gated["accepted"] is True
    assert gated["candidate_value"] > gated["champion_value"] + 0.05
    new_version = (tmp_path / "new-model" / "model.json").read_text()
    assert served != "inverted"
    assert f'"version": "{served}"' in new_version


def test_reload_errors_are_clear_and_checked_before_training(
    setup: Setup,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    world, config = setup.world, setup.config
    monkeypatch.delenv("MLSD_ADMIN_TOKEN", raising=False)
    args = retrain_args(world, config, tmp_path, "--reload-url", "http://127.0.0.1:9")
    assert run(args) == 1
    assert "MLSD_ADMIN_TOKEN" in capsys.readouterr().err
    assert not (tmp_path / "new-model").exists()  # refused before minutes of training
    with pytest.raises(ReloadError, match="is the service up"):
        reload_service("http://127.0.0.1:9", TOKEN, timeout_s=2)
    popular = PopularRecommender.from_dataset(world)
    app = create_app(lambda: popular, settings=ServiceSettings(admin_token=TOKEN))
    with running_server(app) as url, pytest.raises(ReloadError, match="403"):
        reload_service(url, "wrong-token")
