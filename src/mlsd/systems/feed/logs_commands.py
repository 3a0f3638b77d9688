"""``mlsd feed logs``: what the service log says the service did (:mod:`mlsd.monitoring.logs`).

The log directory is ``--log-dir``, else ``$MLSD_LOG_DIR``, else ``[service_log].dir`` of the
config resolved against ``--base-dir``: where ``mlsd feed serve`` writes with the same options.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from mlsd.systems.feed.commands import ConfigFile, app, console, load_config

if TYPE_CHECKING:
    from mlsd.monitoring.log_reader import LogSummary

LogDir = Annotated[
    Path | None,
    typer.Option(
        "--log-dir",
        envvar="MLSD_LOG_DIR",
        help="The service log directory (default: [service_log].dir under --base-dir).",
    ),
]
LogBaseDir = Annotated[
    Path,
    typer.Option("--base-dir", help="Directory a relative [service_log].dir resolves against."),
]


def _time(text: str) -> datetime:
    """ISO 8601; naive means UTC."""
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"not an ISO 8601 time: {text!r} (e.g. 2024-05-01T13:00)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@app.command("logs")
def logs(
    log_dir: LogDir = None,
    config: ConfigFile = None,
    base_dir: LogBaseDir = Path(),
    window: Annotated[
        str | None,
        typer.Option(
            "--window", "--since", help="The last span, e.g. 30m, 1h, 2d, ending at --end or now."
        ),
    ] = None,
    start: Annotated[
        str | None, typer.Option("--start", help="From this time, ISO 8601 (naive = UTC).")
    ] = None,
    end: Annotated[
        str | None, typer.Option("--end", help="Before this time, ISO 8601 (naive = UTC).")
    ] = None,
    attribution_window_s: Annotated[
        float,
        typer.Option(
            "--attribution-window", help="Seconds a click without a request id may follow."
        ),
    ] = 1800.0,
    out: Annotated[
        Path | None, typer.Option("--out", help="Also write the summary as JSON here.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary as JSON instead of tables.")
    ] = False,
) -> None:
    """Step 7: summarise the service log (requests, latency, paths, feedback, CTR per model and
    arm); no window: all of it."""
    from mlsd.monitoring.alerts import parse_window
    from mlsd.monitoring.log_reader import summarize

    root = log_dir or load_config(config).service_log.path(base_dir)
    if not root.is_dir():
        raise ValueError(f"no service log at {root} (mlsd feed serve writes it; see --log-dir)")
    until = _time(end) if end else None
    since = _time(start) if start else None
    if window is not None:
        if start is not None:
            raise ValueError("give --window or --start, not both")
        until = until or datetime.now(UTC)
        since = until - parse_window(window)
    summary = summarize(root, start=since, end=until, attribution_window_s=attribution_window_s)
    record = json.dumps({"log_dir": str(root), **summary.to_dict()}, indent=2)
    if as_json:
        print(record)
    else:
        for table in summary_tables(summary, root):
            console.print(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(record + "\n")
        if not as_json:
            console.print(f"summary written to {out}")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _iso(ts: datetime | None) -> str:
    return "-" if ts is None else ts.isoformat()


def summary_tables(summary: LogSummary, root: Path) -> list[Table]:
    """The summary as rich tables: the service, feedback, and CTR per arm and per model."""
    since = "the start" if summary.start is None else _iso(summary.start)
    span = f"{since} → {'the end' if summary.end is None else _iso(summary.end)}"
    service = Table(title=f"service log {root} ({span})", show_header=False, title_justify="left")
    service.add_row("requests", f"{summary.requests:,}")
    service.add_row("first / last", f"{_iso(summary.first_request)} / {_iso(summary.last_request)}")
    service.add_row("users", f"{summary.users:,}")
    service.add_row("server errors (5xx)", _pct(summary.error_rate))
    service.add_row("any fallback", _pct(summary.fallback_rate))
    service.add_row(
        "latency p50 / p95 / p99 ms",
        " / ".join(
            _ms(v) for v in (summary.latency_p50_ms, summary.latency_p95_ms, summary.latency_p99_ms)
        ),
    )
    service.add_row(
        "paths", ", ".join(f"{p or '(failed)'} {_pct(s)}" for p, s in summary.path_share.items())
    )
    service.add_row("feedback", ", ".join(f"{e} {n:,}" for e, n in summary.events.items()) or "-")
    service.add_row(
        "exposures / clicked / CTR",
        f"{summary.exposures:,} / {summary.clicks:,} / {_pct(summary.ctr)}",
    )

    arms = Table(title="CTR by experiment arm", title_justify="left")
    for column in ("experiment", "arm", "exposures", "clicks", "CTR"):
        arms.add_column(column, justify="left" if column in ("experiment", "arm") else "right")
    for (experiment, arm), stats in summary.ctr_by_arm.items():
        arms.add_row(
            experiment or "-", arm or "-", f"{stats.exposures:,}", f"{stats.clicks:,}",
            _pct(stats.ctr),
        )  # fmt: skip
    models = Table(title="CTR by model version", title_justify="left")
    for column in ("model version", "exposures", "clicks", "CTR"):
        models.add_column(column, justify="left" if column == "model version" else "right")
    for version, stats in summary.ctr_by_model.items():
        models.add_row(version, f"{stats.exposures:,}", f"{stats.clicks:,}", _pct(stats.ctr))
    return [service, arms, models]
