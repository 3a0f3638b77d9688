"""``mlsd feed experiment report|size``: A/B tests over the service log, and their sizing.

Experiments are defined in the system TOML under ``[experiments]`` (see
:class:`~mlsd.evaluation.experiments.ExperimentsSection`); the report reads only that table of
the file, so it works with any system config. Bad input (no such experiment, nothing logged in
the window, a malformed ``--since``) prints one line and exits 2.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from mlsd import HELP_MARKUP
from mlsd.config import DEFAULT_FEED_CONFIG
from mlsd.evaluation.experiments import (
    ArmComparison,
    Comparison,
    Estimate,
    Experiment,
    ExperimentReport,
    ExperimentsSection,
    experiment_report,
    power,
    sample_size,
)
from mlsd.systems.feed.commands import app, console

experiment_app = typer.Typer(
    rich_markup_mode=HELP_MARKUP,
    help="Online A/B experiments: the report over the service log and the sample size.",
    no_args_is_help=True,
)
app.add_typer(experiment_app, name="experiment")

err_console = Console(stderr=True)

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def _fail(message: str) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def parse_time(value: str, *, now: datetime | None = None) -> datetime:
    """``2025-01-31``, ``2025-01-31T12:00`` (UTC unless an offset says) or ``24h``/``7d`` ago."""
    match = _RELATIVE.match(value.strip())
    if match:
        amount, unit = float(match.group(1)), _UNITS[match.group(2)]
        return (now or datetime.now(UTC)) - timedelta(**{unit: amount})
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{value!r} is not a time: use an ISO date/time (2025-01-31, 2025-01-31T12:00Z) "
            "or a duration ago (30m, 24h, 7d)"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def load_experiments(path: Path) -> ExperimentsSection:
    """The ``[experiments]`` table of a system TOML (the other tables are not read)."""
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ValueError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from None
    return ExperimentsSection.from_mapping(
        raw.get("experiments", {}), where=f"{path}: [experiments]"
    )


def _choose(section: ExperimentsSection, name: str | None, path: Path) -> Experiment:
    if name is not None:
        return section.get(name)
    if section.active_experiment is not None:
        return section.active_experiment
    if len(section.experiments) == 1:
        return section.experiments[0]
    known = [e.name for e in section.experiments]
    raise ValueError(
        f"{path}: no active experiment and {len(known)} defined {known}; pass --experiment"
    )


@experiment_app.command("report")
def report(
    log_dir: Annotated[Path, typer.Option("--log-dir", help="Root of the service log.")],
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", help="System TOML with [experiments] (default configs/feed.toml)."
        ),
    ] = None,
    experiment: Annotated[
        str | None,
        typer.Option("--experiment", help="Experiment name (default: the active one)."),
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="Window start: ISO time or 30m/24h/7d ago.")
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", help="Window end (exclusive), same forms.")
    ] = None,
    resalt: Annotated[
        str | None,
        typer.Option("--resalt", help="Reassign logged users with this salt (A/A on the log)."),
    ] = None,
    alpha: Annotated[float, typer.Option("--alpha", help="Significance level.")] = 0.05,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Per-arm CTR, conversion and clicks per user, each arm vs the control, and the SRM check."""
    path = config or DEFAULT_FEED_CONFIG
    try:
        chosen = _choose(load_experiments(path), experiment, path)
        if not log_dir.is_dir():
            what = "is not a directory" if log_dir.exists() else "does not exist"
            raise ValueError(
                f"--log-dir {log_dir}: the log directory {what}; pass the service log's "
                "directory (`mlsd feed serve` prints it at start: 'service log: DIR')"
            )
        start = None if since is None else parse_time(since)
        end = None if until is None else parse_time(until)
        result = experiment_report(
            log_dir, chosen, start=start, end=end, resalt=resalt, alpha=alpha
        )
    except ValueError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    for table in report_tables(result):
        console.print(table)
    srm = result.srm
    verdict = "[red]FLAGGED: do not trust this report[/]" if srm.flagged else "[green]ok[/]"
    console.print(
        f"sample ratio: users {list(srm.observed)} vs expected "
        f"{[round(e, 1) for e in srm.expected]}, p = {srm.p_value:.3g} → {verdict}"
    )
    if result.unknown_arm_users:
        console.print(f"[yellow]{result.unknown_arm_users} user(s) logged in unknown arms[/]")
    if result.mixed_arm_units:
        console.print(
            f"[yellow]{result.mixed_arm_units} unit(s) logged in more than one arm (a changed "
            "salt or weights, or replicas with different configurations): left out[/]"
        )


def _ci(estimate: Estimate, fmt: str = ".4f") -> Text:
    if math.isnan(estimate.value):
        return Text("n/a")
    if math.isnan(estimate.low):  # too few users for an interval
        return Text(f"{estimate.value:{fmt}}")
    return Text(f"{estimate.value:{fmt}} [{estimate.low:{fmt}}, {estimate.high:{fmt}}]")


def report_tables(result: ExperimentReport) -> list[Table]:
    """Traffic per arm, metrics per arm (one column per arm), and a table per arm vs control."""
    salt = f"resalted with {result.salt!r}: A/A" if result.resalted else f"salt {result.salt!r}"
    traffic = Table(title=f"experiment {result.experiment} ({salt})", title_justify="left")
    for column in ("arm", "alias", "weight", "users", "requests", "exposures", "clicks"):
        traffic.add_column(column, justify="left" if column in ("arm", "alias") else "right")
    for arm in result.arms:
        traffic.add_row(
            arm.name, arm.alias, f"{arm.weight:g}", f"{arm.users:,}", f"{arm.requests:,}",
            f"{arm.exposures:,}", f"{arm.clicks:,}",
        )  # fmt: skip
    metrics = Table(title="metrics [95% CI]", title_justify="left")
    metrics.add_column("metric")
    for arm in result.arms:
        metrics.add_column(arm.name, justify="right")
    metrics.add_row("CTR", *[_ci(arm.ctr) for arm in result.arms])
    metrics.add_row("conversion", *[_ci(arm.conversion) for arm in result.arms])
    metrics.add_row("clicks/user", *[_ci(arm.clicks_per_user, ".3f") for arm in result.arms])
    several = len(result.comparisons) > 1
    return [
        traffic,
        metrics,
        *(
            _comparison_table(c, result.alpha, several, trusted=result.trusted)
            for c in result.comparisons
        ),
    ]


def _comparison_table(
    comparison: ArmComparison, alpha: float, several: bool, *, trusted: bool
) -> Table:
    adjusted = ""
    if several and comparison.ctr_p_adjusted is not None:
        adjusted = f"; decision p adjusted for the arms (Holm) {comparison.ctr_p_adjusted:.3g}"
    table = Table(
        title=(
            f"{comparison.arm} vs {comparison.control} (alpha {alpha:g}; bold: significant"
            f"{adjusted})"
        ),
        caption=f"decision: {comparison.decision(trusted=trusted)}",
        caption_justify="left",
        title_justify="left",
    )
    for column in ("test", "lift", "difference [CI]", "p"):
        table.add_column(column, justify="left" if column == "test" else "right")
    rows: list[tuple[str, Comparison | None]] = [
        ("CTR, delta method: decision", comparison.ctr),
        ("CTR, z per exposure: naive", comparison.ctr_per_exposure),
        ("conversion, z on users", comparison.conversion),
        ("clicks/user, Welch t", comparison.clicks_per_user),
    ]
    for test, value in rows:
        if value is None:
            table.add_row(test, "n/a", "too few users", "")
            continue
        decides = value is comparison.ctr
        style = "bold" if (comparison.significant if decides else value.significant) else None
        table.add_row(
            test, f"{value.relative_lift:+.1%}",
            Text(f"{value.difference:+.4f} [{value.low:+.4f}, {value.high:+.4f}]"),
            f"{value.p_value:.3g}", style=style,
        )  # fmt: skip
    return table


@experiment_app.command("size")
def size(
    baseline_ctr: Annotated[float, typer.Option("--baseline-ctr", help="Control rate, e.g. 0.05.")],
    mde: Annotated[
        float, typer.Option("--mde", help="Minimum detectable effect, relative (0.05 = +5%).")
    ],
    alpha: Annotated[float, typer.Option("--alpha", help="Significance level.")] = 0.05,
    target_power: Annotated[float, typer.Option("--power", help="Target power.")] = 0.8,
    one_sided: Annotated[bool, typer.Option("--one-sided", help="One-sided test.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Users per arm to detect a relative lift with the two-proportion z-test."""
    two_sided = not one_sided
    try:
        n = sample_size(baseline_ctr, mde, alpha=alpha, power=target_power, two_sided=two_sided)
        achieved = power(baseline_ctr, mde, n_per_arm=n, alpha=alpha, two_sided=two_sided)
    except ValueError as exc:
        _fail(str(exc))
    if as_json:
        payload = {
            "baseline_ctr": baseline_ctr, "mde": mde, "alpha": alpha, "power": target_power,
            "two_sided": two_sided, "users_per_arm": n, "achieved_power": achieved,
        }  # fmt: skip
        typer.echo(json.dumps(payload))
        return
    console.print(
        f"users per arm: {n:,} (two arms: {2 * n:,}) to detect {baseline_ctr:g} → "
        f"{baseline_ctr * (1 + mde):g} ({mde:+.1%}) at alpha {alpha:g}, power {achieved:.3f}"
    )
