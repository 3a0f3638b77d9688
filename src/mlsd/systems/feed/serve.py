"""``mlsd feed serve``: the feed's online service on a model directory or the registry's champion.

The service (:mod:`mlsd.serving.app`) asks a loader for the model at start-up and on each
``POST /admin/reload``; with ``--registry``, the loader downloads and verifies the current
``champion`` and builds a :class:`~mlsd.serving.feed.FeedRecommender` over it, so promoting a
version and reloading swaps it in without a restart. The popularity recommender of the dataset
answers when the model cannot.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mlsd.config import FeedConfig, load_feed_config
from mlsd.systems.feed.commands import ConfigFile, DatasetDir, app, console
from mlsd.systems.feed.registry_commands import BaseDir, RegistryUri, open_registry

if TYPE_CHECKING:  # kept out of the CLI's import time
    from mlsd.serving.recommender import Recommender


def feed_loader(
    dataset: Path,
    feed: FeedConfig,
    *,
    model_dir: Path | None,
    registry_uri: str | None,
    base_dir: Path,
    alias: str = "champion",
    redis_url: str | None = None,
) -> Callable[[], Recommender]:
    """A function that loads the model (a directory, or the registry's ``alias``) afresh."""
    from mlsd.features.batch import feature_config_for
    from mlsd.features.online import OnlineFeatures
    from mlsd.serving.feed import FeedModel, FeedRecommender
    from mlsd.serving.precomputed import PrecomputedStore

    feature_config = feature_config_for(dataset, **vars(feed.features))
    repo = feed.feature_store.repo_path(dataset)
    features = OnlineFeatures(repo, feature_config)
    precomputed = None
    if redis_url is not None:
        import redis

        precomputed = PrecomputedStore(redis.Redis.from_url(redis_url, socket_timeout=0.05))
    downloads = Path(tempfile.mkdtemp(prefix="mlsd-models-"))

    def load() -> Recommender:
        if model_dir is not None:
            path = model_dir
        else:
            registry = open_registry(registry_uri, base_dir)
            champion = registry.champion()
            if champion is None:
                raise ValueError("the registry has no champion yet: mlsd feed promote --version N")
            attempt = len(list(downloads.iterdir()))
            path = registry.download(alias, downloads / f"v{champion}-{attempt}")
        model = FeedModel.load(path)
        return FeedRecommender(model, features=features, precomputed=precomputed).warm_up()

    return load


@app.command("serve")
def serve(
    dataset: DatasetDir,
    config: ConfigFile = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="A model directory (default: the registry).")
    ] = None,
    registry_uri: RegistryUri = None,
    base_dir: BaseDir = Path(),
    redis_url: Annotated[
        str | None,
        typer.Option("--redis", envvar="MLSD_REDIS_URL", help="Precomputed lists (redis://...)."),
    ] = None,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8000,
) -> None:
    """Step 6: serve recommendations, events, metrics and the UI (FastAPI under uvicorn)."""
    from mlsd.serving.app import ServiceSettings, create_app
    from mlsd.serving.app import serve as run_server
    from mlsd.serving.popular import PopularRecommender

    feed = load_feed_config(config)
    load = feed_loader(
        dataset,
        feed,
        model_dir=model,
        registry_uri=registry_uri,
        base_dir=base_dir,
        redis_url=redis_url,
    )
    web = create_app(
        load, settings=ServiceSettings.from_env(), fallback=PopularRecommender.from_dataset(dataset)
    )
    console.print(f"serving on http://{host}:{port} (UI: http://{host}:{port}/ui)")
    run_server(web, host, port)


@app.command("batch-predict")
def batch_predict_command(
    dataset: DatasetDir,
    redis_url: Annotated[
        str, typer.Option("--redis", envvar="MLSD_REDIS_URL", help="Where lists go (redis://).")
    ],
    config: ConfigFile = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="A model directory (default: the registry).")
    ] = None,
    registry_uri: RegistryUri = None,
    base_dir: BaseDir = Path(),
    k: Annotated[int, typer.Option("--k", help="Items per user.")] = 100,
    users: Annotated[
        int | None, typer.Option("--users", help="Only the first N users (default: all).")
    ] = None,
    ttl_s: Annotated[int, typer.Option("--ttl", help="Seconds a list lives.")] = 86_400,
) -> None:
    """Step 6, offline path: top-K per user into Redis for the serving model version."""
    import pandas as pd
    import redis

    from mlsd.data.schema import USERS_FILE
    from mlsd.serving.feed import FeedRecommender, batch_predict
    from mlsd.serving.precomputed import PrecomputedStore

    feed = load_feed_config(config)
    load = feed_loader(dataset, feed, model_dir=model, registry_uri=registry_uri, base_dir=base_dir)
    recommender = load()
    if not isinstance(recommender, FeedRecommender):
        raise ValueError("batch-predict needs a feed model")
    ids = pd.read_parquet(Path(dataset) / USERS_FILE, columns=["user_id"])["user_id"]
    chosen = ids.to_numpy()[:users] if users is not None else ids.to_numpy()
    store = PrecomputedStore(redis.Redis.from_url(redis_url), ttl_s=ttl_s)
    written, rate = batch_predict(recommender, store, list(chosen), k=k, progress=True)
    console.print(
        f"{written:,} users written for model {recommender.version} ({rate:,.0f} users/s)"
    )
