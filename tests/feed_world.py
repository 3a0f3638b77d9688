"""Small simulated worlds for tests: cut for retrieval, or with the feed's feature store
applied and materialized."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from mlsd.cli import run
from mlsd.data.sources.synthetic import WorldConfig, synthesize
from mlsd.models.retrieval.base import RetrievalData


def materialized_world(root: Path, config_text: str, *, seed: int) -> tuple[Path, Path]:
    """(world, config): 300 users, 120 items, 30k events over 30 days under ``root``, and
    ``config_text`` written as its feed config, features applied and materialized."""
    world = root / "world"
    synthesize(
        WorldConfig(n_users=300, n_items=120, n_events=30_000, days=30, seed=seed),
        world,
        progress=False,
    )
    config = root / "feed.toml"
    config.write_text(config_text)
    for step in ("apply", "materialize"):
        args = ["feed", "features", step, "--dataset", str(world), "--config", str(config)]
        assert run(args) == 0, f"mlsd {' '.join(args)} failed"
    return world, config


def retrieval_world(out: Path, config: WorldConfig) -> RetrievalData:
    """The world of ``config`` written to ``out``, cut at 80% of its events' time span: the
    events before the cut, its users and its catalog."""
    synthesize(config, out, progress=False)
    events = pq.read_table(out / "events.parquet").to_pandas()
    cutoff = events["ts"].quantile(0.8)
    return RetrievalData(
        events=events[events["ts"] < cutoff].reset_index(drop=True),
        users=pq.read_table(out / "users.parquet").to_pandas(),
        items=pq.read_table(out / "items.parquet").to_pandas(),
        cutoff=cutoff,
    )
