"""Fixtures of the retrieval tests."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from mlsd.data.sources.synthetic import WorldConfig, synthesize
from mlsd.models.retrieval.base import RetrievalData


@pytest.fixture(scope="session")
def contract_data(tmp_path_factory: pytest.TempPathFactory) -> RetrievalData:
    """A small simulated world cut at 80% of its time span."""
    out = tmp_path_factory.mktemp("contract-world")
    synthesize(
        WorldConfig(n_users=200, n_items=150, n_events=20_000, days=20, seed=5), out, progress=False
    )
    events = pq.read_table(out / "events.parquet").to_pandas()
    cutoff = events["ts"].quantile(0.8)
    return RetrievalData(
        events=events[events["ts"] < cutoff].reset_index(drop=True),
        users=pq.read_table(out / "users.parquet").to_pandas(),
        items=pq.read_table(out / "items.parquet").to_pandas(),
        cutoff=cutoff,
    )
