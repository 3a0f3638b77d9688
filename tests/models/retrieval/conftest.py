"""Fixtures of the retrieval tests."""

from __future__ import annotations

import pytest

from mlsd.data.sources.synthetic import WorldConfig
from mlsd.models.retrieval.base import RetrievalData
from tests.feed_world import retrieval_world


@pytest.fixture(scope="session")
def contract_data(tmp_path_factory: pytest.TempPathFactory) -> RetrievalData:
    """A small simulated world cut at 80% of its time span."""
    config = WorldConfig(n_users=200, n_items=150, n_events=20_000, days=20, seed=5)
    return retrieval_world(tmp_path_factory.mktemp("contract-world"), config)
