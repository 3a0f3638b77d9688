"""Fixtures of the feature tests: one small simulated world per module, and its config."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlsd.data.sources.synthetic import WorldConfig, synthesize
from mlsd.features import batch
from mlsd.features.definitions import FeatureConfig


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    synthesize(WorldConfig(n_users=300, n_items=100, n_events=20_000, days=20), out, progress=False)
    return out


@pytest.fixture(scope="module")
def config(world: Path) -> FeatureConfig:
    return batch.feature_config_for(world)
