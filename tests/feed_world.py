"""A small simulated world with its feature store applied and materialized, for feed tests."""

from __future__ import annotations

from pathlib import Path

from mlsd.cli import run
from mlsd.data.sources.synthetic import WorldConfig, synthesize


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
