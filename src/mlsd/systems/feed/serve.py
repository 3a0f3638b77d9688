"""``mlsd feed serve``: the feed's online service on a model directory or the registry's champion.

The service (:mod:`mlsd.serving.app`) asks a loader for the model at start-up and on each
``POST /admin/reload``; with ``--registry``, the loader downloads and verifies the current
``champion`` and builds a :class:`~mlsd.serving.feed.FeedRecommender` over it, so promoting a
version and reloading swaps it in without a restart. The popularity recommender of the dataset
answers when the model cannot. Requests, exposures and feedback go to the service log
(``[service_log]`` of the config, ``--log-dir``; :mod:`mlsd.monitoring.logs`).

``mlsd feed balance`` runs nginx in front of replicas of the service
(:mod:`mlsd.serving.balancer`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import re
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mlsd.config import FeedConfig
from mlsd.systems.feed.commands import ConfigFile, DatasetDir, app, console, load_config
from mlsd.systems.feed.logs_commands import LogDir
from mlsd.systems.feed.registry_commands import BaseDir, RegistryUri, open_registry

if TYPE_CHECKING:  # kept out of the CLI's import time
    from collections.abc import AsyncIterator, Callable

    from fastapi import FastAPI

    from mlsd.evaluation.experiments import Experiment
    from mlsd.features.online import OnlineFeatures
    from mlsd.serving.periodic import MonitorSettings
    from mlsd.serving.recommender import Recommender


CompileTrees = Annotated[
    bool,
    typer.Option(
        "--compile-trees/--no-compile-trees",
        help="Compile the ranker's LightGBM trees to native code at load (lleaves): the same "
        "scores, about 8x faster.",
    ),
]


class ModelLoader:
    """Loads the model (a directory, or the registry's ``alias``) afresh on each call, and
    tells whether the registry has moved ``alias`` since (:meth:`changed`): what a replica
    following the champion polls (``mlsd feed serve --follow-champion``).

    ``features``: the online feature reader to use (default: a new one on the dataset's
    store); loaders of several models share one, so feedback is written once.

    Registry downloads go to a temporary directory of the loader's own, made at the first
    download. A download that fails, or whose model fails to load, is deleted at once; a new
    download deletes every earlier one but the serving model's (its reference profile is read
    while it serves). So a replica that reloads every day, or retries a broken champion, keeps
    at most two models on disk; the directory goes at :meth:`close` (``mlsd feed serve`` calls
    it at the service's shutdown), else when the loader is collected.

    A call is :meth:`prepare` then :meth:`commit`; :class:`ExperimentLoader` prepares every
    arm before it commits any, so an arm that fails leaves none of them marked as loaded."""

    def __init__(
        self,
        dataset: Path,
        feed: FeedConfig,
        *,
        model_dir: Path | None,
        registry_uri: str | None,
        base_dir: Path,
        alias: str = "champion",
        redis_url: str | None = None,
        features: OnlineFeatures | None = None,
        compile_trees: bool = True,
        inline_trees: bool = False,
    ) -> None:
        from mlsd.serving.precomputed import PrecomputedStore

        self.feed = feed
        self.compile_trees, self.inline_trees = compile_trees, inline_trees
        self.model_dir = model_dir
        self.registry_uri, self.base_dir, self.alias = registry_uri, base_dir, alias
        self.features = features if features is not None else online_features(dataset, feed)
        self.precomputed = None
        if redis_url is not None:
            self.precomputed = PrecomputedStore.from_url(redis_url, socket_timeout=0.05)
        self._downloads: Path | None = None
        self._cleanup: weakref.finalize[..., ModelLoader] | None = None  # deletes _downloads, once
        self._serving: Path | None = None  # the loaded model's download
        self._pending: tuple[int | None, Path | None] | None = None
        self.loaded_version: int | None = None
        """The registry version the last committed call loaded (None: a directory)."""

    def __call__(self) -> Recommender:
        model = self.prepare()
        self.commit()
        return model

    def prepare(self) -> Recommender:
        """Download (from the registry) and load the model, ready to serve, without marking it
        loaded (:meth:`commit`, or :meth:`discard` to drop its download)."""
        from mlsd.serving.feed import FeedRecommender
        from mlsd.serving.feed_model import FeedModel

        self.discard()
        version: int | None = None
        download: Path | None = None
        try:
            path = self.model_dir
            if path is None:
                registry = open_registry(self.registry_uri, self.base_dir, must_exist=True)
                version = registry.alias_version(self.alias)
                if version is None:
                    how = (
                        "mlsd feed promote --version N"
                        if self.alias == registry.config.champion_alias
                        else f"mlsd feed alias --name {self.alias} --version N"
                    )
                    raise ValueError(
                        f"the registry has no version with the alias {self.alias!r} yet "
                        f"(model {registry.config.model_name!r}); set it with: {how}"
                    )
                download = self._download_dir(version)
                # The number, not the alias: the alias may move while this downloads.
                path = registry.download(version, download)
            model = FeedRecommender(
                FeedModel.load(
                    path, compile_trees=self.compile_trees, inline_trees=self.inline_trees
                ),
                features=self.features,
                precomputed=self.precomputed,
                candidates_sample_rate=self.feed.service_log.candidates_sample_rate,
            ).warm_up()
        except BaseException:
            if download is not None:
                shutil.rmtree(download, ignore_errors=True)
            raise
        self._pending = (version, download)
        return model

    def commit(self) -> None:
        """Mark the model :meth:`prepare` gave as the loaded one."""
        if self._pending is None:
            raise RuntimeError("ModelLoader.commit: nothing prepared")
        self.loaded_version, download = self._pending
        self._serving = download if download is not None else self._serving
        self._pending = None

    def discard(self) -> None:
        """Forget a prepared, uncommitted model and delete its download."""
        if self._pending is not None:
            _, download = self._pending
            if download is not None:
                shutil.rmtree(download, ignore_errors=True)
            self._pending = None

    @property
    def downloads(self) -> Path:
        """The directory registry downloads go to (made on first use)."""
        if self._downloads is None:
            self._downloads = Path(tempfile.mkdtemp(prefix="mlsd-models-"))
            # At collection or a normal interpreter exit; a server stopped by a signal may
            # never get there, hence :meth:`close`.
            self._cleanup = weakref.finalize(
                self, shutil.rmtree, self._downloads, ignore_errors=True
            )
        return self._downloads

    def close(self) -> None:
        """Delete every download, the serving model's too: call it when the service stops
        (idempotent; a later load downloads into a new directory)."""
        self._pending = None
        self._serving = None
        if self._cleanup is not None:
            self._cleanup()  # a finalizer runs its rmtree at most once
        self._downloads, self._cleanup = None, None

    def _download_dir(self, version: int) -> Path:
        """A new directory for a download of ``version``, after deleting every earlier one but
        the serving model's."""
        attempts = sorted(
            (int(p.name.rsplit("-", 1)[1]), p) for p in self.downloads.glob("v*-*") if p.is_dir()
        )
        for _, old in attempts:
            if old != self._serving:
                shutil.rmtree(old, ignore_errors=True)
        attempt = attempts[-1][0] + 1 if attempts else 0
        return self.downloads / f"v{version}-{attempt}"

    def changed(self) -> bool:
        """Whether the registry's ``alias`` names another version than the one loaded (never
        for a model directory)."""
        if self.model_dir is not None:
            return False
        registry = open_registry(self.registry_uri, self.base_dir)
        if not registry.exists():
            return False  # nothing to follow yet (and opening it would create an empty one)
        return registry.alias_version(self.alias) != self.loaded_version


def online_features(dataset: Path, feed: FeedConfig) -> OnlineFeatures:
    """The online feature reader of ``dataset``'s feature store."""
    from mlsd.features.batch import feature_config_for
    from mlsd.features.online import OnlineFeatures

    config = feature_config_for(dataset, **vars(feed.features))
    return OnlineFeatures(feed.feature_store.repo_path(dataset), config)


def experiment_loader(
    dataset: Path,
    feed: FeedConfig,
    experiment: Experiment,
    *,
    model_dir: Path | None,
    registry_uri: str | None,
    base_dir: Path,
    redis_url: str | None = None,
    compile_trees: bool = True,
    features: OnlineFeatures | None = None,
) -> ExperimentLoader:
    """A loader of every arm of ``experiment`` behind one
    :class:`~mlsd.serving.experiment.ExperimentRecommender`.

    An arm's ``alias`` names a registry alias (``champion``, ``challenger``, ...; ``mlsd feed
    alias --name challenger --version N`` sets one other than the champion), or
    ``popular`` for the popularity baseline. With ``model_dir`` every registry alias loads
    that directory instead (an A/B test of the baseline against one model). ``features``: the
    online feature reader every arm shares (default: a new one on the dataset's store)."""
    from mlsd.serving.experiment import POPULAR_ALIAS

    if features is None:
        features = online_features(dataset, feed)
    loaders = {
        arm.name: ModelLoader(
            dataset,
            feed,
            model_dir=model_dir,
            registry_uri=registry_uri,
            base_dir=base_dir,
            alias=arm.alias,
            redis_url=redis_url,
            features=features,
            compile_trees=compile_trees,
        )
        for arm in experiment.arms
        if arm.alias != POPULAR_ALIAS
    }

    return ExperimentLoader(experiment, loaders, dataset, feed.ranking.rerank.blocklist)


class ExperimentLoader:
    """Every arm of an experiment loaded afresh on each call (see :func:`experiment_loader`);
    :meth:`changed` when any arm's registry alias moved."""

    def __init__(
        self,
        experiment: Experiment,
        loaders: dict[str, ModelLoader],
        dataset: Path,
        blocklist: tuple[int, ...] = (),
    ) -> None:
        self.experiment, self.loaders, self.dataset = experiment, loaders, dataset
        self.blocklist = blocklist  # the popular arm never shows what the feed's blocklist holds

    def __call__(self) -> Recommender:
        from mlsd.serving.experiment import POPULAR_ALIAS, ExperimentRecommender
        from mlsd.serving.popular import PopularRecommender

        arms: dict[str, Recommender] = {}
        try:
            for name, load in self.loaders.items():
                arms[name] = load.prepare()
            for arm in self.experiment.arms:
                if arm.alias == POPULAR_ALIAS:
                    arms[arm.name] = PopularRecommender.from_dataset(
                        self.dataset, blocklist=self.blocklist
                    )
        except BaseException:
            for load in self.loaders.values():
                load.discard()
            raise
        for load in self.loaders.values():
            load.commit()
        return ExperimentRecommender(self.experiment, arms)

    def changed(self) -> bool:
        return any(load.changed() for load in self.loaders.values())

    def close(self) -> None:
        """Delete every arm's downloads (:meth:`ModelLoader.close`)."""
        for load in self.loaders.values():
            load.close()


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
    log_dir: LogDir = None,
    no_log: Annotated[bool, typer.Option("--no-log", help="Do not write the service log.")] = False,
    ui: Annotated[
        bool | None,
        typer.Option(
            "--ui/--no-ui",
            help="Serve the demo page and the user endpoints it reads (any user's recent "
            "items, to anyone who asks). Default: MLSD_UI, else off.",
        ),
    ] = None,
    access_log: Annotated[
        bool, typer.Option("--access-log", help="Also print uvicorn's line per request.")
    ] = False,
    reuse_port: Annotated[
        bool,
        typer.Option(
            "--reuse-port",
            help="SO_REUSEPORT: replicas of this command share --port (one core each).",
        ),
    ] = False,
    follow_champion: Annotated[
        float,
        typer.Option(
            "--follow-champion",
            min=0,
            help="Every N seconds, reload when the registry's champion moved (0: only on "
            "POST /admin/reload). For replicas: each follows on its own.",
        ),
    ] = 0.0,
    experiment: Annotated[
        str | None,
        typer.Option(
            "--experiment",
            help="Run this [experiments] entry (default: its `active` one; 'none': no experiment).",
        ),
    ] = None,
    compile_trees: CompileTrees = True,
    push_process: Annotated[
        bool | None,
        typer.Option(
            "--push-process/--no-push-process",
            help="Apply POST /v1/events pushes in a child process (default: [feature_store] "
            "push_process, on), or in the serving process.",
        ),
    ] = None,
    cpu_latency_us: Annotated[
        int | None,
        typer.Option(
            "--cpu-latency-us",
            min=0,
            help="While serving, keep the machine's CPUs out of idle states slower than this "
            "to wake from (PM QoS, /dev/cpu_dma_latency; needs root); 0: idle CPUs poll.",
        ),
    ] = None,
) -> None:
    """Step 6: serve recommendations, events, metrics and the UI (FastAPI under uvicorn)."""
    from mlsd.serving.app import create_app
    from mlsd.serving.app import serve as run_server
    from mlsd.serving.cpu_latency import cpu_latency_limit
    from mlsd.serving.popular import PopularRecommender
    from mlsd.serving.settings import ServiceSettings

    if follow_champion > 0 and model is not None:
        raise typer.BadParameter("needs the registry: drop --model", param_hint="--follow-champion")
    check_port(host, port, reuse_port=reuse_port)  # before a minute of loading
    with contextlib.ExitStack() as held:
        if cpu_latency_us is not None:  # before the model loads: a refusal is quick
            try:
                applied = held.enter_context(cpu_latency_limit(cpu_latency_us))
            except OSError as err:
                raise typer.BadParameter(str(err), param_hint="--cpu-latency-us") from err
            console.print(f"CPU wake-up latency bound: {applied} µs while serving")
        feed = load_config(config)
        log = None
        if feed.service_log.enabled and not no_log:
            log = feed.service_log.open(log_dir or feed.service_log.path(base_dir))
        running = _experiment(feed, experiment)
        features = online_features(dataset, feed)
        if feed.feature_store.push_process if push_process is None else push_process:
            features.start_push_process(timeout_s=feed.feature_store.push_timeout_s)
            held.callback(features.close)
        load: ModelLoader | ExperimentLoader
        if running is None:
            load = ModelLoader(
                dataset,
                feed,
                model_dir=model,
                registry_uri=registry_uri,
                base_dir=base_dir,
                redis_url=redis_url,
                compile_trees=compile_trees,
                features=features,
            )
        else:
            load = experiment_loader(
                dataset,
                feed,
                running,
                model_dir=model,
                registry_uri=registry_uri,
                base_dir=base_dir,
                redis_url=redis_url,
                compile_trees=compile_trees,
                features=features,
            )
            arms = ", ".join(f"{a.name} ({a.alias}, {a.weight:g})" for a in running.arms)
            console.print(f"experiment {running.name}: {arms}")
        held.callback(_stopped, load, features)  # when it stops on an exception or Ctrl-C
        settings = ServiceSettings.from_env()
        if ui is not None:
            settings = dataclasses.replace(settings, ui=ui)
        settings.apply_to_process()
        web = create_app(
            load,
            settings=settings,
            fallback=PopularRecommender.from_dataset(
                dataset, blocklist=feed.ranking.rerank.blocklist
            ),
            log=log,
            monitor=monitor_settings(feed, model),
            follow=load.changed if follow_champion > 0 else None,
            follow_interval_s=follow_champion,
        )
        close_at_shutdown(web, lambda: _stopped(load, features))  # when it stops on SIGTERM
        page = f"UI: http://{host}:{port}/ui" if settings.ui else "no UI: --ui serves it"
        console.print(f"serving on http://{host}:{port} ({page})")
        if log is not None:
            console.print(f"service log: {log.log_dir}")
        run_server(web, host, port, access_log=access_log, reuse_port=reuse_port)


def _stopped(load: ModelLoader | ExperimentLoader, features: OnlineFeatures) -> None:
    """What a stopping service leaves, removed: its push process and its model downloads
    (Feast's metrics folder went when Feast was imported: :func:`mlsd.remove_feast_metrics_dir`);
    both idempotent."""
    features.close()
    load.close()


def check_port(host: str, port: int, *, reuse_port: bool = False) -> None:
    """Fail, naming the address, when the service could not listen on ``host:port`` (e.g.
    another server holds the port); the service binds it again when it starts.

    Raises:
        ValueError: the port is taken, or the address cannot be bound.
    """
    from mlsd.serving.app import listen_socket

    try:
        listen_socket(host, port, reuse_port=reuse_port).close()
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise ValueError(
                f"port {port} on {host} is already in use (another `mlsd feed serve`, e.g. an "
                "earlier `make demo`, still running?); stop that server or serve on another "
                f"port with --port {port + 1} (make demo: DEMO_PORT={port + 1})"
            ) from err
        raise ValueError(
            f"cannot listen on {host}:{port} ({err.strerror or err}); check --host and --port"
        ) from err


def close_at_shutdown(web: FastAPI, close: Callable[[], None]) -> None:
    """Call ``close`` when ``web``'s lifespan ends: at the server's shutdown, or when its
    start-up fails.

    A ``finally`` around the server is not enough: uvicorn re-raises the SIGTERM it caught
    once it has shut down, and that signal's default action ends the process before any
    ``finally`` or interpreter-exit hook (``weakref.finalize``, ``atexit``) runs."""
    inner = web.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[Any]:
        try:
            async with inner(app) as state:
                yield state
        finally:
            close()

    web.router.lifespan_context = lifespan


def monitor_settings(feed: FeedConfig, model_dir: Path | None) -> MonitorSettings | None:
    """The service's monitor: ``[monitoring]``'s rules and window every
    ``[service_log].monitor_interval_s`` (``None`` when that is 0).

    The reference profile is ``model_dir``'s when it has one, else the serving model's own,
    looked up on every pass (a registry champion's travels in its model directory).
    """
    from mlsd.serving.feed_model import REFERENCE_PROFILE
    from mlsd.serving.periodic import MonitorSettings

    if feed.service_log.monitor_interval_s <= 0:
        return None
    profile = None if model_dir is None else Path(model_dir) / REFERENCE_PROFILE
    return MonitorSettings(
        rules=tuple(feed.monitoring.alerts),
        window=feed.monitoring.window_delta,
        interval_s=feed.service_log.monitor_interval_s,
        profile_path=profile if profile is not None and profile.is_file() else None,
        psi_threshold=feed.monitoring.psi_threshold,
        min_drift_requests=feed.monitoring.min_drift_requests,
        reference_ctr=feed.monitoring.reference_ctr,
        label_delay_s=feed.monitoring.label_delay_s,
    )


def _experiment(feed: FeedConfig, name: str | None) -> Experiment | None:
    if name == "none":
        return None
    if name is None:
        return feed.experiments.active_experiment
    return feed.experiments.get(name)


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its waited-for children (user + system)."""
    import resource
    import time

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return float(time.process_time() + children.ru_utime + children.ru_stime)


def parse_shard(shard: str | None) -> tuple[int, int]:
    """``"I/N"`` → ``(I, N)`` with ``0 <= I < N``; ``None`` → ``(0, 1)``, every user."""
    if shard is None:
        return 0, 1
    found = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
    if found is None or not 0 <= int(found.group(1)) < int(found.group(2)):
        raise typer.BadParameter(
            f"{shard!r}: expected I/N with 0 <= I < N, e.g. 0/2 and 1/2 for two machines",
            param_hint="--shard",
        )
    return int(found.group(1)), int(found.group(2))


BATCH_REDIS_TIMEOUT_S = 30.0
"""How long batch-predict waits on one Redis round trip before it fails."""


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
    k: Annotated[int, typer.Option("--k", min=1, max=65_535, help="Items per user.")] = 100,
    users: Annotated[
        int | None, typer.Option("--users", help="Only the first N users (default: all).")
    ] = None,
    ttl_s: Annotated[int, typer.Option("--ttl", min=1, help="Seconds a list lives.")] = 86_400,
    chunk: Annotated[
        int, typer.Option("--chunk", min=1, help="Users per batch through the ranker.")
    ] = 500,
    workers: Annotated[
        int, typer.Option("--workers", min=1, help="Threads, each taking chunks end to end.")
    ] = 2,
    processes: Annotated[
        int,
        typer.Option(
            "--processes",
            min=1,
            help="Fork this many one-thread workers from the loaded model (one per core); "
            "1: --workers threads in this process.",
        ),
    ] = 1,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            help="I/N: only every N-th user from the I-th (0-based), so N machines share the "
            "users (on one machine, --processes shares one model load).",
        ),
    ] = None,
    compile_trees: CompileTrees = True,
) -> None:
    """Step 6, offline path: top-K per user into Redis for the serving model version."""
    import gc
    from datetime import UTC, datetime

    import pandas as pd
    import redis

    from mlsd.data.schema import USERS_FILE
    from mlsd.serving.batch import batch_predict, batch_predict_processes
    from mlsd.serving.feed import FeedRecommender
    from mlsd.serving.precomputed import PrecomputedStore

    part, parts = parse_shard(shard)
    # a Redis that stops answering fails the job within the timeout instead of hanging it
    client = redis.Redis.from_url(redis_url, socket_timeout=BATCH_REDIS_TIMEOUT_S)
    try:  # before a minute of model loading, and as a user's mistake rather than a crash
        client.ping()
    except redis.RedisError as err:
        raise ValueError(
            f"--redis {redis_url}: cannot reach Redis ({err}); start redis-server there or "
            "pass the URL of a running one"
        ) from err
    feed = load_config(config)
    load = ModelLoader(
        dataset,
        feed,
        model_dir=model,
        registry_uri=registry_uri,
        base_dir=base_dir,
        compile_trees=compile_trees,
        inline_trees=True,  # a chunk's ~100K rows: ~30% faster trees for ~4 s more compiling
    )
    recommender = load()
    if not isinstance(recommender, FeedRecommender):
        raise ValueError("batch-predict needs a feed model")
    if recommender.features is not None:
        # One item snapshot for the whole batch (loaded by warm_up): every user is scored on
        # the same item features, and no re-read competes with the batch for the GIL.
        recommender.features.item_cache_ttl_s = float("inf")
        recommender.features.item_cache_check_s = float("inf")
    ids = pd.read_parquet(Path(dataset) / USERS_FILE, columns=["user_id"])["user_id"]
    chosen = (ids.to_numpy()[:users] if users is not None else ids.to_numpy())[part::parts]
    store = PrecomputedStore(client, ttl_s=ttl_s)
    # The ~430K objects of the loaded model, Feast and the libraries live through the run:
    # frozen, the collector's passes skip them (20K-item build: 0.009 instead of 0.054 ms of
    # collection per user).
    gc.freeze()
    cpu = _cpu_seconds()  # every thread of this process and of its finished children
    start = datetime.now(UTC)
    done = 0

    def count(n: int) -> None:
        nonlocal done
        done += n

    try:
        if processes > 1:
            written, rate = batch_predict_processes(
                recommender,
                store,
                list(chosen),
                k=k,
                chunk=chunk,
                processes=processes,
                progress=True,
            )
        else:
            written, rate = batch_predict(
                recommender,
                store,
                list(chosen),
                k=k,
                chunk=chunk,
                workers=workers,
                progress=True,
                on_chunk=count,
            )
    except redis.RedisError as err:
        raise ValueError(
            f"--redis {redis_url}: Redis failed after {done:,} of {len(chosen):,} users were "
            f"written ({type(err).__name__}: {str(err)[:200]}); the lists are partial: fix "
            "Redis and run again (rewriting a user's list is harmless)"
        ) from err
    finally:
        gc.unfreeze()
    end = datetime.now(UTC)
    cpu_ms = (_cpu_seconds() - cpu) * 1000 / max(written, 1)
    console.print(
        f"{written:,} users written for model {recommender.version} ({rate:,.0f} users/s)"
    )
    # Shards' rates add up only where their times overlap: the window lets a caller tell.
    console.print(f"shard {part}/{parts}: predicted from {start.isoformat()} to {end.isoformat()}")
    # CPU per user moves much less than users/s with what else the machine runs.
    console.print(f"CPU: {cpu_ms:.2f} ms per user ({cpu_ms * rate / 1000:.2f} cores busy)")


def _address(text: str) -> tuple[str, int]:
    """``host:port`` → (host, port), or a clear error naming the value."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise typer.BadParameter(f"{text!r} is not host:port (e.g. 127.0.0.1:8001)")
    return host, int(port)


@app.command("balance")
def balance(
    replicas: Annotated[
        list[str],
        typer.Option(
            "--replica", help="A replica's host:port (repeat): each a `mlsd feed serve --port`."
        ),
    ],
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8000,
    run_dir: Annotated[
        Path,
        typer.Option("--run-dir", help="nginx's configuration, pid, temporary files and log."),
    ] = Path("nginx"),
) -> None:
    """Step 6: nginx in front of service replicas, each request to the one with the fewest in
    flight (least_conn), over kept-alive connections; runs until stopped (Ctrl-C, SIGTERM)."""
    import signal

    from mlsd.serving.balancer import Nginx, NginxError

    upstreams = [_address(text) for text in replicas]
    front = Nginx((host, port), upstreams, run_dir.resolve())

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    try:
        front.start()
    except NginxError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    shown = ", ".join(f"{h}:{p}" for h, p in upstreams)
    console.print(f"balancing http://{host}:{port} over {shown} (config: {front.config_path})")
    try:
        code = front.wait()
        console.print(f"[red]nginx exited ({code}); its log: {run_dir / 'error.log'}[/red]")
        raise typer.Exit(1)
    except KeyboardInterrupt:
        pass
    finally:
        front.stop()
