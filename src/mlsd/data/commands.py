"""``mlsd data``: import, synthesize, validate and split datasets, and guard against leakage."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mlsd import HELP_MARKUP
from mlsd.data.schema import QUARANTINE_FILE, DatasetInfo
from mlsd.data.validate import ValidationReport

app = typer.Typer(
    rich_markup_mode=HELP_MARKUP,
    help="Step 3a, data: the dataset contract and its pipeline.",
    no_args_is_help=True,
)
import_app = typer.Typer(
    rich_markup_mode=HELP_MARKUP,
    help="Import a dataset into a contract directory (events/users/items.parquet + dataset.json).",
    no_args_is_help=True,
)
app.add_typer(import_app, name="import")

console = Console()

OutDir = Annotated[Path, typer.Option("--out", help="Contract directory to write.")]
SourceDir = Annotated[
    Path | None,
    typer.Option("--source", help="The unpacked dataset folder or the official zip."),
]
Download = Annotated[
    bool,
    typer.Option("--download", help="Fetch the official GroupLens zip and verify its checksum."),
]
CacheDir = Annotated[
    Path | None, typer.Option("--cache-dir", help="Where downloads go (default ~/.cache/mlsd).")
]


def _dataset_dir(directory: Path, command: str) -> Path:
    """``directory``, after checking it is not a file: the commands that read a dataset take
    its contract directory, and a data file (e.g. a CSV of clicks) is imported first.

    Raises:
        ValueError: naming the file and the command that imports it.
    """
    if directory.is_file():
        how = (
            f"mlsd data import csv --events {directory} --user-col COL --item-col COL "
            "--ts-col COL --out DIR"
        )
        if directory.suffix.lower() not in {".csv", ".tsv", ".txt"}:
            how = "mlsd data import ... (or mlsd data import csv for a delimited file)"
        raise ValueError(
            f"{directory} is a file, but `mlsd data {command}` takes a dataset directory "
            f"(events.parquet and dataset.json); make one from it with: {how}"
        )
    return directory


def _print_report(report: ValidationReport, title: str) -> None:
    info = report.info
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_row("directory", str(report.out))
    if info is not None:
        table.add_row("events", f"{info.n_events:,}")
        table.add_row("users", f"{info.n_users:,}")
        table.add_row("items", f"{info.n_items:,}")
        table.add_row("time range", f"{info.ts_min} → {info.ts_max}")
        table.add_row("content hash", info.content_hash)
    table.add_row("rows kept", f"{report.n_kept:,}")
    table.add_row("rows quarantined", f"{report.n_quarantined:,}")
    for reason, count in report.reasons.items():
        table.add_row(f"  {reason}", f"{count:,}")
    console.print(table)
    if report.examples:
        console.print(
            f"quarantined rows (with their data): {report.out / QUARANTINE_FILE}; the first:"
        )
        for example in report.examples:
            console.print(f"  {example}", markup=False, highlight=False)


def _import_movielens(
    variant: str, source: Path | None, out: Path, download: bool, cache_dir: Path | None
) -> None:
    from mlsd.data.sources.movielens import import_movielens

    if source is None and not download:
        raise typer.BadParameter("give --source DIR|ZIP, or --download to fetch the official zip")
    report = import_movielens(
        variant, source=source, out=out, download=download, cache_dir=cache_dir
    )
    _print_report(report, f"imported {variant}")


MOVIELENS_SUMMARIES = {
    "movielens-100k": "MovieLens 100K (943 users, 1,682 movies, demographics and genres).",
    "movielens-latest-small": "MovieLens latest-small (100,836 ratings, 610 users, 1996-2018).",
    "movielens-1m": "MovieLens 1M (6,040 users with demographics, 3,900 movies).",
    "movielens-20m": "MovieLens 20M (138k users, 27k movies).",
    "movielens-25m": "MovieLens 25M (162k users, 62k movies).",
}


def _movielens_command(variant: str) -> Callable[..., None]:
    def command(
        out: OutDir,
        source: SourceDir = None,
        download: Download = False,
        cache_dir: CacheDir = None,
    ) -> None:
        _import_movielens(variant, source, out, download, cache_dir)

    command.__doc__ = MOVIELENS_SUMMARIES[variant]
    return command


for _variant in MOVIELENS_SUMMARIES:
    import_app.command(_variant)(_movielens_command(_variant))


@import_app.command("csv")
def import_csv(
    events: Annotated[Path, typer.Option("--events", help="Events file (CSV/TSV).")],
    user_col: Annotated[str, typer.Option("--user-col", help="Column holding the user id.")],
    item_col: Annotated[str, typer.Option("--item-col", help="Column holding the item id.")],
    ts_col: Annotated[str, typer.Option("--ts-col", help="Column holding the timestamp.")],
    out: OutDir,
    value_col: Annotated[str | None, typer.Option("--value-col", help="e.g. the rating.")] = None,
    event_col: Annotated[
        str | None, typer.Option("--event-col", help="Event type column (click, view, ...).")
    ] = None,
    sep: Annotated[str, typer.Option("--sep", help="Field separator; '\\t' for tabs.")] = ",",
    ts_format: Annotated[
        str,
        typer.Option(
            "--ts-format",
            help="unix, unix_ms, unix_us, unix_ns, iso, or a strptime format like %Y-%m-%d.",
        ),
    ] = "unix",
    no_header: Annotated[
        bool,
        typer.Option(
            "--no-header", help="No header row: refer to columns by position (0, 1, ...)."
        ),
    ] = False,
    users: Annotated[Path | None, typer.Option("--users", help="User attributes file.")] = None,
    items: Annotated[Path | None, typer.Option("--items", help="Item attributes file.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Dataset name.")] = None,
) -> None:
    """Bring your own data: any delimited file of (user, item, timestamp[, value, event])."""
    from mlsd.data.sources.csvfile import import_csv as run_import

    separator = "\t" if sep in {"\\t", "tab"} else sep
    report = run_import(
        events,
        user_col=user_col,
        item_col=item_col,
        ts_col=ts_col,
        value_col=value_col,
        event_col=event_col,
        sep=separator,
        ts_format=ts_format,
        header=not no_header,
        users=users,
        items=items,
        out=out,
        name=name,
    )
    _print_report(report, f"imported {events}")


@app.command()
def synth(
    out: OutDir,
    users: Annotated[int, typer.Option("--users", help="Number of users.")] = 10_000,
    items: Annotated[int, typer.Option("--items", help="Number of items.")] = 2_000,
    events: Annotated[int, typer.Option("--events", help="Number of events.")] = 1_000_000,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (output is deterministic).")] = 0,
    start: Annotated[str, typer.Option("--start", help="First day (UTC).")] = "2024-01-01",
    days: Annotated[int, typer.Option("--days", help="Length of the event span in days.")] = 90,
    drift_at: Annotated[
        str | None, typer.Option("--drift-at", help="Inject drift at this UTC timestamp.")
    ] = None,
    drift_kind: Annotated[
        str, typer.Option("--drift-kind", help="What drifts: tastes or feature.")
    ] = "tastes",
) -> None:
    """Generate the simulated world: users, items, sessions of events, and its ground truth."""
    from mlsd.data.sources.synthetic import WorldConfig, synthesize

    config = WorldConfig(
        n_users=users,
        n_items=items,
        n_events=events,
        seed=seed,
        start=start,
        days=days,
        drift_at=drift_at,
        drift_kind=drift_kind,
    )
    info = synthesize(config, out, progress=True)
    _print_info(info, out, "simulated world")


def _print_info(info: DatasetInfo, out: Path, title: str) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_row("directory", str(out))
    table.add_row("events", f"{info.n_events:,}")
    table.add_row("users", f"{info.n_users:,}")
    table.add_row("items", f"{info.n_items:,}")
    table.add_row("time range", f"{info.ts_min} → {info.ts_max}")
    table.add_row("content hash", info.content_hash)
    console.print(table)


@app.command()
def validate(
    directory: Annotated[Path, typer.Argument(help="Contract directory to check in place.")],
) -> None:
    """Check a dataset directory; move bad rows to quarantine.parquet with a reason."""
    from mlsd.data.validate import validate_dir

    report = validate_dir(_dataset_dir(directory, "validate"))
    _print_report(report, f"validated {directory}")


@app.command()
def split(
    directory: Annotated[Path, typer.Argument(help="Contract directory to split.")],
    t1: Annotated[str | None, typer.Option("--t1", help="Validation starts (UTC).")] = None,
    t2: Annotated[str | None, typer.Option("--t2", help="Test starts (UTC).")] = None,
    val_frac: Annotated[
        float | None, typer.Option("--val-frac", help="Share of events (or time) for validation.")
    ] = None,
    test_frac: Annotated[
        float | None, typer.Option("--test-frac", help="Share of events (or time) for test.")
    ] = None,
    by: Annotated[
        str,
        typer.Option(
            "--by", help="Cut at quantiles of event timestamps (events) or of the time span (time)."
        ),
    ] = "events",
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder (default DIR/split).")
    ] = None,
) -> None:
    """Global temporal split: train < t1 <= validation < t2 <= test."""
    from mlsd.data.split import SplitSpec, parse_timestamp, split_dataset

    spec = None
    if t1 is not None or t2 is not None:
        if t1 is None or t2 is None:
            raise typer.BadParameter("give both --t1 and --t2, or --val-frac and --test-frac")
        spec = SplitSpec(parse_timestamp(t1), parse_timestamp(t2))
    result = split_dataset(
        _dataset_dir(directory, "split"),
        spec=spec,
        val_frac=val_frac,
        test_frac=test_frac,
        by=by,
        out=out,
    )
    table = Table(
        title=f"split of {directory}", caption=f"t1={result.spec.t1}  t2={result.spec.t2}"
    )
    for column in ("window", "events", "users", "items", "warm", "cold", "from", "to"):
        table.add_column(column, justify="left" if column in {"window", "from", "to"} else "right")
    for window, stats in result.stats.items():
        warm, cold = stats.get("n_warm_users"), stats.get("n_cold_users")
        table.add_row(
            window,
            f"{stats['n_events']:,}",
            f"{stats['n_users']:,}",
            f"{stats['n_items']:,}",
            "" if warm is None else f"{warm:,}",
            "" if cold is None else f"{cold:,}",
            str(stats.get("ts_min"))[:10],
            str(stats.get("ts_max"))[:10],
        )
    console.print(table)
    console.print(f"wrote {result.out}")


@app.command("dev-copy")
def dev_copy(
    directory: Annotated[Path, typer.Argument(help="Contract directory to copy.")],
    out: OutDir,
    val_frac: Annotated[
        float, typer.Option("--val-frac", help="The protocol's validation share ([retrieval]).")
    ] = 0.1,
    test_frac: Annotated[
        float, typer.Option("--test-frac", help="The protocol's test share ([retrieval]).")
    ] = 0.2,
    by: Annotated[str, typer.Option("--by", help="events or time, as [retrieval].split_by.")] = (
        "events"
    ),
) -> None:
    """The dataset before its test window: compare settings on it, not on the test window."""
    from mlsd.data.split import dev_copy as make_dev_copy

    info = make_dev_copy(
        _dataset_dir(directory, "dev-copy"), out, val_frac=val_frac, test_frac=test_frac, by=by
    )
    _print_info(info, out, f"dev copy of {directory}: the events before its test window")


@app.command("check-leakage")
def check_leakage(
    features: Annotated[Path, typer.Option("--features", help="Feature rows (Parquet or CSV).")],
    labels: Annotated[Path, typer.Option("--labels", help="Label rows (Parquet or CSV).")],
    key: Annotated[
        list[str] | None,
        typer.Option("--key", help="Row key column (repeat); default user_id, item_id, label_ts."),
    ] = None,
) -> None:
    """Exit 1 when any feature was computed at or after its label's timestamp.

    Also exits 1 when nothing was checked or some feature rows have no label: a check that
    matched no rows proves nothing (typically keys or time zones that differ between the files).
    """
    from mlsd.data.leakage import DEFAULT_KEYS, check_leakage_files

    keys = tuple(key) if key else DEFAULT_KEYS
    report = check_leakage_files(features, labels, keys=keys)
    console.print(
        f"checked {report.n_rows:,} feature rows matched to a label; "
        f"{report.n_features_without_label:,} feature rows without a label and "
        f"{report.n_labels_without_features:,} labels without features were not checked",
        highlight=False,
        soft_wrap=True,
    )
    if report.n_leaky_rows:  # the rows left unchecked fail below
        console.print(
            f"[bold red]leakage:[/] {report.n_leaky_rows:,} of {report.n_rows:,} rows use data "
            f"at or after the label time; columns: {', '.join(report.leaky_columns)}",
            highlight=False,
        )
        console.print(f"example row: {report.example}", highlight=False)
        raise typer.Exit(code=1)
    unmatched = report.n_features_without_label
    if report.n_rows == 0 and not unmatched:
        console.print(
            f"[bold red]nothing checked:[/] {features} has no feature rows; point --features at "
            "the table the model is trained on",
            highlight=False,
        )
        raise typer.Exit(code=1)
    if unmatched:
        total = report.n_rows + unmatched
        what = f"all {unmatched:,}" if report.n_rows == 0 else f"{unmatched:,} of {total:,}"
        console.print(
            f"[bold red]not checked:[/] {what} feature rows in {features} have no label in "
            f"{labels} with the same {', '.join(keys)}, so their leakage is unknown. Make both "
            "files use the same key columns and values, and the same time zone for timestamps "
            "(naive times are read as UTC), then run again.",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(code=1)
    console.print(f"no leakage: {report.n_rows:,} feature rows computed before their labels")
