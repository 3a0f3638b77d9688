"""Shared fixtures: where the public datasets live, and small contract directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """Public datasets: ``$MLSD_DATA_DIR``, else ``../shared/data`` beside the repository."""
    return Path(os.environ.get("MLSD_DATA_DIR", REPO.parent / "shared" / "data"))


def dataset_path(name: str) -> Path:
    """Path of one public dataset; skips outside CI when it is missing, fails in CI."""
    path = shared_data_dir() / name
    if not path.is_dir():
        reason = f"dataset {name!r} not found at {path}; set MLSD_DATA_DIR to the folder holding it"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture
def ml100k_dir() -> Path:
    """The unpacked MovieLens 100K folder (``u.data``, ``u.user``, ``u.item``, ...)."""
    return dataset_path("movielens-100k")


@pytest.fixture
def ml_latest_small_dir() -> Path:
    """The unpacked MovieLens latest-small folder (``ratings.csv``, ``movies.csv``, ...)."""
    return dataset_path("movielens-latest-small")
