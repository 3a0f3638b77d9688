"""Request-time features: hand-computed values, defaults, broadcasting, batch/online agreement."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from mlsd.data.sources.csvfile import import_csv
from mlsd.data.sources.synthetic import WorldConfig, synthesize
from mlsd.features.batch import (
    feature_config_for,
    stored_item_features,
    stored_user_features,
    training_features,
)
from mlsd.features.definitions import FeatureConfig, feature_set
from mlsd.features.derive import _in_rows, derive, item_arrays, user_arrays

CONFIG = FeatureConfig(history_len=4, windows_days=(1, 7), categories=("a", "b", "c"))
NOW = int(pd.Timestamp("2024-03-01 12:34:56", tz="UTC").timestamp())  # a Friday
DERIVED = feature_set(CONFIG).names("context") + feature_set(CONFIG).names("cross")


def _user(**overrides: object) -> dict[str, np.ndarray]:
    """One known user: last event 10 min ago in a 3-event session, 8 events in 7 days."""
    user = {
        "recent_item_ids": np.array([[11, 12, 13, -1]]),
        "recent_ts": np.array([[NOW - 600, NOW - 700, NOW - 900, 0]]),
        "recent_len": np.array([3]),
        "last_event_ts": np.array([NOW - 600]),
        "session_events": np.array([3]),
        "events_1d": np.array([4.0], dtype=np.float32),
        "events_7d": np.array([8.0], dtype=np.float32),
        "cat_count_1d": np.array([[1.0, 3.0, 0.0]], dtype=np.float32),
        "cat_count_7d": np.array([[2.0, 4.0, 1.0]], dtype=np.float32),
        "user_known": np.array([1]),
    }
    user.update({k: np.asarray(v) for k, v in overrides.items()})
    return user


def _items() -> dict[str, np.ndarray]:
    """Items 12 (seen, category b, 2 days old), 20 (category a, never seen) and 99 (unknown)."""
    return {
        "item_id": np.array([12, 20, 99]),
        "item_first_ts": np.array([NOW - 2 * 86_400, NOW - 43_200, 0]),
        "category_index": np.array([1, 0, -1]),
        "item_known": np.array([1, 1, 0]),
        "item_events_1d": np.zeros(3, dtype=np.float32),
    }


def test_hand_computed_context_and_cross_features() -> None:
    out = derive(_user(), _items(), now_s=NOW, config=CONFIG)
    assert list(out) == DERIVED
    assert list(out["hour_of_day"]) == [12, 12, 12]
    assert list(out["day_of_week"]) == [4, 4, 4]
    assert list(out["seconds_since_last_event"]) == [600.0] * 3
    assert list(out["session_events_now"]) == [3] * 3
    assert out["item_age_days"] == pytest.approx([2.0, 0.5, -1.0])
    assert out["category_affinity"] == pytest.approx([4 / 8, 2 / 8, 0.0])  # longest window: 7d
    assert list(out["seen_recently"]) == [1, 0, 0]
    assert list(out["user_known"]) == [1, 1, 1]
    assert list(out["item_known"]) == [1, 1, 0]
    dtypes = {f.name: f.dtype for f in feature_set(CONFIG).features}
    assert {k: v.dtype.name for k, v in out.items()} == {k: dtypes[k] for k in out}


def test_the_session_ends_after_session_gap_s() -> None:
    config = FeatureConfig(history_len=4, windows_days=(7,), categories=("a", "b", "c"))
    for since, expected in [(1800, 3), (1801, 0)]:
        user = _user(last_event_ts=[NOW - since])
        out = derive(user, _items(), now_s=NOW, config=config)
        assert list(out["session_events_now"]) == [expected] * 3


def test_unknown_users_get_the_declared_defaults() -> None:
    defaults = feature_set(CONFIG).defaults("cross")
    unknown = user_arrays({name: [None] for name in ("last_event_ts",)}, CONFIG)
    out = derive(unknown, _items(), now_s=NOW, config=CONFIG)
    for name, default in defaults.items():
        if name != "item_age_days":  # an item feature
            assert list(out[name]) == [default] * 3, name
    assert list(out["user_known"]) == [0, 0, 0]


def test_a_clock_behind_a_pushed_event_never_gives_negative_ages() -> None:
    user = _user(last_event_ts=[NOW + 5])
    items = {**_items(), "item_first_ts": np.array([NOW + 5, NOW, 0])}
    out = derive(user, items, now_s=NOW, config=CONFIG)
    assert list(out["seconds_since_last_event"]) == [0.0] * 3
    assert list(out["item_age_days"]) == [0.0, 0.0, -1.0]


def test_one_user_broadcast_equals_one_row_per_item() -> None:
    user, items = _user(), _items()
    repeated = {name: np.repeat(value, 3, axis=0) for name, value in user.items()}
    once = derive(user, items, now_s=NOW, config=CONFIG)
    rows = derive(repeated, items, now_s=np.full(3, NOW), config=CONFIG)
    assert once.keys() == rows.keys()
    for name in once:
        np.testing.assert_array_equal(once[name], rows[name], err_msg=name)


def test_per_row_users_and_times_are_not_mixed_up() -> None:
    user = {name: np.repeat(value, 3, axis=0) for name, value in _user().items()}
    user["cat_count_7d"] = np.array([[8, 0, 0], [0, 8, 0], [0, 0, 8]], dtype=np.float32)
    user["last_event_ts"] = np.array([NOW - 10, NOW - 20, NOW - 30])
    out = derive(user, _items(), now_s=np.array([NOW, NOW + 3600, NOW]), config=CONFIG)
    assert list(out["category_affinity"]) == [0.0, 0.0, 0.0]  # 12 is b, 20 is a, 99 unknown
    assert list(out["seconds_since_last_event"]) == [10.0, 3620.0, 30.0]
    assert list(out["hour_of_day"]) == [12, 13, 12]


def _users(m: int, seed: int) -> dict[str, np.ndarray]:
    """``m`` users (one row each, as batch prediction reads them), a few cold."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, CONFIG.history_len + 1, m)
    real = np.arange(CONFIG.history_len) < lengths[:, None]
    # Item -1 is a real item too: only ``recent_len`` tells it from the padding.
    recent = np.where(real, rng.integers(-1, 40, (m, CONFIG.history_len)), -1)
    known = (rng.random(m) < 0.8).astype(np.int64)
    return {
        "recent_item_ids": recent,
        "recent_ts": np.where(real, NOW - 600, 0),
        "recent_len": lengths,
        "last_event_ts": np.where(known == 1, NOW - rng.integers(0, 9000, m), -1),
        "session_events": rng.integers(0, 5, m),
        "events_1d": rng.integers(0, 9, m).astype(np.float32),
        "events_7d": rng.integers(0, 30, m).astype(np.float32),
        "cat_count_1d": rng.integers(0, 4, (m, 3)).astype(np.float32),
        "cat_count_7d": rng.integers(0, 9, (m, 3)).astype(np.float32),
        "user_known": known,
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_owners_give_what_the_repeated_user_rows_give(seed: int) -> None:
    # Batch prediction passes each user once and the owner of every item row; the features
    # must be derive's of the user rows repeated per item, to the bit.
    rng = np.random.default_rng(seed)
    users, n = _users(7, seed), 120
    owner = np.sort(rng.integers(0, 7, n))
    item_ids = rng.integers(-1, 40, n)
    item_ids[::5] = users["recent_item_ids"][owner[::5], 0]  # seen items (and -1 pads)
    items = {
        "item_id": item_ids,
        "item_first_ts": np.where(rng.random(n) < 0.2, 0, NOW - rng.integers(0, 10**6, n)),
        "category_index": rng.integers(-1, 3, n),
        "item_known": rng.integers(0, 2, n),
    }
    repeated = {name: value[owner] for name, value in users.items()}
    want = derive(repeated, items, now_s=NOW, config=CONFIG)
    got = derive(users, items, now_s=NOW, config=CONFIG, owner=owner)
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert got["seen_recently"].any()
    assert not got["seen_recently"].all()


def test_owned_lists_too_wide_to_offset_are_compared_row_by_row() -> None:
    lists = np.array([[3, 2**61, -1], [7, 8, 9]])
    real = np.array([[True, True, False], [True, True, True]])
    owner = np.array([0, 0, 1, 1, 0])
    values = np.array([2**61, 7, 8, 2**60, -1])
    want = ((lists[owner] == values[:, None]) & real[owner]).any(axis=1)
    np.testing.assert_array_equal(_in_rows(lists, real, owner, values), want)
    assert want.tolist() == [True, False, True, False, False]  # the -1 is padding
    assert _in_rows(lists, real, owner[:0], values[:0]).shape == (0,)


def test_an_item_with_id_minus_one_is_seen_only_when_it_is_a_recent_item(
    tmp_path: Path,
) -> None:
    """-1 also pads ``recent_item_ids``: a user with fewer than N recent items must not have
    seen item -1, in the training table and online (broadcast, per-owner) alike."""
    # Users 1 (items 5, 6) and 2 (items -1, 7), epoch seconds.
    csv = "u,i,t\n1,5,1600000000\n1,6,1600000100\n2,-1,1600000200\n2,7,1600000300\n"
    (tmp_path / "events.csv").write_text(csv)
    dataset = tmp_path / "dataset"
    import_csv(tmp_path / "events.csv", user_col="u", item_col="i", ts_col="t", out=dataset)
    config = feature_config_for(dataset)
    label_ts = pd.Timestamp(1_600_000_500, unit="s", tz="UTC")
    rows = pd.DataFrame({"user_id": [1, 2, 2], "item_id": [-1, -1, 5], "label_ts": label_ts})
    table = training_features(dataset, rows, config, progress=False)
    assert table["seen_recently"].tolist() == [0, 1, 0]

    user = user_arrays({"recent_item_ids": [[11, 12]], "last_event_ts": [NOW - 600]}, CONFIG)
    assert user["recent_item_ids"].tolist() == [[11, 12, -1, -1]]
    items = {**_items(), "item_id": np.array([12, -1, 99])}
    assert list(derive(user, items, now_s=NOW, config=CONFIG)["seen_recently"]) == [1, 0, 0]
    both = user_arrays({"recent_item_ids": [[11, 12], [-1, 5]], "last_event_ts": [1, 2]}, CONFIG)
    owner = np.array([0, 0, 1, 1])
    owned = {name: np.resize(value, 4) for name, value in items.items()}
    owned["item_id"] = np.array([-1, 12, -1, 12])
    got = derive(both, owned, now_s=NOW, config=CONFIG, owner=owner)
    assert list(got["seen_recently"]) == [0, 1, 1, 0]
    assert both["recent_len"].tolist() == [2, 2]


def test_stored_arrays_pad_and_fill_defaults() -> None:
    stored: dict[str, list[Any]] = {
        "recent_item_ids": [[5, 6, 7, 8, 9, 10], None],
        "last_event_ts": [NOW, None],
        "cat_count_7d": [[1.0, 2.0, 3.0], None],
    }
    user = user_arrays(stored, CONFIG)
    assert user["recent_item_ids"].tolist() == [[5, 6, 7, 8], [-1, -1, -1, -1]]
    assert user["recent_ts"].tolist() == [[0] * 4, [0] * 4]
    assert user["cat_count_7d"].tolist() == [[1, 2, 3], [0, 0, 0]]
    assert user["user_known"].tolist() == [1, 0]
    assert user["events_1d"].dtype == np.float32
    items = item_arrays(
        {"category": ["b", None, "zzz"], "item_first_ts": [1, None, 2]}, [1, 2, 3], CONFIG
    )
    assert items["category_index"].tolist() == [1, -1, -1]
    assert items["item_known"].tolist() == [1, 0, 1]
    assert items["item_first_ts"].tolist() == [1, 0, 2]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    config = WorldConfig(n_users=100, n_items=60, n_events=8_000, n_categories=4, days=10)
    synthesize(config, out, progress=False)
    return out


def test_online_path_from_stored_rows_equals_the_training_table(world: Path) -> None:
    """Stored features read back as an online store returns them (lists, per user) and derived
    one user at a time give exactly the training table's request-time features."""
    config = feature_config_for(world, history_len=10)
    now = pd.Timestamp("2024-01-06 18:00", tz="UTC")
    item_ids = np.arange(1, 62)  # 61 is unknown
    users = stored_user_features(world, pd.DataFrame({"user_id": [3, 50, 1000], "ts": now}), config)
    items = stored_item_features(world, pd.DataFrame({"item_id": item_ids, "ts": now}), config)
    item_input = item_arrays(
        {f: items[f].tolist() for f in feature_set(config).names("item")},
        item_ids,
        config,
        known=items["item_known"],
    )
    seen = affine = 0
    for user_id, stored in zip(users["user_id"], users.to_dict("records"), strict=True):
        dynamic = {f: [stored[f]] for f in feature_set(config).names("user_dynamic")}
        user_input = user_arrays(dynamic, config, known=[stored["user_known"]])
        online = derive(user_input, item_input, now_s=int(now.timestamp()), config=config)
        rows = pd.DataFrame({"user_id": user_id, "item_id": item_ids, "label_ts": now})
        table = training_features(world, rows, config, progress=False)
        for name, values in online.items():
            np.testing.assert_array_equal(values, table[name].to_numpy(), err_msg=name)
        seen += int(online["seen_recently"].sum())
        affine += int((online["category_affinity"] > 0).sum())
    assert seen > 0  # the comparison covered non-default values
    assert affine > 0
