"""``mlsd feed simulate``: simulated users drive the running feed service over HTTP.

The users' preferences come from the dataset: the simulated world's ground truth when the
directory holds one (``world.json`` + ``world.npz``, written by ``mlsd data synth``), else an
oracle fitted on all of the dataset's events (see :mod:`mlsd.evaluation.preferences`). The
simulated clock starts at ``--start`` (default: the dataset's last event) and advances
``--seconds-per-request`` per request; ``--after-drift`` uses a drifting world's post-drift
tastes whatever the clock says.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from mlsd.systems.feed.commands import DatasetDir, app, console

if TYPE_CHECKING:  # kept out of the CLI's import time
    from mlsd.evaluation.preferences import Preferences
    from mlsd.evaluation.simulator import GroupStats, SimulationResult


@app.command("simulate")
def simulate_command(
    dataset: DatasetDir,
    url: Annotated[
        str, typer.Option("--url", help="Base URL of the running service.")
    ] = "http://127.0.0.1:8000",
    users: Annotated[int, typer.Option("--users", min=1, help="Distinct simulated users.")] = 1000,
    requests: Annotated[
        int, typer.Option("--requests", min=1, help="Recommendation requests to send.")
    ] = 1000,
    k: Annotated[int, typer.Option("--k", min=1, help="Items asked per request.")] = 10,
    start: Annotated[
        str | None,
        typer.Option("--start", help="Simulated UTC time of the first request (ISO 8601)."),
    ] = None,
    seconds_per_request: Annotated[
        float, typer.Option("--seconds-per-request", min=0.0, help="Simulated seconds per request.")
    ] = 1.0,
    seed: Annotated[
        int,
        typer.Option(
            "--seed", help="Seed of users and clicks; use a new one for each run on one service."
        ),
    ] = 0,
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, help="Requests in flight at once.")
    ] = 1,
    experiment: Annotated[
        str | None,
        typer.Option(
            "--experiment",
            help="A label for the result (the service runs its own active experiment).",
        ),
    ] = None,
    after_drift: Annotated[
        bool,
        typer.Option("--after-drift", help="Use the world's post-drift tastes at every time."),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Send real requests as simulated users; they click by their true preferences."""
    from mlsd.evaluation.simulator import simulate

    preferences = load_preferences(dataset, after_drift=after_drift)
    result = simulate(
        url,
        preferences,
        n_users=users,
        n_requests=requests,
        k=k,
        start_ts=start if start is not None else _dataset_end(dataset),
        seconds_per_request=seconds_per_request,
        seed=seed,
        concurrency=concurrency,
        experiment=experiment,
        progress=not as_json,
    )
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        for table in summary_tables(result):
            console.print(table)
    if result.answered == 0:
        kinds = ", ".join(f"{kind} x{n}" for kind, n in result.errors_by_kind.items())
        raise ValueError(f"no request was answered ({kinds}); is the service running at {url}?")


def load_preferences(dataset: Path, *, after_drift: bool) -> Preferences:
    """The world's ground truth when ``dataset`` holds one, else an oracle fitted on it."""
    from mlsd.data.sources.world import WORLD_JSON
    from mlsd.evaluation.preferences import OraclePreferences, WorldPreferences

    if (dataset / WORLD_JSON).is_file():
        return WorldPreferences.from_dataset(dataset, force_regime="after" if after_drift else None)
    if after_drift:
        raise ValueError(
            f"--after-drift: {dataset} holds no simulated world ({WORLD_JSON}); only a synthetic "
            "dataset made with `mlsd data synth --drift-at ...` has a drift to simulate"
        )
    return OraclePreferences.from_dataset(dataset)


def _dataset_end(dataset: Path) -> str:
    from datetime import UTC, datetime

    from mlsd.data.schema import read_info

    return read_info(dataset).ts_max or datetime.now(UTC).isoformat()


def summary_tables(result: SimulationResult) -> list[Table]:
    """The overall figures, one table per grouping, and clicks by position."""
    overall = Table(title="simulation", show_header=False, title_justify="left")
    errors = ", ".join(f"{kind}: {n}" for kind, n in result.errors_by_kind.items())
    latency = result.latency_ms
    rows = {
        "preferences": result.preferences,
        "simulated time": f"{result.start} → {result.end}",
        "requests": f"{result.requests:,} ({result.answered:,} answered)",
        "errors": f"{result.errors:,}" + (f" ({errors})" if errors else ""),
        "exposures": f"{result.exposures:,}",
        "clicks": f"{result.clicks:,} (expected {result.expected_clicks:,.1f})",
        "CTR": f"{result.ctr:.4f} (expected {result.total.expected_ctr:.4f})",
        "events": f"{result.events_sent:,} sent, {result.events_accepted:,} accepted, "
        f"{result.event_errors:,} failed batches",
        "latency ms": ", ".join(f"{name} {v:.1f}" for name, v in latency.items()) or "-",
        "wall time": f"{result.wall_seconds:.1f} s",
    }
    if result.experiment is not None:
        rows["experiment"] = result.experiment
    for name, value in rows.items():
        overall.add_row(name, value)
    tables = [overall]
    groups = {"arm": result.by_arm, "model version": result.by_model_version}
    for title, stats in {**groups, "path": result.by_path}.items():
        tables.append(_group_table(f"by {title}", stats))
    positions = Table(title="by position", title_justify="left")
    for column in ("position", "exposures", "clicks", "expected", "CTR"):
        positions.add_column(column, justify="right")
    for p, (n, c, e) in enumerate(
        zip(
            result.exposures_by_position,
            result.clicks_by_position,
            result.expected_clicks_by_position,
            strict=True,
        )
    ):
        positions.add_row(str(p), f"{n:,}", f"{c:,}", f"{e:.1f}", f"{c / n:.4f}" if n else "-")
    return [*tables, positions]


def _group_table(title: str, stats: dict[str, GroupStats]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column(title.removeprefix("by "))
    for column in ("requests", "exposures", "clicks", "expected", "CTR"):
        table.add_column(column, justify="right")
    for key, s in stats.items():
        cells = (f"{s.requests:,}", f"{s.exposures:,}", f"{s.clicks:,}")
        table.add_row(key, *cells, f"{s.expected_clicks:.1f}", f"{s.ctr:.4f}")
    return table
