"""The simulated world: contract, determinism, time and id invariants, click model, drift."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mlsd.data.schema import (
    EVENTS_FILE,
    EVENTS_SCHEMA,
    ITEMS_FILE,
    TS_TYPE,
    USERS_FILE,
    content_hash,
    read_info,
)
from mlsd.data.sources.synthetic import EVENTS_FILE_SCHEMA, World, WorldConfig, synthesize
from mlsd.data.sources.world import FEATURE_NAMES, US_PER_DAY, US_PER_HOUR

# Small blocks and row groups, so block carry-over and chunked writes are exercised.
SMALL = WorldConfig(
    n_users=600,
    n_items=400,
    n_events=30_000,
    days=14,
    seed=3,
    block_events=4_000,
    chunk_events=7_000,
)
DRIFT_AT = "2024-01-08T12:00"  # inside a block of SMALL (blocks span < 2 days)


def _synth(root: Path, config: WorldConfig) -> Path:
    out = root / f"world-{abs(hash(dataclasses.astuple(config)))}"
    synthesize(config, out, progress=False)
    return out


def _columns(path: Path) -> dict[str, np.ndarray[Any, Any]]:
    """The events of a contract directory as numpy arrays; ts as int64 µs, event as click flag."""
    table = pq.read_table(path / EVENTS_FILE)
    return {
        "user": table["user_id"].to_numpy(),
        "item": table["item_id"].to_numpy(),
        "ts": table["ts"].cast(pa.int64()).to_numpy(),
        "click": pc.equal(table["event"], "click").to_numpy(zero_copy_only=False),
        "session": table["session_id"].to_numpy(),
        "position": table["position"].to_numpy(),
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _synth(tmp_path_factory.mktemp("synthetic"), SMALL)


@pytest.fixture(scope="module")
def events(small: Path) -> dict[str, np.ndarray[Any, Any]]:
    return _columns(small)


# -- the contract ---------------------------------------------------------------------------


def test_files_follow_the_contract(small: Path) -> None:
    events = pq.read_schema(small / EVENTS_FILE)
    assert events.names == EVENTS_FILE_SCHEMA.names
    for field in EVENTS_SCHEMA:
        assert events.field(field.name).type == field.type, field.name
    assert events.field("session_id").type == pa.int64()
    users = pq.read_schema(small / USERS_FILE)
    assert users.names == ["user_id", "age_bucket", "gender", "occupation", "region"]
    assert users.field("user_id").type == pa.int64()
    assert all(users.field(name).type == pa.string() for name in users.names[1:])
    items = pq.read_schema(small / ITEMS_FILE)
    assert items.names == ["item_id", "title", "category", "genres", "created_ts"]
    assert items.field("item_id").type == pa.int64()
    assert items.field("created_ts").type == TS_TYPE
    assert all(items.field(name).type == pa.string() for name in ("title", "category", "genres"))


def test_dataset_json_describes_the_files(small: Path, events: dict[str, np.ndarray]) -> None:
    info = read_info(small)
    assert (info.name, info.licence) == ("synthetic", "generated; no restrictions")
    assert info.source == f"mlsd simulated world (seed {SMALL.seed})"
    assert (info.n_events, info.n_users, info.n_items) == (30_000, 600, 400)
    assert info.content_hash == content_hash(small)
    assert info.extra["config"] == dataclasses.asdict(SMALL)
    assert info.extra["events"]["click"] == int(events["click"].sum())
    assert info.ts_min is not None
    assert info.ts_max is not None
    assert np.datetime64(info.ts_min.replace("+00:00", ""), "us").astype(int) == events["ts"][0]
    assert np.datetime64(info.ts_max.replace("+00:00", ""), "us").astype(int) == events["ts"][-1]


@pytest.mark.parametrize(
    ("n_events", "block_events", "progress"),
    [(30_000, 4_000, False), (1_001, 100, False), (7, 1, True)],
)
def test_exactly_n_events_rows(
    tmp_path: Path, n_events: int, block_events: int, progress: bool
) -> None:
    config = dataclasses.replace(SMALL, n_events=n_events, block_events=block_events)
    out = tmp_path / "world"
    info = synthesize(config, out, progress=progress)
    assert pq.ParquetFile(out / EVENTS_FILE).metadata.num_rows == n_events == info.n_events


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path, small: Path) -> None:
    again = _synth(tmp_path / "again", SMALL)
    other = _synth(tmp_path / "other", dataclasses.replace(SMALL, seed=SMALL.seed + 1))
    assert content_hash(again) == content_hash(small)
    assert content_hash(other) != content_hash(small)


def test_chunk_size_changes_row_groups_not_rows(tmp_path: Path, small: Path) -> None:
    tiny = _synth(tmp_path, dataclasses.replace(SMALL, chunk_events=999))
    assert pq.ParquetFile(tiny / EVENTS_FILE).metadata.num_row_groups == 31  # ceil(30000 / 999)
    assert pq.read_table(tiny / EVENTS_FILE).equals(pq.read_table(small / EVENTS_FILE))


# -- time and ids ---------------------------------------------------------------------------


def test_events_are_time_ordered_inside_the_span(events: dict[str, np.ndarray]) -> None:
    ts = events["ts"]
    start = np.datetime64(SMALL.start, "us").astype(np.int64)
    assert (np.diff(ts) >= 0).all()
    assert ts[0] >= start
    assert ts[-1] < start + SMALL.days * US_PER_DAY
    # ...and they fill it: the first and last day both have events.
    assert ts[0] < start + US_PER_DAY
    assert ts[-1] >= start + (SMALL.days - 1) * US_PER_DAY


def test_ids_exist_and_no_item_is_seen_before_it_is_created(
    small: Path, events: dict[str, np.ndarray]
) -> None:
    users = pq.read_table(small / USERS_FILE)["user_id"].to_numpy()
    items = pq.read_table(small / ITEMS_FILE)
    item_ids = items["item_id"].to_numpy()
    assert np.array_equal(users, np.arange(1, SMALL.n_users + 1))
    assert np.array_equal(item_ids, np.arange(1, SMALL.n_items + 1))
    assert np.isin(events["user"], users).all()
    assert np.isin(events["item"], item_ids).all()
    created = items["created_ts"].cast(pa.int64()).to_numpy()
    assert (events["ts"] >= created[events["item"] - 1]).all()
    # New items do arrive during the span, and they are shown.
    start = np.datetime64(SMALL.start, "us").astype(np.int64)
    assert (created >= start).sum() > 0.1 * SMALL.n_items
    assert (created[events["item"] - 1] >= start).mean() > 0.05


def test_items_have_readable_attributes(small: Path) -> None:
    items = pq.read_table(small / ITEMS_FILE).to_pylist()
    assert items[0]["title"] == "item 1"
    assert all(row["genres"].split("|")[0] == row["category"] for row in items)
    assert any("|" in row["genres"] for row in items)
    assert len({row["category"] for row in items}) == SMALL.n_categories


def test_sessions_are_consecutive_views_with_clicks_after_their_view(
    events: dict[str, np.ndarray],
) -> None:
    session, position, click, ts = (
        events["session"],
        events["position"],
        events["click"],
        events["ts"],
    )
    views = ~click
    order = np.lexsort((position, session))
    # Within a session, views are 0, 1, 2, ... in time order and all by one user.
    v = order[views[order]]
    first = np.r_[True, session[v][1:] != session[v][:-1]]
    assert (position[v][first] == 0).all()
    assert (np.diff(position[v])[~first[1:]] == 1).all()
    assert (np.diff(ts[v])[~first[1:]] > 0).all()
    assert (np.diff(events["user"][v])[~first[1:]] == 0).all()
    # Each click follows its own view (same session, position, user and item).
    view_key = session[views] * 1_000 + position[views]
    click_key = session[click] * 1_000 + position[click]
    idx = np.searchsorted(view_key, click_key, sorter=np.argsort(view_key))
    matched = np.argsort(view_key)[idx]
    assert np.array_equal(view_key[matched], click_key)
    assert np.array_equal(events["item"][views][matched], events["item"][click])
    assert (events["ts"][views][matched] < ts[click]).all()
    # Sessions are numbered in the order they start.
    starts = np.full(session.max() + 1, np.iinfo(np.int64).max)
    np.minimum.at(starts, session, ts)
    assert np.array_equal(np.unique(session), np.arange(session.max() + 1))
    assert (np.diff(starts) >= 0).all()


# -- the shape of activity ------------------------------------------------------------------


def test_popularity_is_long_tailed(events: dict[str, np.ndarray]) -> None:
    counts = np.sort(np.bincount(events["item"][~events["click"]]))[::-1]
    assert counts[: SMALL.n_items // 10].sum() > 0.4 * counts.sum()


def test_activity_has_daily_seasonality(events: dict[str, np.ndarray]) -> None:
    hours = np.bincount((events["ts"] % US_PER_DAY) // US_PER_HOUR, minlength=24)
    night, evening = hours[2:6].sum(), hours[18:22].sum()
    assert evening > 5 * night


def test_seasonality_follows_the_clock_whatever_the_start() -> None:
    world = World.create(dataclasses.replace(SMALL, start="2024-01-01T09:30:00", days=28))
    _, _, ts = world.sample_interactions(50_000, seed=0)
    ts_us = ts.astype(np.int64)
    hours = np.bincount((ts_us % US_PER_DAY) // US_PER_HOUR, minlength=24)
    assert hours[18:22].sum() > 5 * hours[2:6].sum()
    weekday = (ts_us // US_PER_DAY + 3) % 7  # Monday is 0
    per_day = np.bincount(weekday, minlength=7) / 4  # four weeks
    assert per_day[5:].mean() > 1.15 * per_day[:5].mean()


def test_users_stick_to_their_tastes(small: Path, events: dict[str, np.ndarray]) -> None:
    world = World.load(small)
    views = ~events["click"]
    users, cats = events["user"][views], world.item_category[events["item"][views] - 1]
    # Category of a view vs the category a random other user would pick: tastes matter.
    own = world.user_taste[users - 1, cats].mean()
    shuffled = world.user_taste[np.random.default_rng(0).permutation(users) - 1, cats].mean()
    assert own > 1.5 * shuffled


# -- the click model ------------------------------------------------------------------------


def test_clicks_follow_the_true_click_probability(
    small: Path, events: dict[str, np.ndarray]
) -> None:
    world = World.load(small)
    views = ~events["click"]
    p = world.click_probability(events["user"][views], events["item"][views], events["ts"][views])
    n_views, n_clicks = views.sum(), events["click"].sum()
    assert 0.02 < p.mean() < 0.15
    se = np.sqrt(p.mean() * (1 - p.mean()) / n_views)
    assert abs(n_clicks / n_views - p.mean()) < 4 * se
    # The label of a view is a click with the same (session, position); clicked views are likelier.
    key = events["session"] * 1_000 + events["position"]
    clicked = np.isin(key[views], key[events["click"]])
    assert p[clicked].mean() > 1.5 * p[~clicked].mean()


def test_click_probability_is_logistic_in_the_features(small: Path) -> None:
    world = World.load(small)
    users, items, ts = world.sample_interactions(1_000, seed=1)
    x = world.click_features(users, items, ts)
    assert x.shape == (1_000, len(FEATURE_NAMES)) == (1_000, world.click_weights.shape[0])
    logit = world.click_bias + x @ world.click_weights
    assert np.allclose(world.click_probability(users, items, ts), 1 / (1 + np.exp(-logit)))
    assert (x.std(axis=0) > 0).all()  # every feature varies
    # Timestamps as datetime64 and as int64 µs give the same answer.
    as_int = ts.astype("datetime64[us]").astype(np.int64)
    assert np.array_equal(
        world.click_probability(users, items, as_int), world.click_probability(users, items, ts)
    )


def test_an_item_cannot_be_clicked_before_it_is_created(small: Path) -> None:
    """An item does not exist before its creation: probability 0 there, though its features
    (freshness clamped at age 0) are those at creation, where it is the freshest."""
    world = World.load(small)
    late = np.flatnonzero(world.item_created_us > SMALL.start_us + 3 * US_PER_DAY)
    items = np.repeat(late[:20] + 1, 10)
    users = np.tile(np.arange(1, 11), 20)
    created = world.item_created_us[items - 1]
    for ts in (created - 1, created - 5 * US_PER_DAY):
        assert (world.click_probability(users, items, ts) == 0).all()
        freshness = world.click_features(users, items, ts)[:, FEATURE_NAMES.index("item_freshness")]
        assert (freshness == 1).all()
    assert (world.click_probability(users, items, created) > 0).all()
    # One call mixing times before and after creation zeroes only the former.
    mixed = np.where(np.arange(len(items)) % 2 == 0, created - 1, created + US_PER_HOUR)
    probs = world.click_probability(users, items, mixed)
    assert (probs[::2] == 0).all()
    assert (probs[1::2] > 0).all()


def test_click_probability_rejects_unknown_ids(small: Path) -> None:
    world = World.load(small)
    with pytest.raises(ValueError, match="user_ids"):
        world.click_probability([SMALL.n_users + 1], [1], [0])
    with pytest.raises(ValueError, match="item_ids"):
        world.click_probability([1], [0], [0])


def test_save_load_round_trip(small: Path, tmp_path: Path) -> None:
    created = World.create(SMALL)
    loaded = World.load(small)
    users, items, ts = created.sample_interactions(2_000, seed=5)
    assert np.array_equal(
        created.click_probability(users, items, ts), loaded.click_probability(users, items, ts)
    )
    loaded.save(tmp_path)
    again = World.load(tmp_path)
    assert again.click_bias == created.click_bias
    assert again.config == SMALL
    for name in ("user_taste", "item_factors", "item_created_us"):
        assert np.array_equal(getattr(again, name), getattr(created, name))
    assert np.array_equal(
        again.sample_interactions(100, seed=7)[1], created.sample_interactions(100, seed=7)[1]
    )


def test_interactions_respect_creation_and_the_span(small: Path) -> None:
    world = World.load(small)
    users, items, ts = world.sample_interactions(5_000, seed=2)
    ts_us = ts.astype(np.int64)
    assert (np.diff(ts_us) >= 0).all()
    assert (ts_us >= world.item_created_us[items - 1]).all()
    assert users.min() >= 1
    assert users.max() <= SMALL.n_users
    assert ts_us.min() >= SMALL.start_us
    assert ts_us.max() < SMALL.end_us


# -- drift ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def taste_drift(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = dataclasses.replace(SMALL, drift_at=DRIFT_AT, drift_kind="tastes")
    return _synth(tmp_path_factory.mktemp("drift"), config)


def _category_shift(path: Path) -> float:
    """Total variation between the category mix of active users' views before vs after drift."""
    world, events = World.load(path), _columns(path)
    views = ~events["click"]
    user, ts = events["user"][views], events["ts"][views]
    cat = world.item_category[events["item"][views] - 1]
    after = ts >= np.datetime64(DRIFT_AT, "us").astype(np.int64)
    both = np.intersect1d(user[after], user[~after])
    shift = []
    for u in both[:200]:
        mine = user == u
        before_mix = np.bincount(cat[mine & ~after], minlength=SMALL.n_categories)
        after_mix = np.bincount(cat[mine & after], minlength=SMALL.n_categories)
        if before_mix.sum() >= 10 and after_mix.sum() >= 10:
            tv = 0.5 * np.abs(before_mix / before_mix.sum() - after_mix / after_mix.sum()).sum()
            shift.append(tv)
    return float(np.mean(shift))


def test_taste_drift_changes_what_users_view(small: Path, taste_drift: Path) -> None:
    assert _category_shift(taste_drift) > _category_shift(small) + 0.15


def test_taste_drift_changes_click_probability_only_after_drift_at(
    small: Path, taste_drift: Path
) -> None:
    drifted, steady = World.load(taste_drift), World.load(small)
    users, items, _ = steady.sample_interactions(2_000, seed=4)
    drift_us = np.datetime64(DRIFT_AT, "us").astype(np.int64)
    before = np.full(len(users), drift_us - 1)
    after = np.full(len(users), drift_us)
    assert np.array_equal(
        drifted.click_probability(users, items, before),
        steady.click_probability(users, items, before),
    )
    changed = drifted.click_probability(users, items, after) != drifted.click_probability(
        users, items, before
    )
    assert changed.mean() > 0.9
    # Events of the blocks before the one holding drift_at are those of the world without drift.
    ev_drift, ev_steady = _columns(taste_drift), _columns(small)
    n = np.searchsorted(ev_steady["ts"], drift_us - 2 * US_PER_DAY)
    assert n > 0.3 * SMALL.n_events
    for column in ("user", "item", "ts", "click"):
        assert np.array_equal(ev_drift[column][:n], ev_steady[column][:n])


def test_feature_drift_shifts_who_is_active_not_click_probability(
    tmp_path: Path, small: Path
) -> None:
    out = _synth(tmp_path, dataclasses.replace(SMALL, drift_at=DRIFT_AT, drift_kind="feature"))
    world, events = World.load(out), _columns(out)
    young = world.user_age[events["user"] - 1] <= 1  # "under 18" and "18-24"
    after = events["ts"] >= np.datetime64(DRIFT_AT, "us").astype(np.int64)
    assert young[after].mean() > young[~after].mean() + 0.1
    users, items, ts = world.sample_interactions(1_000, seed=0)
    steady = World.load(small)
    assert np.array_equal(
        world.click_probability(users, items, ts), steady.click_probability(users, items, ts)
    )


# -- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"n_events": 0}, "n_events"),
        ({"n_items": 5, "n_categories": 20}, "n_items"),
        ({"drift_kind": "weather"}, "drift_kind"),
        ({"drift_at": "2023-06-01"}, "drift_at"),
        ({"drift_at": "not a date"}, "drift_at"),
        ({"start": "yesterday"}, "start"),
        ({"target_ctr": 1.5}, "target_ctr"),
        ({"mean_view_gap_s": 0.5}, "mean_view_gap_s"),
        ({"chunk_events": 0}, "chunk_events"),
    ],
)
def test_bad_config_names_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"WorldConfig.{field}"):
        WorldConfig(**change)
