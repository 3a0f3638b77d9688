"""``mlsd plan``: step 1, requirements → capacity plan."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mlsd import HELP_MARKUP

if TYPE_CHECKING:
    from mlsd.config import FeedConfig
    from mlsd.plan.capacity import SourceMemory

app = typer.Typer(
    rich_markup_mode=HELP_MARKUP,
    help="Step 1, requirements: the capacity a system needs for its traffic.",
    no_args_is_help=True,
)

console = Console()
err_console = Console(stderr=True)


def memory_sources(feed: FeedConfig) -> dict[str, SourceMemory]:
    """What each of the config's sources keeps in a replica's memory, as far as its section
    tells (a source of a kind not listed here is left out, and the plan warns about it)."""
    from mlsd import config as c
    from mlsd.plan import capacity as p

    out: dict[str, SourceMemory] = {}
    for name in feed.retrieval.sources:
        section = feed.retrieval.source_configs[name]
        if isinstance(section, c.ALSSource):
            out[name] = p.VectorSource(section.factors, user_vectors=True, fold_in=True)
        elif isinstance(section, c.BPRSource):
            out[name] = p.VectorSource(section.factors, user_vectors=True, item_bias=True)
        elif isinstance(section, c.TwoTowerSource):
            out[name] = p.VectorSource(section.dim, history_embeddings=True)
        elif isinstance(section, c.PopularitySource):
            out[name] = p.PopularityList()
        elif isinstance(section, c.SegmentPopularitySource):
            out[name] = p.SegmentLists()
        elif isinstance(section, c.CovisitationSource):
            out[name] = p.CovisitationTable(section.max_neighbours)
        elif isinstance(section, c.EASESource):
            out[name] = p.EASEWeights(section.max_items)
    return out


def _overrides(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set users=2_000_000")
        out[key.strip()] = value.strip()
    return out


@app.command()
def capacity(
    config: Annotated[
        Path | None,
        typer.Option("--config", help="The system's TOML; its `[plan]` holds the requirements."),
    ] = None,
    measured: Annotated[
        Path | None,
        typer.Option(
            "--measured",
            help="JSON of a `bench/serving.py` run (`--out FILE`): the CPU per request and per "
            "batch user, and the latency, the plan's cores and replicas come from.",
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a `[plan]` key, e.g. `--set users=2_000_000`."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Peak requests/s, service cores and replicas, the batch run, the precomputed store, the
    candidate sources' memory and the latency budget for the `[plan]` requirements, from
    measured costs (which the plan warns about when measured on another pipeline)."""
    from mlsd.config import feed_config_source, load_feed_config, load_plan_requirements
    from mlsd.plan.capacity import Measured, capacity_plan
    from mlsd.plan.pipeline import Pipeline

    err_console.print(feed_config_source(config), highlight=False, markup=False)
    requirements = load_plan_requirements(config, _overrides(set_ or []))
    costs = Measured.from_file(measured) if measured is not None else None
    feed = load_feed_config(config)
    plan = capacity_plan(
        requirements,
        costs,
        sources=memory_sources(feed),
        source_names=feed.retrieval.sources,
        pipeline=Pipeline.of_config(config),
    )
    if as_json:
        print(json.dumps(plan.to_dict(), indent=2))
        return
    title = "capacity plan" + (f" (costs: {escape(costs.source)})" if costs is not None else "")
    table = Table(title=title, title_justify="left")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_column("unit")
    table.add_column("how", overflow="fold")
    for line in plan.lines:
        whole = line.value >= 100 or float(line.value).is_integer()
        value = f"{line.value:,.0f}" if whole else f"{line.value:.3g}"
        table.add_row(escape(line.name), value, line.unit, escape(line.how))
    console.print(table)
    for warning in plan.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
