"""register → promote (gated) → serve → reload under load → rollback, with the real feed model,
a real MLflow SQLite store and a real feature store (no mocks)."""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from mlsd.config import FeedConfig, load_feed_config
from mlsd.evaluation.experiments import Arm, Experiment
from mlsd.serving.app import create_app
from mlsd.serving.popular import PopularRecommender
from mlsd.serving.process import free_port, mlsd_command, running_service
from mlsd.serving.registry import CorruptArtifactError, ModelRegistry, RegistryConfig
from mlsd.serving.settings import ServiceSettings
from mlsd.systems.feed.package import package_model
from mlsd.systems.feed.serve import ExperimentLoader, ModelLoader, _stopped, online_features
from tests.feed_world import materialized_world
from tests.serving.test_app import running_server

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CONFIG = """
[retrieval]
sources = ["popularity", "segment_popularity", "covisitation"]
n_bootstrap = 20

[retrieval.merge]
quota_step = 0.25

[ranking]
rankers = ["logistic"]
n_candidates = 100
ranker_windows = 1
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(world, config, three model directories' parent)."""
    root = tmp_path_factory.mktemp("serve")
    world, config = materialized_world(root, CONFIG, seed=6)
    base, _ = package_model(world, root / "models" / "m1", load_feed_config(config), version="m1")
    for name in ("m2", "m3"):  # the same model under other versions: what serves is visible
        copy = root / "models" / name
        shutil.copytree(base, copy)
        meta = json.loads((copy / "model.json").read_text())
        (copy / "model.json").write_text(json.dumps({**meta, "version": name}))
    return world, config, root


def test_registry_gate_serve_reload_under_load_and_rollback(
    setup: tuple[Path, Path, Path],
) -> None:
    world, config, root = setup
    registry = ModelRegistry(RegistryConfig(), root)
    models = root / "models"
    v1 = registry.register(models / "m1", params={}, metrics={"ndcg@10": 0.30})
    v2 = registry.register(models / "m2", params={}, metrics={"ndcg@10": 0.20})
    v3 = registry.register(models / "m3", params={}, metrics={"ndcg@10": 0.31})
    assert registry.promote(v1).accepted
    refused = registry.promote(v2)
    assert not refused.accepted  # the gate keeps a worse model out
    assert registry.champion() == v1

    load = ModelLoader(
        world,
        load_feed_config(config),
        model_dir=None,
        registry_uri=None,
        base_dir=root,
    )
    app = create_app(
        load,
        settings=ServiceSettings(admin_token=TOKEN),
        fallback=PopularRecommender.from_dataset(world),
    )
    statuses: list[int] = []
    served: list[str] = []
    stop = threading.Event()

    def hammer(base_url: str, user_id: int) -> None:
        with httpx.Client(base_url=base_url, timeout=10) as http:
            while not stop.is_set():
                response = http.get(f"/v1/recommendations/{user_id}", params={"k": 10})
                statuses.append(response.status_code)
                if response.status_code == 200:
                    body = response.json()
                    served.append(body["model_version"])
                    assert body["path"] == "online", body
                    assert len(body["items"]) == 10

    with running_server(app) as base_url, httpx.Client(base_url=base_url, timeout=60) as admin:
        assert admin.get("/readyz").status_code == 200
        first = admin.get("/v1/recommendations/7", params={"explain": True}).json()
        assert first["model_version"] == "m1"
        workers = [threading.Thread(target=hammer, args=(base_url, u)) for u in (1, 2, 3)]
        for worker in workers:
            worker.start()
        time.sleep(0.5)
        assert registry.promote(v3).accepted  # a better model passes the gate
        reload = admin.post("/admin/reload", headers=AUTH)
        assert reload.status_code == 200, reload.text
        assert reload.json() == {"old_version": "m1", "new_version": "m3"}
        time.sleep(0.5)
        assert registry.rollback() == v1
        back = admin.post("/admin/reload", headers=AUTH)
        assert back.json()["new_version"] == "m1"
        time.sleep(0.3)
        stop.set()
        for worker in workers:
            worker.join(timeout=10)
        assert admin.post("/admin/reload").status_code == 401  # no token
        metrics = admin.get("/metrics").text
    assert set(statuses) == {200}, "a request failed during the reloads"
    assert {"m1", "m3"} <= set(served)
    assert served[-1] == "m1"
    assert 'mlsd_model_reloads_total{outcome="ok"}' in metrics


def test_a_replica_following_the_champion_takes_a_promotion_and_a_rollback(
    setup: tuple[Path, Path, Path],
) -> None:
    world, config, root = setup
    base = root / "follow"  # a registry of its own: the other tests' promotions stay out
    registry = ModelRegistry(RegistryConfig(), base)
    models = root / "models"
    v1 = registry.register(models / "m1", params={}, metrics={"ndcg@10": 0.30})
    v3 = registry.register(models / "m3", params={}, metrics={"ndcg@10": 0.31})
    assert registry.promote(v1).accepted
    load = ModelLoader(
        world, load_feed_config(config), model_dir=None, registry_uri=None, base_dir=base
    )
    assert load.changed()  # nothing loaded yet
    app = create_app(
        load,
        settings=ServiceSettings(admin_token=TOKEN),
        fallback=PopularRecommender.from_dataset(world),
        follow=load.changed,
        follow_interval_s=0.2,
    )

    def serving(http: httpx.Client, want: str) -> str:
        deadline = time.monotonic() + 30
        while True:
            version = http.get("/v1/recommendations/3", params={"k": 5}).json()["model_version"]
            if version == want or time.monotonic() > deadline:
                return str(version)
            time.sleep(0.1)

    with running_server(app) as base_url, httpx.Client(base_url=base_url, timeout=60) as http:
        assert serving(http, "m1") == "m1"
        assert load.loaded_version == v1
        assert registry.promote(v3).accepted  # no /admin/reload: the replica notices
        assert serving(http, "m3") == "m3"
        assert registry.rollback() == v1
        assert serving(http, "m1") == "m1"
        metrics = http.get("/metrics").text
    assert 'mlsd_model_reloads_total{outcome="ok"} 3.0' in metrics  # start-up + 2 follows


def register_corrupt(registry: ModelRegistry, base: Path, model: Path, version: str) -> int:
    """Register a copy of ``model`` as ``version`` (better offline, so the gate takes it),
    then tamper with the stored artifact: its manifest no longer matches."""
    copy = base.parent / f"{base.name}-{version}"
    shutil.copytree(model, copy)
    meta = json.loads((copy / "model.json").read_text())
    (copy / "model.json").write_text(json.dumps({**meta, "version": version}))
    number = registry.register(copy, params={}, metrics={"ndcg@10": 0.9})
    for stored in (base / "mlartifacts").rglob("model.json"):
        if json.loads(stored.read_text()).get("version") == version:
            (stored.parent / "ranking" / "calibrator.json").write_text("{}")
            return number
    raise AssertionError(f"no stored artifact of {version}")


def m1_m3_registry(root: Path, name: str) -> tuple[ModelRegistry, int, int]:
    """A registry of its own under ``root`` (other tests' promotions stay out) holding models
    m1 and m3, m1 the champion: (registry, v1, v3)."""
    registry = ModelRegistry(RegistryConfig(), root / name)
    v1 = registry.register(root / "models" / "m1", params={}, metrics={"ndcg@10": 0.30})
    v3 = registry.register(root / "models" / "m3", params={}, metrics={"ndcg@10": 0.31})
    assert registry.promote(v1).accepted
    return registry, v1, v3


def test_the_loader_keeps_the_serving_download_and_the_new_one_and_no_failed_one(
    setup: tuple[Path, Path, Path],
) -> None:
    world, config, root = setup
    base = root / "downloads-registry"
    registry, _, v3 = m1_m3_registry(root, base.name)
    feed = load_feed_config(config)
    load = ModelLoader(world, feed, model_dir=None, registry_uri=None, base_dir=base,
                       compile_trees=False)  # fmt: skip
    served = [load().version]
    assert registry.promote(v3).accepted
    served += [load().version, load().version]
    assert served == ["m1", "m3", "m3"]
    downloads = load.downloads
    assert sorted(p.name for p in downloads.iterdir()) == [f"v{v3}-1", f"v{v3}-2"]

    bad = register_corrupt(registry, base, root / "models" / "m2", "bad")
    assert registry.promote(bad).accepted
    for _ in range(2):  # a follower retries a broken champion
        with pytest.raises(CorruptArtifactError, match=r"calibrator\.json"):
            load()
        # The failed download is gone; the serving model's stays (its profile is read).
        assert [p.name for p in downloads.iterdir()] == [f"v{v3}-2"]
    assert load.loaded_version == v3
    assert load.changed()

    del load
    gc.collect()
    assert not downloads.exists()
    by_dir = ModelLoader(world, feed, model_dir=root / "models" / "m1", registry_uri=None,
                         base_dir=base, compile_trees=False)  # fmt: skip
    assert by_dir().version == "m1"
    assert by_dir._downloads is None  # a model directory downloads nothing


def _arm_loaders(
    world: Path, feed: FeedConfig, arms: Mapping[str, tuple[Path, str]]
) -> dict[str, ModelLoader]:
    """Each arm's loader of its registry's alias: arm → (registry folder, alias)."""
    return {
        arm: ModelLoader(
            world,
            feed,
            model_dir=None,
            registry_uri=None,
            base_dir=base,
            alias=alias,
            compile_trees=False,
        )
        for arm, (base, alias) in arms.items()
    }


def test_an_experiment_arm_that_fails_to_load_leaves_every_arm_to_be_loaded_again(
    setup: tuple[Path, Path, Path],
) -> None:
    world, config, root = setup
    feed = load_feed_config(config)
    registries = {arm: ModelRegistry(RegistryConfig(), root / f"arm-{arm}") for arm in "ab"}
    for registry in registries.values():
        first = registry.register(root / "models" / "m1", params={}, metrics={"ndcg@10": 0.3})
        assert registry.promote(first).accepted
    loaders = _arm_loaders(world, feed, {arm: (root / f"arm-{arm}", "champion") for arm in "ab"})
    experiment = Experiment("t", "salt", (Arm("a", "champion", 1.0), Arm("b", "champion", 1.0)))
    load = ExperimentLoader(experiment, loaders, world)
    load()
    assert not load.changed()

    newer = registries["a"].register(root / "models" / "m3", params={}, metrics={"ndcg@10": 0.4})
    assert registries["a"].promote(newer).accepted
    bad = register_corrupt(registries["b"], root / "arm-b", root / "models" / "m2", "bad-arm")
    assert registries["b"].promote(bad).accepted
    with pytest.raises(CorruptArtifactError, match=r"calibrator\.json"):
        load()
    # Arm a loaded its new champion, but the experiment kept serving the old one: a must
    # still count as changed, or the follower would never load it again.
    assert loaders["a"].loaded_version == 1
    assert load.changed()
    assert len(list(loaders["a"].downloads.iterdir())) == 1  # a's unused download is gone


def test_a_corrupt_artifact_is_refused_and_the_old_model_keeps_serving(
    setup: tuple[Path, Path, Path],
) -> None:
    world, config, root = setup
    base = root / "corrupt-registry"
    base.mkdir()
    registry = ModelRegistry(RegistryConfig(), base)
    good = registry.register(root / "models" / "m1", params={}, metrics={"ndcg@10": 0.3})
    assert registry.promote(good).accepted
    load = ModelLoader(world, load_feed_config(config), model_dir=None, registry_uri=None,
                       base_dir=base)  # fmt: skip
    app = create_app(load, settings=ServiceSettings(admin_token=TOKEN))
    bad_dir = root / "bad-model"
    shutil.copytree(root / "models" / "m2", bad_dir)
    bad = registry.register(bad_dir, params={}, metrics={"ndcg@10": 0.4})
    # Tamper with the stored artifact after registration: the manifest no longer matches.
    stored = next((base / "mlartifacts").rglob("ranking/calibrator.json"))
    for candidate in (base / "mlartifacts").rglob("model.json"):
        if json.loads(candidate.read_text()).get("version") == "m2":
            stored = candidate.parent / "ranking" / "calibrator.json"
    stored.write_text("{}")
    with running_server(app) as base_url, httpx.Client(base_url=base_url, timeout=60) as http:
        assert http.get("/v1/recommendations/3").json()["model_version"] == "m1"
        assert registry.promote(bad).accepted
        refused = http.post("/admin/reload", headers=AUTH)
        assert refused.status_code == 500
        assert "calibrator.json" in refused.text
        after = http.get("/v1/recommendations/3").json()
        assert after["model_version"] == "m1"
        assert after["path"] == "online"


@pytest.mark.integration
def test_batch_predict_command_writes_every_user_and_reports_its_cost(
    setup: tuple[Path, Path, Path], redis_server: str
) -> None:
    import redis
    from typer.testing import CliRunner

    from mlsd.cli import app

    world, config, root = setup
    model = root / "models" / "m1"
    url = f"redis://{redis_server}/3"
    args = ["feed", "batch-predict", "--dataset", str(world), "--config", str(config)]
    args += ["--model", str(model), "--redis", url, "--users", "7", "--chunk", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "7 users written for model m1" in result.output
    assert "ms per user" in result.output
    client = redis.Redis.from_url(url)
    assert sum(1 for _ in client.scan_iter("mlsd:feed:top:*")) == 7
    client.flushdb()


@pytest.mark.integration
def test_batch_predict_says_how_far_it_got_when_redis_fails(
    setup: tuple[Path, Path, Path],
    redis_server: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import redis

    from mlsd.cli import run
    from mlsd.serving.precomputed import PrecomputedStore

    write = PrecomputedStore.write
    calls = 0

    def fails_second(self: PrecomputedStore, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise redis.exceptions.ConnectionError("Connection reset by peer")
        return write(self, *args, **kwargs)

    monkeypatch.setattr(PrecomputedStore, "write", fails_second)
    world, config, root = setup
    args = ["feed", "batch-predict", "--dataset", str(world), "--config", str(config)]
    args += ["--model", str(root / "models" / "m1"), "--redis", f"redis://{redis_server}/5"]
    args += ["--users", "7", "--chunk", "3", "--workers", "1"]
    assert run(args) == 1  # a user's error to act on, not an internal one
    said = " ".join(capsys.readouterr().err.split())
    assert "Redis failed after 3 of 7 users were written (ConnectionError" in said
    assert "the lists are partial" in said
    redis.Redis.from_url(f"redis://{redis_server}/5").flushdb()


@pytest.mark.integration
def test_batch_predict_shards_split_the_users_between_them(
    setup: tuple[Path, Path, Path], redis_server: str
) -> None:
    import redis
    from typer.testing import CliRunner

    from mlsd.cli import app

    world, config, root = setup
    url = f"redis://{redis_server}/4"
    args = ["feed", "batch-predict", "--dataset", str(world), "--config", str(config)]
    args += ["--model", str(root / "models" / "m1"), "--redis", url, "--users", "7"]
    client = redis.Redis.from_url(url)
    client.flushdb()
    written: list[set[bytes]] = []
    for shard in ("0/2", "1/2"):
        before = set(client.scan_iter("mlsd:feed:top:*"))
        result = CliRunner().invoke(app, [*args, "--shard", shard, "--workers", "1"])
        assert result.exit_code == 0, result.output
        assert f"shard {shard}: predicted from 20" in result.output
        written.append(set(client.scan_iter("mlsd:feed:top:*")) - before)
    assert [len(keys) for keys in written] == [4, 3]  # users 0, 2, 4, 6 and 1, 3, 5
    sharded = written[0] | written[1]
    client.flushdb()
    assert CliRunner().invoke(app, args).exit_code == 0
    assert set(client.scan_iter("mlsd:feed:top:*")) == sharded
    client.flushdb()
    # Forked from one load: the same users, and CPU counted over the children too.
    forked = CliRunner().invoke(app, [*args, "--processes", "2"])
    assert forked.exit_code == 0, forked.output
    assert "7 users written" in forked.output
    assert set(client.scan_iter("mlsd:feed:top:*")) == sharded
    cpu_ms = float(re.search(r"CPU: ([\d.]+) ms per user", forked.output).group(1))  # type: ignore[union-attr]
    assert cpu_ms > 0
    client.flushdb()
    for bad in ("2/2", "1", "-1/2", "a/b"):
        refused = CliRunner().invoke(app, [*args, "--shard", bad])
        assert refused.exit_code == 2, refused.output
        assert "0 <= I < N" in refused.output


def test_batch_predict_without_redis_is_a_users_error_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlsd.cli import run

    url = f"redis://127.0.0.1:{free_port()}"
    args = ["feed", "batch-predict", "--dataset", str(tmp_path), "--redis", url]
    assert run([*args, "--model", str(tmp_path / "no-model")]) == 1  # not 2: no internal error
    err = capsys.readouterr().err
    assert f"--redis {url}: cannot reach Redis" in " ".join(err.split())
    assert "internal error" not in err


@pytest.mark.parametrize(("option", "value"), [("--k", "0"), ("--ttl", "0"), ("--k", "70000")])
def test_batch_predict_refuses_a_bad_k_or_ttl_before_anything_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str
) -> None:
    from mlsd.cli import run

    url = f"redis://127.0.0.1:{free_port()}"  # nothing listens: the options fail first
    args = ["feed", "batch-predict", "--dataset", str(tmp_path), "--redis", url]
    assert run([*args, option, value]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"Invalid value for '{option}'" in err
    assert "cannot reach Redis" not in err


@pytest.mark.integration
def test_stopping_the_served_cli_deletes_its_model_downloads(
    setup: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """uvicorn re-raises the SIGTERM it caught once it shut down, so the process dies before
    any interpreter-exit cleanup: the downloads must go at the app's shutdown, and so must the
    child that applies pushed events (``[feature_store] push_process``, on by default)."""
    world, config, root = setup
    base = root / "sigterm-registry"
    registry, v1, v3 = m1_m3_registry(root, base.name)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    port = free_port()
    command = mlsd_command(
        "feed", "serve", "--dataset", str(world), "--config", str(config), "--base-dir",
        str(base), "--port", str(port), "--no-log", "--no-compile-trees", "--ui",
    )  # fmt: skip
    env = {**os.environ, "TMPDIR": str(tmp), "MLSD_ADMIN_TOKEN": TOKEN, "MLSD_UI": "0"}
    url = f"http://127.0.0.1:{port}"
    with running_service(command, url=url, output=tmp_path / "serve.log", env=env) as proc:
        downloads = list(tmp.glob("mlsd-models-*"))
        assert len(downloads) == 1, downloads
        assert [p.name for p in downloads[0].iterdir()] == [f"v{v1}-0"]
        assert registry.promote(v3).accepted
        reload = httpx.post(f"{url}/admin/reload", headers=AUTH, timeout=60)
        assert reload.json()["new_version"] == "m3", reload.text
        # While it serves, the serving model's download stays (its profile is read), and the
        # one before it until the next download.
        assert sorted(p.name for p in downloads[0].iterdir()) == [f"v{v1}-0", f"v{v3}-1"]
        assert not list(tmp.glob("feast_metrics_*"))  # Feast's import made one: removed
        user = 10**9 + 11
        events = [{"user_id": user, "item_id": i, "event": "click"} for i in (4, 9)]
        posted = httpx.post(f"{url}/v1/events", json=events, timeout=60)
        assert posted.json() == {"accepted": 2}, posted.text
        # --ui over MLSD_UI=0: the history endpoint serves
        history = httpx.get(f"{url}/v1/users/{user}/history", timeout=30).json()
        assert sorted(history["items"]) == [4, 9], history  # read back at once
        children = psutil.Process(proc.pid).children(recursive=True)
        pushers = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
        assert len(pushers) == 1, [c.cmdline() for c in children]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        psutil.wait_procs(pushers, timeout=10)
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in pushers)
    assert not list(tmp.glob("mlsd-models-*")), (tmp_path / "serve.log").read_text()
    assert not list(tmp.glob("feast_metrics_*"))  # nor the push child's, nor a later one


def test_a_stopping_service_stops_its_push_process_before_it_exits(
    setup: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the served CLI runs at shutdown (:func:`_stopped`): the child is gone when it
    returns, not only once the server's exit closes its pipe."""
    # The child is stopped seconds after it starts: on a busy machine it may still be importing
    # Feast, which makes its metrics folder before mlsd can remove it; keep that out of /tmp.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    world, config, root = setup
    feed = load_feed_config(config)
    features = online_features(world, feed)
    features.start_push_process()
    pusher = features._pusher
    assert pusher is not None
    pid = pusher.pid
    assert pid is not None
    load = ModelLoader(
        world, feed, model_dir=root / "models" / "m1", registry_uri=None, base_dir=tmp_path,
        features=features,
    )  # fmt: skip
    load()
    _stopped(load, features)
    assert features._pusher is None
    assert not psutil.pid_exists(pid)  # stopped and reaped
    _stopped(load, features)  # idempotent


def test_closing_an_experiment_loader_deletes_every_arms_downloads(
    setup: tuple[Path, Path, Path],
) -> None:
    world, config, root = setup
    feed = load_feed_config(config)
    base = root / "close-registry"
    registry = ModelRegistry(RegistryConfig(), base)
    first = registry.register(root / "models" / "m1", params={}, metrics={"ndcg@10": 0.3})
    assert registry.promote(first).accepted
    registry.set_alias("challenger", first)
    loaders = _arm_loaders(world, feed, {"a": (base, "champion"), "b": (base, "challenger")})
    experiment = Experiment("t", "salt", (Arm("a", "champion", 1.0), Arm("b", "challenger", 1.0)))
    load = ExperimentLoader(experiment, loaders, world)
    load()
    folders = [loader.downloads for loader in loaders.values()]
    assert all(any(folder.iterdir()) for folder in folders)
    load.close()
    assert not any(folder.exists() for folder in folders)
    load.close()  # twice is harmless


def test_serve_on_a_taken_port_fails_before_loading_and_names_the_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    from mlsd.cli import run

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # No dataset at all: the port is checked before anything loads.
        code = run(["feed", "serve", "--dataset", str(tmp_path / "none"), "--port", str(port)])
    out, err = capsys.readouterr()
    assert code == 1
    assert "serving on" not in out
    said = " ".join(err.split())
    assert f"port {port} on 127.0.0.1 is already in use" in said
    assert f"--port {port + 1}" in said
    assert "internal error" not in said
