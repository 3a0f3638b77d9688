"""``mlsd feed monitor``: a window of the service log against the training-time reference profile.

Prints the drift table, the label metrics (CTR, NDCG@10, ECE, beside the training-time values
of the profile) and every alert rule's outcome; exits 1 when a rule fires (naming the
rules and their values), 0 when none does, 2 on bad input (a missing or malformed profile or
config, a bad window or time). Rules and the default window come from the ``[monitoring]``
table of ``--config``, else of ``configs/feed.toml`` like every feed command (see
:func:`mlsd.config.load_feed_config`), else the built-in defaults of
:mod:`mlsd.monitoring.alerts`.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import duckdb
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mlsd.monitoring.alerts import RuleOutcome, parse_window
from mlsd.monitoring.monitor import MonitorResult, profile_model_version, run_monitor
from mlsd.monitoring.profile import ReferenceProfile
from mlsd.systems.feed.commands import app, console, load_config

err_console = Console(stderr=True)
N_SHOWN = 15
"""Drift table rows printed (the most drifted first); the JSON and HTML have them all."""
LABEL_METRICS = ("ctr", "ctr_drop", "ndcg_at_10", "ece")
"""The label metrics printed (those of the window that have data), in this order."""
NEEDS_REFERENCE_CTR = "needs --reference-ctr or [monitoring].reference_ctr"
"""Why a ``ctr_drop`` rule has no data when no reference CTR is set."""


class BadInputError(ValueError):
    """A user error: printed as one line, exit code 2."""


@app.command("monitor")
def monitor(
    log_dir: Annotated[Path, typer.Option("--log-dir", help="Service log directory.")],
    reference: Annotated[
        Path, typer.Option("--reference", help="Reference profile JSON written at training.")
    ],
    window: Annotated[
        str | None,
        typer.Option("--window", help="Window length, e.g. 30m, 1h, 1d (default: config, 1h)."),
    ] = None,
    end: Annotated[
        str | None,
        typer.Option("--end", help="Window end, ISO 8601 (naive = UTC; default: now)."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="System config whose [monitoring] holds the alert rules "
            "(default configs/feed.toml).",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write monitor.json and monitor.html here.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result as JSON instead of tables.")
    ] = False,
    reference_ctr: Annotated[
        float | None,
        typer.Option(
            "--reference-ctr",
            help="Served CTR of a known-good period; ctr_drop is measured against it.",
        ),
    ] = None,
    label_delay: Annotated[
        float | None,
        typer.Option(
            "--label-delay",
            min=0.0,
            help="Seconds an exposure must be old to count in CTR/NDCG/ECE: younger ones may "
            "not have their clicks yet (default: [monitoring].label_delay_s, 300).",
        ),
    ] = None,
    model_version: Annotated[
        str | None,
        typer.Option(
            "--model-version",
            help="Compare only this model version's candidate rows with the profile (default: "
            "the version in model.json next to --reference; 'all' for every row).",
        ),
    ] = None,
) -> None:
    """Compare a live window with the reference profile and check the alert rules.

    Only the candidate rows of the profile's model version are compared with it (a previous
    model's rows after a promotion or a rollback, or another experiment arm's, are left out).
    """
    served_ctr = reference_ctr
    try:
        section = load_config(config).monitoring  # as every feed command reads it
        if served_ctr is None:
            served_ctr = section.reference_ctr
        length = parse_window(window if window is not None else section.window)
        until = _parse_end(end)
        if not log_dir.is_dir():
            raise BadInputError(f"{log_dir}: log directory not found")
        profile = _load_profile(reference)
        if model_version is None:
            model_version = profile_model_version(reference)
        elif model_version == "all":
            model_version = None
        result = run_monitor(
            log_dir,
            profile,
            start=until - length,
            end=until,
            rules=section.alerts,
            psi_threshold=section.psi_threshold,
            min_drift_requests=section.min_drift_requests,
            label_delay_s=section.label_delay_s if label_delay is None else label_delay,
            reference_ctr=served_ctr,
            model_version=model_version,
        )
    except (ValueError, OSError, duckdb.Error) as exc:  # bad input, or a log DuckDB cannot read
        err_console.print(
            f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
        )
        raise typer.Exit(2) from exc
    document = _to_json(result, served_ctr)
    if out is not None:
        from mlsd.monitoring.report import write_report

        json_path, html_path = write_report(result, out, document=document)
    if as_json:
        print(json.dumps(document, indent=2))
    else:
        _print(result, served_ctr)
        if out is not None:
            console.print(f"wrote {json_path} and {html_path}")
    fired = result.fired
    if fired:
        err_console.print(
            f"[bold red]{len(fired)} alert(s) fired:[/] "
            + escape("; ".join(alert.describe() for alert in fired)),
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)


def _load_profile(path: Path) -> ReferenceProfile:
    """The profile at ``path``; when that is not one but a profile sits next to it (a model
    directory's ``model.json`` was given, or the directory), the error names that profile."""
    from mlsd.serving.feed_model import REFERENCE_PROFILE

    try:
        return ReferenceProfile.load(path)
    except (ValueError, OSError) as exc:
        folder = path if path.is_dir() else path.parent
        nearby = folder / REFERENCE_PROFILE
        if path.name == REFERENCE_PROFILE or not nearby.is_file():
            raise
        what = "not found"
        if path.exists():
            what = "a directory" if path.is_dir() else "not a reference profile"
        raise BadInputError(
            f"--reference {path}: {what}; the model's profile is next to it: --reference {nearby}"
        ) from exc


def _parse_end(text: str | None) -> datetime:
    if text is None:
        return datetime.now(UTC)
    try:
        ts = datetime.fromisoformat(text)
    except ValueError as exc:
        raise BadInputError(
            f"--end {text!r}: expected an ISO 8601 time such as 2024-03-01T12:00"
        ) from exc
    return ts.astimezone(UTC) if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def _note(outcome: RuleOutcome, reference_ctr: float | None) -> str | None:
    """Why a rule has no data, when the command knows more than "no data"."""
    if outcome.status == "no data" and outcome.rule.metric == "ctr_drop" and not reference_ctr:
        return NEEDS_REFERENCE_CTR
    return None


def _to_json(result: MonitorResult, reference_ctr: float | None) -> dict[str, Any]:
    """:meth:`MonitorResult.to_dict`, with a ``note`` on the alerts whose "no data" has a
    known cause (the other fields unchanged)."""
    out = result.to_dict()
    for alert, outcome in zip(out["alerts"], result.outcomes, strict=True):
        note = _note(outcome, reference_ctr)
        if note is not None:
            alert["note"] = note
    return out


def _print_labels(result: MonitorResult, reference_ctr: float | None) -> None:
    """The window's label metrics beside the profile's training-time values."""
    labels_end = result.labels_end
    early = labels_end is not None and labels_end < result.end
    shown = [m for m in LABEL_METRICS if m in result.metrics]
    if not shown:
        why = "no clicks logged in the window yet"
        if early and labels_end is not None and labels_end <= result.start:
            why = (
                f"every exposure of the window is younger than the label delay (labels end at "
                f"{labels_end.isoformat()}; --label-delay)"
            )
        console.print(f"label metrics (ctr, ndcg_at_10, ece): no data ({why})", highlight=False)
        return
    title = "label metrics"
    if early and labels_end is not None:
        title += (
            f" (exposures before {labels_end.isoformat()}: younger ones may not have their "
            "clicks yet; --label-delay)"
        )
    table = Table(title=title, title_justify="left")
    for column in ("metric", "window", "training reference"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name in shown:
        reference = result.reference_metrics.get(name)
        if name == "ctr_drop":
            cell = f"reference_ctr {reference_ctr:g}" if reference_ctr else ""
        else:
            cell = "" if reference is None else f"{reference:.4g}"
        table.add_row(name, f"{result.metrics[name]:.4g}", cell)
    console.print(table)
    if "ctr" in result.reference_metrics:
        console.print(
            "[dim]the training ctr is the base rate of the ranker's candidates, not of served "
            "lists; ctr_drop compares with a served CTR (--reference-ctr)[/]",
            highlight=False,
        )


def _print(result: MonitorResult, reference_ctr: float | None = None) -> None:
    counts = ", ".join(f"{k} {v:,}" for k, v in result.counts.items())
    console.print(f"window {result.start.isoformat()} → {result.end.isoformat()} ({counts})")
    of = "" if result.model_version is None else f" of model version {result.model_version}"
    if result.model_version is not None:
        console.print(f"drift: candidate rows{of} only", highlight=False)
    drift = result.drift
    if drift is None:
        console.print(
            f"no candidate rows{of} in the window: feature and prediction drift not measured",
            highlight=False,
        )
    else:
        table = Table(title="drift (most drifted first)", title_justify="left")
        for column in ("feature", "kind", "test", "statistic", "p-value", "PSI", "live rows", ""):
            table.add_column(column, justify="left" if column in ("feature", "kind") else "right")
        rows = [drift.prediction] if drift.prediction is not None else []
        for row in [*rows, *drift.ranked()[:N_SHOWN]]:
            table.add_row(
                escape(row.name),
                row.kind,
                row.test,
                f"{row.statistic:.4f}",
                f"{row.p_value:.3g}",
                f"{row.psi:.4f}",
                f"{row.n_live:,}",
                "[red]drifted[/]" if row.drifted else "[yellow]trending[/]" if row.trending else "",
            )
        console.print(table)
        if drift.missing:
            console.print(f"[yellow]missing from the log:[/] {', '.join(drift.missing)}")
        if drift.note is not None:
            console.print(f"[yellow]{escape(drift.note)}[/]", highlight=False)
    _print_labels(result, reference_ctr)
    alerts = Table(title="alerts", title_justify="left")
    for column in ("rule", "metric", "condition", "value", "status"):
        alerts.add_column(column)
    notes: list[str] = []
    for o in result.outcomes:
        style = {"fired": "[bold red]", "ok": "[green]", "no data": "[dim]"}[o.status]
        value = "—" if o.value is None else f"{o.value:.4g}"
        condition = f"{o.rule.op} {o.rule.threshold:g}" + (
            f" ({o.rule.window})" if o.rule.window else ""
        )
        note = _note(o, reference_ctr)
        status: str = o.status
        if note is not None:  # the table's column is narrow: the whole note goes below it
            status = f"{o.status} (needs --reference-ctr)"
            notes.append(f"{o.rule.name}: {o.rule.metric} {note}")
        alerts.add_row(
            escape(o.rule.name), o.rule.metric, condition, value, f"{style}{escape(status)}[/]"
        )
    console.print(alerts)
    for line in dict.fromkeys(notes):
        console.print(f"[dim]{escape(line)}[/]", highlight=False)
