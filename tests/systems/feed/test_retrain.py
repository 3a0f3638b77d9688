"""``mlsd feed retrain``: the gate keeps a worse model out, lets a better one in, and the running
service reloads it; a real MLflow SQLite registry, a real feature store, a real uvicorn server."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from mlsd.cli import run
from mlsd.config import load_feed_config
from mlsd.serving.app import ServiceSettings, create_app
from mlsd.serving.popular import PopularRecommender
from mlsd.serving.registry import ModelRegistry, RegistryConfig
from mlsd.systems.feed import retrain as retrain_module
from mlsd.systems.feed.package import package_model
from mlsd.systems.feed.retrain import ReloadError, reload_service
from mlsd.systems.feed.serve import feed_loader
from tests.feed_world import materialized_world
from tests.serving.test_app import running_server
from tests.systems.feed.test_serve import CONFIG, TOKEN

assert retrain_module.retrain is not None  # importing the module registers the command


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(world with its online store, config, a packaged model directory)."""
    root = tmp_path_factory.mktemp("retrain")
    world, config = materialized_world(root, CONFIG, seed=8)
    model, _ = package_model(world, root / "champion", load_feed_config(config), version="old")
    return world, config, model


def champion_with(registry: ModelRegistry, model: Path, ndcg: float) -> int:
    """Register ``model`` with a made-up gate value and make it the champion."""
    version = registry.register(model, params={}, metrics={"ndcg@10": ndcg})
    assert registry.promote(version, force=True).accepted
    return version


def retrain_args(world: Path, config: Path, base: Path, *extra: str) -> list[str]:
    return ["feed", "retrain", "--dataset", str(world), "--config", str(config),
            "--base-dir", str(base), "--out", str(base / "new-model"), *extra]  # fmt: skip


def test_the_gate_refuses_a_worse_model(
    setup: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world, config, model = setup
    registry = ModelRegistry(RegistryConfig(), tmp_path)
    champion = champion_with(registry, model, ndcg=0.99)  # no real model reaches this
    assert run(retrain_args(world, config, tmp_path)) == retrain_module.EXIT_REFUSED
    out = capsys.readouterr().out
    assert "refused" in out
    assert f"champion remains v{champion}" in out
    assert registry.champion() == champion
    assert [v.version for v in registry.versions()] == [
        champion,
        champion + 1,
    ]  # kept, not promoted


def test_a_better_model_is_promoted_and_the_running_service_reloads_it(
    setup: tuple[Path, Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    world, config, model = setup
    registry = ModelRegistry(RegistryConfig(), tmp_path)
    old = champion_with(registry, model, ndcg=0.0)  # any real model beats this
    load = feed_loader(world, load_feed_config(config), model_dir=None, registry_uri=None,
                       base_dir=tmp_path)  # fmt: skip
    app = create_app(load, settings=ServiceSettings(admin_token=TOKEN))
    monkeypatch.setenv("MLSD_ADMIN_TOKEN", TOKEN)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/v1/recommendations/3").json()["model_version"] == "old"
        assert run(retrain_args(world, config, tmp_path, "--reload-url", url)) == 0
        served = http.get("/v1/recommendations/3").json()["model_version"]
    out = capsys.readouterr().out
    assert registry.champion() == old + 1
    assert "accepted" in out
    assert "reloaded" in out
    new_version = (tmp_path / "new-model" / "model.json").read_text()
    assert served != "old"
    assert f'"version": "{served}"' in new_version


def test_reload_errors_are_clear_and_checked_before_training(
    setup: tuple[Path, Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    world, config, _ = setup
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
