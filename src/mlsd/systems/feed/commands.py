"""``mlsd feed``: the personalized feed system's commands."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mlsd import HELP_MARKUP
from mlsd.config import FeedConfig, feed_config_source, load_feed_config

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from mlsd.evaluation.retrieval import Estimate, RetrievalReport
    from mlsd.evaluation.retrieval_report import PairedEstimate

app = typer.Typer(
    rich_markup_mode=HELP_MARKUP, help="The personalized feed system.", no_args_is_help=True
)
features_app = typer.Typer(
    rich_markup_mode=HELP_MARKUP,
    help="Step 3b, features: the Feast repository and its online store.",
    no_args_is_help=True,
)
app.add_typer(features_app, name="features")

console = Console()
err_console = Console(stderr=True)

DatasetDir = Annotated[Path, typer.Option("--dataset", help="Contract directory to read.")]
ConfigFile = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="System config (default configs/feed.toml in the working directory, else the "
        "built-in defaults; the command prints which).",
    ),
]
RepoDir = Annotated[
    Path | None,
    typer.Option("--repo", help="Feast repository (default: [feature_store].repo_dir)."),
]
OnlineStore = Annotated[
    str | None, typer.Option("--online-store", help="Override the config: sqlite or redis.")
]


def load_config(path: Path | None) -> FeedConfig:
    """The feed config of ``--config`` (else ``configs/feed.toml`` in the working directory,
    else the built-in defaults), after one line on stderr saying which was read."""
    config = load_feed_config(path)
    err_console.print(escape(feed_config_source(path)), highlight=False, soft_wrap=True)
    return config


def _config(path: Path | None, online_store: str | None) -> FeedConfig:
    config = load_config(path)
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
    if report.kept_newer:
        console.print(
            f"[yellow]kept {report.kept_newer:,} stored user or item view(s) newer than "
            f"{report.as_of} (pushed since, or a later snapshot); clear the online store to go "
            "back to an earlier snapshot[/yellow]"
        )


@features_app.command("footprint")
def features_footprint(
    dataset: DatasetDir,
    redis: Annotated[
        str | None,
        typer.Option(
            "--redis",
            help="Redis to measure on, Feast's host:port[,param=value...] (default: "
            "[feature_store].redis_connection); an idle one: every write counts.",
        ),
    ] = None,
    rows: Annotated[
        int, typer.Option("--rows", min=2, help="Users and items of each kind written.")
    ] = 5_000,
    config: ConfigFile = None,
    repo: RepoDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Measure what a user's and an item's online features cost in Redis: the materialized
    repository's first rows written through Feast into a project of their own, then deleted."""
    import json

    import redis as redis_py

    from mlsd.features.footprint import redis_bytes_per_entity, redis_client

    cfg = load_config(config)
    connection = redis or cfg.feature_store.redis_connection
    where = "--redis" if redis else "[feature_store].redis_connection"
    hint = "start redis-server there or pass --redis HOST:PORT of a running one"
    client = redis_client(connection)
    try:  # before Feast writes anything, and as the user's mistake rather than a crash
        client.ping()
    except redis_py.RedisError as err:
        raise ValueError(f"{where} {connection}: cannot reach Redis ({err}); {hint}") from err
    finally:
        client.close()
    try:
        footprint = redis_bytes_per_entity(
            repo or cfg.feature_store.repo_path(dataset), connection, rows=rows
        )
    except redis_py.RedisError as err:
        raise ValueError(f"{where} {connection}: Redis failed ({err}); {hint}") from err
    if as_json:
        print(json.dumps(footprint.to_dict(), indent=2))
        return
    table = Table(title="online feature store in Redis", show_header=False, title_justify="left")
    table.add_row("bytes a user", f"{footprint.bytes_per_user:,.0f} ({footprint.users:,} written)")
    table.add_row("bytes an item", f"{footprint.bytes_per_item:,.0f} ({footprint.items:,} written)")
    table.add_row("user views", ", ".join(footprint.views["user"]))
    table.add_row("item views", ", ".join(footprint.views["item"]))
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

    item_ids = _item_ids(items) if items else np.arange(1, 6, dtype=np.int64)
    cfg = _config(config, online_store)
    repo_dir = repo or cfg.feature_store.repo_path(dataset)
    online = OnlineFeatures(repo_dir, load_config(repo_dir))
    online.refresh_item_cache()
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


def _item_ids(text: str) -> npt.NDArray[np.int64]:
    """``--items`` ``"1,2,3"`` → item ids; a value that is not an integer is named."""
    import numpy as np

    ids = []
    for part in text.split(","):
        try:
            ids.append(int(part.strip()))
        except ValueError:
            raise typer.BadParameter(
                f"{part.strip()!r} in {text!r} is not an item id: give comma-separated integer "
                "ids, e.g. --items 1,2,3",
                param_hint="--items",
            ) from None
    return np.array(ids, dtype=np.int64)


@app.command("retrieve-eval")
def retrieve_eval(
    dataset: DatasetDir,
    config: ConfigFile = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write the full report as JSON here.")
    ] = None,
) -> None:
    """Step 5: every candidate source and their merge under the global temporal split."""
    from mlsd.evaluation.retrieval import evaluate_retrieval

    retrieval = load_config(config).retrieval
    report = evaluate_retrieval(
        dataset,
        retrieval.factories(),
        protocol=retrieval.protocol,
        merge=retrieval.merge,
        progress=True,
    )
    console.print(_protocol_table(report))
    for table in _metrics_tables(report):
        console.print(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report.to_json() + "\n")
        console.print(f"report written to {out}")


def _protocol_table(report: RetrievalReport) -> Table:
    counts = report.counts
    table = Table(title="retrieval evaluation", show_header=False, title_justify="left")
    table.add_row("dataset", report.dataset)
    table.add_row("protocol", report.protocol)
    table.add_row("t1 (validation from)", report.t1)
    table.add_row("t2 (test from)", report.t2)
    table.add_row("train events (< t2)", f"{counts['n_train_events']:,}")
    table.add_row("catalog items at t2", f"{counts['n_catalog_items']:,}")
    table.add_row(
        "test users",
        f"{counts['n_test_users']:,} ({counts['n_warm_users']:,} warm, "
        f"{counts['n_cold_users']:,} cold; {counts['n_test_active_users']:,} active, "
        f"{counts['n_test_active_users'] - counts['n_test_users']:,} without a relevant item)",
    )
    fusion = report.fusion
    what = (
        f"merge weights (reciprocal-rank fusion, c = {fusion.rank_constant:g})"
        if fusion.method == "rrf"
        else "merge quotas"
    )
    rows = {what: report.quotas}
    if report.cold_quotas is not None:
        rows = {f"{what}, warm users": report.quotas, f"{what}, cold users": report.cold_quotas}
    val = report.validation
    for label, quotas in rows.items():
        shown = ", ".join(f"{name} {q:g}" for name, q in quotas.items() if q)
        if val is not None:
            shown += (
                f" (tuned on {val.n_tune_users:,} validation users over "
                f"{val.n_candidates:,} quota vectors)"
            )
        elif shown:
            shown += " (from the config)"
        table.add_row(label, shown)
    if val is not None:
        recall = ", ".join(f"{name} {r:.3f}" for name, r in val.recall.items())
        table.add_row(f"validation recall@{val.tune_k}", recall)
    return table


def _cell(estimate: Estimate | None) -> str:
    if estimate is None:
        return "-"
    return f"{estimate.mean:.3f} [{estimate.low:.3f}, {estimate.high:.3f}]"


def _metrics_tables(report: RetrievalReport) -> list[Table]:
    """One table per segment (all, warm, cold users): a row per method, a column per metric."""
    names = [f"recall@{k}" for k in report.ks] + [f"ndcg@{report.ndcg_k}"]
    counts = report.counts
    users = {
        "all": counts["n_test_users"],
        "warm": counts["n_warm_users"],
        "cold": counts["n_cold_users"],
    }
    tables = []
    for segment, n_users in users.items():
        title = f"test window, {segment} users ({n_users:,}): mean [95% bootstrap interval]"
        table = Table(title=title, title_justify="left")
        table.add_column("method")
        if segment == "all":
            table.add_column("fit s", justify="right")
        for name in names:
            table.add_column(name, justify="right")
        for method in report.methods:
            fit = [f"{method.fit_seconds:.2f}"] if segment == "all" else []
            cells = [_cell(method.metrics[segment][name]) for name in names]
            table.add_row(method.name, *fit, *cells)
        tables.append(table)
    if report.comparisons:
        tables.append(_paired_table(report))
    return tables


def _paired_table(report: RetrievalReport) -> Table:
    """The merged set's recall over each source's, all users, paired bootstrap intervals."""
    title = "merged / each source, all users: recall ratio [95% paired bootstrap interval]"
    table = Table(title=title, title_justify="left")
    table.add_column("source")
    metrics = list(dict.fromkeys(c.metric for c in report.comparisons))
    for metric in metrics:
        table.add_column(metric, justify="right")
    for source in dict.fromkeys(c.baseline for c in report.comparisons):
        cells = {c.metric: c.segments["all"] for c in report.comparisons if c.baseline == source}
        table.add_row(source, *(_ratio_cell(cells.get(metric)) for metric in metrics))
    return table


def _ratio_cell(paired: PairedEstimate | None) -> str:
    if paired is None or not math.isfinite(paired.ratio):
        return "-"
    return f"{paired.ratio:.3f} [{paired.ratio_low:.3f}, {paired.ratio_high:.3f}]"


# `train` and `evaluate` live in their own module and register on `app` when imported.
from mlsd.systems.feed import experiment_commands as _experiment_commands  # noqa: E402, F401
from mlsd.systems.feed import logs_commands as _logs_commands  # noqa: E402, F401
from mlsd.systems.feed import monitor_commands as _monitor_commands  # noqa: E402, F401
from mlsd.systems.feed import ranking as _ranking  # noqa: E402, F401
from mlsd.systems.feed import registry_commands as _registry_commands  # noqa: E402, F401
from mlsd.systems.feed import retrain as _retrain  # noqa: E402, F401
from mlsd.systems.feed import serve as _serve  # noqa: E402, F401
from mlsd.systems.feed import simulate_commands as _simulate_commands  # noqa: E402, F401
