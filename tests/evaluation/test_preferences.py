"""The preferences simulated users click by: the world's ground truth and its drift, the oracle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlsd.data.sources.synthetic import WorldConfig, synthesize
from mlsd.data.sources.world import World
from mlsd.evaluation.preferences import OracleConfig, OraclePreferences, WorldPreferences

DRIFT_AT = "2024-01-16"


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("simulator") / "world"
    config = WorldConfig(
        n_users=500, n_items=200, n_events=20_000, days=30, drift_at=DRIFT_AT, seed=7
    )
    synthesize(config, out, progress=False)
    return out


@pytest.fixture(scope="module")
def world(world_dir: Path) -> World:
    return World.load(world_dir)


def _us(iso: str) -> int:
    return int(pd.Timestamp(iso, tz="UTC").value) // 1_000


# ---------------------------------------------------------------- the world and its drift


def test_world_drift_changes_click_probabilities(world: World) -> None:
    rng = np.random.default_rng(0)
    users = rng.integers(1, 501, 2000)
    items = rng.integers(1, 201, 2000)
    drift = _us(DRIFT_AT)
    natural = WorldPreferences(world)
    just_before = natural.click_probability(users, items, np.full(2000, drift - 1))
    at_drift = natural.click_probability(users, items, np.full(2000, drift))
    assert np.mean(np.abs(just_before - at_drift)) > 0.1 * just_before.mean()

    # force_regime pins the regime whatever the clock; the clock's own regime agrees with it.
    after = WorldPreferences(world, force_regime="after")
    before = WorldPreferences(world, force_regime="before")
    early = np.full(2000, drift - 7 * 86_400_000_000)
    assert np.allclose(after.click_probability(users, items, drift), at_drift)
    assert np.allclose(before.click_probability(users, items, drift - 1), just_before)
    assert np.allclose(
        before.click_probability(users, items, early),
        natural.click_probability(users, items, early),
    )
    assert not np.allclose(
        after.click_probability(users, items, early), before.click_probability(users, items, early)
    )
    assert after.name == "world (after drift)"

    # Unknown ids, and items the world has not created yet, are never clicked; the others'
    # probabilities are probabilities.
    probs = natural.click_probability([1, 999, 2], [1, 1, 999], drift)
    assert probs[0] > 0
    assert probs[1] == probs[2] == 0.0
    exists = world.item_created_us[items - 1] <= drift - 1
    assert 0 < exists.mean() < 1  # the span creates items: some of these do not exist yet
    assert ((just_before[exists] > 0) & (just_before[exists] < 1)).all()
    assert (just_before[~exists] == 0).all()


def test_an_item_is_not_clicked_before_the_world_creates_it(world: World) -> None:
    """A service's catalog can hold items newer than the simulated clock; they do not exist
    then. The freshness feature clamps an item's age at 0, so before the fix such an item
    was the freshest of all (P ~0.02 here, at creation's level) instead of 0."""
    start = _us(world.config.start)
    item = int(np.flatnonzero(world.item_created_us > start + 10 * 86_400_000_000)[0]) + 1
    created = int(world.item_created_us[item - 1])
    users = np.arange(1, 201)
    items = np.full(len(users), item)
    for prefs in (WorldPreferences(world), WorldPreferences(world, force_regime="before")):
        before = prefs.click_probability(users, items, np.full(len(users), created - 1))
        at = prefs.click_probability(users, items, np.full(len(users), created))
        assert (before == 0).all()
        assert (at > 0).all()


def test_after_drift_needs_a_drifting_world(tmp_path: Path) -> None:
    synthesize(WorldConfig(n_users=50, n_items=30, n_events=500, days=5), tmp_path, progress=False)
    with pytest.raises(ValueError, match="no drift_at"):
        WorldPreferences.from_dataset(tmp_path, force_regime="after")


def test_feature_drift_shifts_who_is_active(tmp_path: Path) -> None:
    config = WorldConfig(
        n_users=300,
        n_items=50,
        n_events=2_000,
        days=10,
        drift_at="2024-01-05",
        drift_kind="feature",
    )
    synthesize(config, tmp_path, progress=False)
    prefs = WorldPreferences.from_dataset(tmp_path)
    ids, w_before = prefs.population(_us("2024-01-04"))
    _, w_after = prefs.population(_us("2024-01-06"))
    assert ids.tolist() == list(range(1, 301))
    assert not np.allclose(w_before, w_after)


# ---------------------------------------------------------------- the oracle on real data


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mlsd.data.sources.movielens import import_movielens
    from tests.conftest import dataset_path  # skips, naming MLSD_DATA_DIR, when it is absent

    out = tmp_path_factory.mktemp("ml100k")
    import_movielens(
        "movielens-100k", source=dataset_path("movielens-100k"), out=out, progress=False
    )
    return out


@pytest.mark.dataset
def test_oracle_on_movielens_100k(ml100k: Path) -> None:
    import time

    began = time.perf_counter()
    oracle = OraclePreferences.from_dataset(ml100k, OracleConfig(target_ctr=0.05))
    assert time.perf_counter() - began < 10.0  # seconds on a shared 2-core machine
    events = pd.read_parquet(ml100k / "events.parquet")

    # Users are drawn by their event counts.
    ids, weights = oracle.population(0)
    assert len(ids) == 943
    assert weights.sum() == len(events)

    # Calibration: the oracle's own top-10, users weighted by activity, averages the target.
    top = oracle.top_items(ids, 10)
    probs = oracle.click_probability(np.repeat(ids, 10), top.ravel(), 0).reshape(-1, 10)
    assert ((probs > 0) & (probs < 1)).all()
    assert abs(weights @ probs.mean(axis=1) / weights.sum() - 0.05) < 0.002
    assert (np.diff(probs, axis=1) <= 1e-12).all()  # monotone: better scores, likelier clicks

    # A user's test-period items (the last 20% of time) beat random items on average.
    test = events[events["ts"] >= events["ts"].quantile(0.8)]
    p_test = oracle.click_probability(test["user_id"], test["item_id"], 0)
    rng = np.random.default_rng(0)
    p_random = oracle.click_probability(test["user_id"], rng.choice(oracle.item_ids_, len(test)), 0)
    assert ((p_test > 0) & (p_test < 1)).all()
    assert p_test.mean() > 2 * p_random.mean()
    assert oracle.click_probability([1, 10**9], [10**9, 1], 0).tolist() == [0.0, 0.0]
