"""``mlsd feed experiment report|size``: A/B tests over the service log, and their sizing.

Experiments are defined in the system TOML under ``[experiments]`` (see
:class:`~mlsd.evaluation.experiments.ExperimentsSection`); the report reads only that table of
the file, so it works with any system config. Bad input (no such experiment, nothing logged in
the window or nothing in the configured arms, a malformed ``--since``) prints one line and exits
2.

``size`` sizes the report's decision test, the delta-method CTR over users: users who see
``--exposures-per-user`` items each with an intra-user click correlation ``--icc`` (default 0,
independent clicks, a lower bound), or both measured on a pilot's log (``--pilot-log``).
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
    Pilot,
    design_effect,
    experiment_report,
    power,
    read_pilot,
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
    verdict = "[green]ok[/]"
    if srm.flagged:
        verdict = "[red]FLAGGED: do not trust this report[/]"
    elif not result.trusted:  # no unit to test: no evidence the split is sound
        verdict = "[red]not checked (no units): do not trust this report[/]"
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
    mde: Annotated[
        float, typer.Option("--mde", help="Minimum detectable effect, relative (0.05 = +5%).")
    ],
    baseline_ctr: Annotated[
        float | None,
        typer.Option("--baseline-ctr", help="Control CTR, e.g. 0.05 (default: the pilot's)."),
    ] = None,
    exposures_per_user: Annotated[
        float | None,
        typer.Option(
            "--exposures-per-user",
            help="Mean items a user is shown over the experiment (default 1). With --icc, "
            "every user is taken to see as many; when they differ, size from a pilot "
            "(--pilot-log), whose design effect covers it.",
        ),
    ] = None,
    icc: Annotated[
        float | None,
        typer.Option(
            "--icc",
            help="Intra-user correlation of clicks, 0 to 1 (default 0: independent clicks, "
            "a lower bound on the users).",
        ),
    ] = None,
    pilot_log: Annotated[
        Path | None,
        typer.Option(
            "--pilot-log",
            help="Service log of a pilot, over a window as long as the experiment's: measures "
            "exposures per user and the design effect.",
        ),
    ] = None,
    pilot_experiment: Annotated[
        str,
        typer.Option(
            "--pilot-experiment",
            help="The pilot's experiment, arms pooled (default: traffic outside any).",
        ),
    ] = "",
    since: Annotated[
        str | None, typer.Option("--since", help="Pilot window start: ISO time or 7d ago.")
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", help="Pilot window end (exclusive), same forms.")
    ] = None,
    alpha: Annotated[float, typer.Option("--alpha", help="Significance level.")] = 0.05,
    target_power: Annotated[float, typer.Option("--power", help="Target power.")] = 0.8,
    one_sided: Annotated[bool, typer.Option("--one-sided", help="One-sided test.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Users per arm for the report's decision test (delta-method CTR over users) to detect a
    relative lift.

    The exposures the two-proportion z-test needs, divided among users who see
    --exposures-per-user items each, inflated by the design effect 1 + (m - 1) * icc of their
    correlated clicks: users = ceil(exposures * (1 + (m - 1) * icc) / m). With --pilot-log
    both m and the design effect are measured on a log instead.
    """
    two_sided = not one_sided
    try:
        pilot = _pilot(pilot_log, pilot_experiment, since, until, exposures_per_user, icc)
        if baseline_ctr is None:
            if pilot is None:
                raise ValueError("pass --baseline-ctr, or --pilot-log to measure it")
            baseline_ctr = pilot.ctr
        if pilot is None:
            m = 1.0 if exposures_per_user is None else exposures_per_user
            effect = design_effect(m, 0.0 if icc is None else icc)
        else:
            m, effect = pilot.exposures_per_user, pilot.design_effect
        exposures = sample_size(
            baseline_ctr, mde, alpha=alpha, power=target_power, two_sided=two_sided
        )
        users = sample_size(
            baseline_ctr, mde, alpha=alpha, power=target_power, two_sided=two_sided,
            exposures_per_user=m, design_effect=effect,
        )  # fmt: skip
        achieved = power(
            baseline_ctr, mde, n_per_arm=users, alpha=alpha, two_sided=two_sided,
            exposures_per_user=m, design_effect=effect,
        )  # fmt: skip
    except ValueError as exc:
        _fail(str(exc))
    assumption = _size_assumption(m, icc, effect, pilot is not None)
    if as_json:
        payload = {
            "baseline_ctr": baseline_ctr, "mde": mde, "alpha": alpha, "power": target_power,
            "two_sided": two_sided, "users_per_arm": users,
            "exposures_per_arm": round(users * m), "exposures_per_user": m,
            "icc": None if pilot else (icc or 0.0), "design_effect": effect,
            "independent_exposures_per_arm": exposures, "achieved_power": achieved,
            "assumption": assumption,
            "pilot": None if pilot is None else {
                "log": str(pilot_log), "experiment": pilot_experiment, "units": pilot.units,
                "exposures_per_user": pilot.exposures_per_user, "ctr": pilot.ctr,
                "design_effect": pilot.design_effect, "icc": _finite(pilot.icc),
                "exposures_per_exposure": pilot.exposures_per_exposure,
            },
        }  # fmt: skip
        typer.echo(json.dumps(payload))
        return
    if pilot is not None:
        which = f"experiment {pilot_experiment!r}" if pilot_experiment else "no experiment"
        icc_seen = f" (intra-user correlation {pilot.icc:.3g})" if math.isfinite(pilot.icc) else ""
        console.print(
            f"pilot: {pilot.units:,} users of {pilot_log} ({which}): "
            f"{pilot.exposures_per_user:.3g} exposures per user, CTR {pilot.ctr:.4g}, design "
            f"effect {pilot.design_effect:.3g}{icc_seen}",
            highlight=False,
        )
    console.print(
        f"users per arm: {users:,} (two arms: {2 * users:,}) to detect {baseline_ctr:g} → "
        f"{baseline_ctr * (1 + mde):g} ({mde:+.1%}) at alpha {alpha:g}, power {achieved:.3f}",
        highlight=False,
    )
    console.print(
        f"exposures per arm: {round(users * m):,} ({m:.3g} per user; {exposures:,} if "
        f"independent, design effect {effect:.3g})",
        highlight=False,
    )
    console.print(f"assumes {assumption}", highlight=False)


def _pilot(
    log_dir: Path | None,
    experiment: str,
    since: str | None,
    until: str | None,
    exposures_per_user: float | None,
    icc: float | None,
) -> Pilot | None:
    """The pilot of ``--pilot-log`` in the window, or None without one."""
    if log_dir is None:
        if since is not None or until is not None:
            raise ValueError("--since and --until choose the window of --pilot-log; pass one")
        return None
    if exposures_per_user is not None or icc is not None:
        raise ValueError(
            "--pilot-log measures the exposures per user and the design effect; drop "
            "--exposures-per-user and --icc, or drop --pilot-log"
        )
    if not log_dir.is_dir():
        what = "is not a directory" if log_dir.exists() else "does not exist"
        raise ValueError(f"--pilot-log {log_dir}: the log directory {what}")
    start = None if since is None else parse_time(since)
    end = None if until is None else parse_time(until)
    return read_pilot(log_dir, experiment, start=start, end=end)


def _size_assumption(m: float, icc: float | None, effect: float, measured: bool) -> str:
    """The sizing's assumption in words, with what to do when it is the default."""
    test = "the report's decision test (delta-method CTR over users)"
    if measured:
        return (
            f"{test}; the pilot's exposures per user and design effect {effect:.3g} "
            "(its clicks' correlation within users and spread of exposures per user)"
        )
    said = f"{test}; {m:g} exposure(s) per user, intra-user click correlation {icc or 0:g}"
    if m == 1:
        return (
            f"{said}: independent exposures. Users shown several items need fewer of them: "
            "pass --exposures-per-user and --icc, or --pilot-log"
        )
    if not icc:
        return (
            f"{said} (independent clicks): a lower bound, users who differ in how much they "
            "click need 1 + (m - 1) * icc times as many; pass --icc or --pilot-log"
        )
    return said


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
