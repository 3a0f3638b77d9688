"""``mlsd feed``: the personalized feed system's commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mlsd.config import FeedConfig, load_feed_config

app = typer.Typer(help="The personalized feed system.", no_args_is_help=True)
features_app = typer.Typer(
    help="Step 3b, features: the Feast repository and its online store.", no_args_is_help=True
)
app.add_typer(features_app, name="features")

console = Console()

DatasetDir = Annotated[Path, typer.Option("--dataset", help="Contract directory to read.")]
ConfigFile = Annotated[
    Path | None, typer.Option("--config", help="System config (default configs/feed.toml).")
]
RepoDir = Annotated[
    Path | None,
    typer.Option("--repo", help="Feast repository (default: [feature_store].repo_dir)."),
]
OnlineStore = Annotated[
    str | None, typer.Option("--online-store", help="Override the config: sqlite or redis.")
]


def _config(path: Path | None, online_store: str | None) -> FeedConfig:
    config = load_feed_config(path)
    return config if online_store is None else config.with_online_store(online_store)


@features_app.command("apply")
def features_apply(
    dataset: DatasetDir,
    config: ConfigFile = None,
    repo: RepoDir = None,
    online_store: OnlineStore = None,
) -> None:
    """Generate the Feast repository from the feature definitions and register it."""
    from mlsd.features.batch import feature_config_for
    from mlsd.features.definitions import feature_set
    from mlsd.features.store import apply, generate_repo

    cfg = _config(config, online_store)
    features = feature_set(feature_config_for(dataset, **vars(cfg.features)))
    repo_dir = generate_repo(
        repo or cfg.feature_store.repo_path(dataset),
        features,
        cfg.feature_store.store_config(),
    )
    apply(repo_dir)
    table = Table(title="feature repository applied", show_header=False, title_justify="left")
    table.add_row("repository", str(repo_dir))
    table.add_row("online store", cfg.feature_store.online_store)
    for group in ("user_static", "user_dynamic", "item", "context", "cross"):
        table.add_row(group, ", ".join(features.names(group)) or "-")
    console.print(table)


@features_app.command("materialize")
def features_materialize(
    dataset: DatasetDir,
    config: ConfigFile = None,
    repo: RepoDir = None,
    as_of: Annotated[
        str | None,
        typer.Option(
            "--as-of", help="Features as of this UTC time (default: after the last event)."
        ),
    ] = None,
    online_store: OnlineStore = None,
) -> None:
    """Compute every user's and item's features as of a time and load the online store."""
    import pandas as pd

    from mlsd.data.schema import read_info
    from mlsd.data.split import parse_timestamp
    from mlsd.features.batch import feature_config_for
    from mlsd.features.store import materialize

    cfg = _config(config, online_store)
    if as_of is None:
        ts_max = read_info(dataset).ts_max
        when = pd.Timestamp(ts_max) + pd.Timedelta(microseconds=1) if ts_max else None
        if when is None:
            raise typer.BadParameter("the dataset has no events; give --as-of")
    else:
        when = parse_timestamp(as_of)
    report = materialize(
        dataset,
        repo or cfg.feature_store.repo_path(dataset),
        as_of=when,
        config=feature_config_for(dataset, **vars(cfg.features)),
    )
    table = Table(title="materialized", show_header=False, title_justify="left")
    table.add_row("as of", str(report.as_of))
    table.add_row("users", f"{report.n_users:,}")
    table.add_row("items", f"{report.n_items:,}")
    table.add_row("snapshot", f"{report.snapshot_seconds:.2f} s")
    table.add_row("load online store", f"{report.materialize_seconds:.2f} s")
    console.print(table)


@features_app.command("get")
def features_get(
    dataset: DatasetDir,
    user: Annotated[int, typer.Option("--user", help="User id to read.")],
    items: Annotated[
        str | None,
        typer.Option("--items", help="Comma-separated candidate item ids (default: first 5)."),
    ] = None,
    config: ConfigFile = None,
    repo: RepoDir = None,
    online_store: OnlineStore = None,
) -> None:
    """Read one request's features from the online store, as the service will."""
    import time

    import numpy as np
    import pandas as pd

    from mlsd.data.schema import read_info
    from mlsd.features.online import OnlineFeatures
    from mlsd.features.store import load_config

    cfg = _config(config, online_store)
    repo_dir = repo or cfg.feature_store.repo_path(dataset)
    online = OnlineFeatures(repo_dir, load_config(repo_dir))
    online.refresh_item_cache()
    item_ids = (
        np.array([int(i) for i in items.split(",")], dtype=np.int64)
        if items
        else np.arange(1, 6, dtype=np.int64)
    )
    now = pd.Timestamp(read_info(dataset).ts_max or pd.Timestamp.now(tz="UTC"))
    online.get_online_features(user, item_ids, now=now)  # warm up: the first call is not timed
    start = time.perf_counter()
    batch = online.get_online_features(user, item_ids, now=now)
    elapsed_ms = (time.perf_counter() - start) * 1e3

    user_table = Table(title=f"user {user}", show_header=False, title_justify="left")
    for name, values in batch.user.items():
        value = values[0]
        shown = value[value != -1][:10].tolist() if np.ndim(value) else value
        user_table.add_row(name, str(shown))
    console.print(user_table)
    names = ["item_known", "item_events_7d", "item_mean_value", "item_age_days"]
    names += ["category_affinity", "seen_recently", "hour_of_day", "day_of_week"]
    matrix = batch.matrix(names)
    title = (
        f"{len(item_ids)} candidates at {now:%Y-%m-%d %H:%M} UTC, assembled in {elapsed_ms:.2f} ms"
    )
    item_table = Table(title=title, title_justify="left")
    item_table.add_column("feature")
    for item_id in item_ids:
        item_table.add_column(f"item {item_id}", justify="right")
    for name, column in zip(names, matrix.T, strict=True):
        item_table.add_row(name, *(f"{v:.4g}" for v in column))
    console.print(item_table)
