"""Point-in-time batch features: hand-computed cases, a reference, invariance, leakage, snapshot."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlsd.data.leakage import check_leakage
from mlsd.data.schema import EVENTS_FILE, EVENTS_SCHEMA, ITEMS_FILE, USERS_FILE, ContractError
from mlsd.data.sources.synthetic import WorldConfig, synthesize
from mlsd.features.batch import (
    feature_config_for,
    snapshot,
    stored_item_features,
    stored_user_features,
    training_features,
)
from mlsd.features.definitions import FeatureConfig, feature_set

T0 = pd.Timestamp("2024-03-01 12:00:00", tz="UTC")  # a Friday
MIN = pd.Timedelta(minutes=1)
HOUR = pd.Timedelta(hours=1)
DAY = pd.Timedelta(days=1)
CATEGORIES = {1: "a", 2: "a", 3: "b", 4: "c", 5: None}

Event = tuple[int, int, pd.Timestamp, float, str]


def _write(
    directory: Path,
    events: list[Event],
    *,
    users: dict[int, str | None] | None = None,
    categories: dict[int, str | None] | None = None,
) -> Path:
    """A contract directory (events, users with ``age_bucket``, items with ``category``)."""
    directory.mkdir(parents=True, exist_ok=True)
    users = {1: "25-34", 2: None, 3: "56+"} if users is None else users
    categories = CATEGORIES if categories is None else categories
    table = pa.table(
        {
            "user_id": pa.array([e[0] for e in events], pa.int64()),
            "item_id": pa.array([e[1] for e in events], pa.int64()),
            "ts": pa.array([e[2] for e in events], pa.timestamp("us", tz="UTC")),
            "event": pa.array([e[4] for e in events], pa.string()),
            "value": pa.array([e[3] for e in events], pa.float32()),
        },
        schema=EVENTS_SCHEMA,
    )
    pq.write_table(table, directory / EVENTS_FILE)
    user_table = {"user_id": list(users), "age_bucket": list(users.values())}
    pq.write_table(pa.table(user_table), directory / USERS_FILE)
    item_table = {"item_id": list(categories), "category": list(categories.values())}
    pq.write_table(pa.table(item_table), directory / ITEMS_FILE)
    return directory


HAND_EVENTS: list[Event] = [
    (1, 1, T0 - 8 * DAY, 2.0, "view"),  # in 30d only
    (1, 3, T0 - 7 * DAY, 4.0, "view"),  # exactly at ts - 7d: in the 7d window
    (1, 2, T0 - 1 * DAY, 3.0, "view"),  # exactly at ts - 1d: in the 1d window
    (1, 3, T0 - 60 * MIN, 5.0, "view"),  # starts the last session (23 h gap before)
    (1, 1, T0 - 30 * MIN, 1.0, "view"),  # 30 min gap = session_gap_s: same session
    (1, 4, T0 - 10 * MIN, 1.0, "view"),
    (1, 2, T0, 9.0, "view"),  # exactly at ts: excluded
    (1, 5, T0 + HOUR, 9.0, "view"),  # after ts: excluded
    (2, 3, T0 - 40 * DAY, 1.0, "view"),
]
CONFIG = FeatureConfig(categories=("a", "b", "c"), user_attributes=("age_bucket",))


def _s(ts: pd.Timestamp) -> int:
    return int(ts.timestamp())


@pytest.fixture
def hand_dir(tmp_path: Path) -> Path:
    return _write(tmp_path / "hand", HAND_EVENTS)


def _users_at(directory: Path, user_ids: list[int], ts: pd.Timestamp, config: FeatureConfig):
    rows = pd.DataFrame({"user_id": user_ids, "ts": ts})
    return stored_user_features(directory, rows, config).set_index("user_id")


def test_user_features_by_hand(hand_dir: Path) -> None:
    user = _users_at(hand_dir, [1], T0, CONFIG).loc[1]
    assert list(user["recent_item_ids"]) == [4, 1, 3, 2, 3, 1]
    times = [T0 - 10 * MIN, T0 - 30 * MIN, T0 - 60 * MIN, T0 - DAY, T0 - 7 * DAY, T0 - 8 * DAY]
    assert list(user["recent_ts"]) == [_s(t) for t in times]
    assert user["last_event_ts"] == _s(T0 - 10 * MIN)
    assert user["session_events"] == 3
    assert (user["events_1d"], user["events_7d"], user["events_30d"]) == (4, 5, 6)
    assert list(user["cat_count_1d"]) == [2, 1, 1]
    assert list(user["cat_mean_1d"]) == [2.0, 5.0, 1.0]
    assert list(user["cat_count_7d"]) == [2, 2, 1]
    assert list(user["cat_mean_7d"]) == [2.0, 4.5, 1.0]
    assert list(user["cat_count_30d"]) == [3, 2, 1]
    assert list(user["cat_mean_30d"]) == [2.0, 4.5, 1.0]
    assert user["age_bucket"] == "25-34"
    assert user["user_known"] == 1
    assert user["feature_ts"] == T0 - 10 * MIN


def test_history_len_keeps_the_newest(hand_dir: Path) -> None:
    config = FeatureConfig(history_len=2, categories=CONFIG.categories)
    user = _users_at(hand_dir, [1], T0, config).loc[1]
    assert list(user["recent_item_ids"]) == [4, 1]
    assert list(user["recent_ts"]) == [_s(T0 - 10 * MIN), _s(T0 - 30 * MIN)]


def test_a_gap_over_session_gap_starts_a_new_session(hand_dir: Path) -> None:
    config = FeatureConfig(session_gap_s=1799, categories=CONFIG.categories)
    assert _users_at(hand_dir, [1], T0, config).loc[1, "session_events"] == 2  # the last two
    config = FeatureConfig(session_gap_s=1199, categories=CONFIG.categories)
    assert _users_at(hand_dir, [1], T0, config).loc[1, "session_events"] == 1


def test_the_session_gap_is_measured_in_whole_seconds(tmp_path: Path) -> None:
    """1800.5 s apart, but 1800 whole seconds: one session, as a push (which only knows the
    stored whole-second last_event_ts) counts it (test_online: the 1800.5 s push)."""
    first = T0 - HOUR + pd.Timedelta(milliseconds=100)
    events: list[Event] = [
        (1, 1, first, 1.0, "view"),
        (1, 2, first + pd.Timedelta(seconds=1800.5), 1.0, "view"),
        (1, 3, first + pd.Timedelta(seconds=1800.5 + 1801), 1.0, "view"),  # 1801 s: a new one
    ]
    directory = _write(tmp_path / "gap", events)
    config = FeatureConfig(session_gap_s=1800, categories=CONFIG.categories)
    assert (
        _users_at(directory, [1], first + pd.Timedelta(seconds=1801), config).loc[
            1, "session_events"
        ]
        == 2
    )
    assert _users_at(directory, [1], T0 + HOUR, config).loc[1, "session_events"] == 1


def test_an_event_exactly_at_ts_is_excluded_and_one_just_before_included(hand_dir: Path) -> None:
    before = _users_at(hand_dir, [1], T0 - 10 * MIN, CONFIG).loc[1]  # the event at T0-10m: out
    assert before["last_event_ts"] == _s(T0 - 30 * MIN)
    assert before["events_1d"] == 3
    just_after = _users_at(hand_dir, [1], T0 + pd.Timedelta(microseconds=1), CONFIG).loc[1]
    assert just_after["recent_item_ids"][0] == 2  # the event at T0 now counts
    assert just_after["events_1d"] == 4  # and the one at T0 - 1d has left the window


def test_unknown_and_eventless_users_get_defaults(hand_dir: Path) -> None:
    frame = _users_at(hand_dir, [99, 3, 2], T0, CONFIG)
    defaults = feature_set(CONFIG).defaults("user_dynamic")
    for user_id, known, age in [(99, 0, "unknown"), (3, 1, "56+")]:
        row = frame.loc[user_id]
        assert row["user_known"] == known
        assert row["age_bucket"] == age
        assert pd.isna(row["feature_ts"])
        for name, default in defaults.items():
            value = row[name]
            assert (list(value) if isinstance(default, list) else value) == default, name
    assert frame.loc[2, "age_bucket"] == "unknown"  # a null attribute
    assert frame.loc[2, "events_30d"] == 0  # its only event is 40 days old
    assert frame.loc[2, "session_events"] == 1


def test_item_features_by_hand(hand_dir: Path) -> None:
    rows = pd.DataFrame({"item_id": [3, 2, 5, 99], "ts": T0})
    items = stored_item_features(hand_dir, rows, CONFIG).set_index("item_id")
    three = items.loc[3]
    assert (three["item_events_1d"], three["item_events_7d"], three["item_events_30d"]) == (1, 2, 2)
    assert three["item_mean_value"] == pytest.approx(10.0 / 3.0)
    assert three["item_first_ts"] == _s(T0 - 40 * DAY)
    assert (three["category"], three["category_index"], three["item_known"]) == ("b", 1, 1)
    assert three["feature_ts"] == T0 - 60 * MIN
    assert items.loc[2, "item_events_1d"] == 1  # T0 - 1d in, T0 out
    assert items.loc[2, "item_mean_value"] == 3.0
    five = items.loc[5]  # only an event after ts; a null category
    assert (five["category"], five["category_index"], five["item_known"]) == ("unknown", -1, 1)
    assert (five["item_events_30d"], five["item_first_ts"]) == (0, 0)
    unknown = items.loc[99]
    assert (unknown["category"], unknown["category_index"], unknown["item_known"]) == (
        "unknown",
        -1,
        0,
    )
    assert pd.isna(unknown["feature_ts"])


def test_training_features_join_user_item_and_derived(hand_dir: Path) -> None:
    rows = pd.DataFrame(
        {"user_id": [1, 99], "item_id": [3, 99], "label_ts": [T0, T0], "label": [1, 0]},
        index=[10, 20],
    )
    table = training_features(hand_dir, rows, CONFIG, progress=False)
    names = [f.name for f in feature_set(CONFIG).features]
    assert list(table.columns) == ["user_id", "item_id", "label_ts", "label", *names, "feature_ts"]
    hit = table.iloc[0]
    assert hit["seconds_since_last_event"] == 600
    assert hit["session_events_now"] == 3
    assert hit["item_age_days"] == 40
    assert hit["category_affinity"] == pytest.approx(2 / 6)
    assert (hit["seen_recently"], hit["hour_of_day"], hit["day_of_week"]) == (1, 12, 4)
    assert hit["feature_ts"] == T0 - 10 * MIN  # the later of user's and item's latest event
    cold = table.iloc[1]
    derived = feature_set(CONFIG).defaults("cross")
    assert {name: cold[name] for name in derived} == derived
    assert (cold["user_known"], cold["item_known"], cold["label"]) == (0, 0, 0)


def test_event_types_filter_what_counts(tmp_path: Path) -> None:
    events = [*HAND_EVENTS, (1, 2, T0 - MIN, 1.0, "click")]
    directory = _write(tmp_path, events)
    views = FeatureConfig(categories=CONFIG.categories, event_types=("view",))
    assert _users_at(directory, [1], T0, views).loc[1, "events_1d"] == 4
    assert _users_at(directory, [1], T0, CONFIG).loc[1, "events_1d"] == 5


def test_feature_config_for_reads_categories_and_attributes(tmp_path: Path) -> None:
    directory = _write(tmp_path, HAND_EVENTS)
    users = pa.table(
        {
            "user_id": pa.array(range(200), pa.int64()),
            "external_id": [f"u{k}" for k in range(200)],
            "zip_code": [f"{k:05d}" for k in range(200)],  # > 100 distinct: not an attribute
            "gender": ["F", "M"] * 100,
            "age": list(range(200)),  # not a string
        }
    )
    pq.write_table(users, directory / USERS_FILE)
    config = feature_config_for(directory, history_len=7, event_types=("view",))
    assert config.categories == ("a", "b", "c")
    assert config.user_attributes == ("gender",)
    assert (config.history_len, config.event_types) == (7, ("view",))


def test_feature_config_for_rejects_event_types_the_dataset_lacks(tmp_path: Path) -> None:
    directory = _write(tmp_path, [*HAND_EVENTS, (1, 2, T0 - MIN, 1.0, "click")])
    with pytest.raises(ValueError, match=r"event_types: \['clik'\] occur in no event") as info:
        feature_config_for(directory, event_types=("view", "clik"))
    assert "['click', 'view']" in str(info.value)  # the types that do exist
    with pytest.raises(ValueError, match=r"event_types is empty"):
        feature_config_for(directory, event_types=())
    assert feature_config_for(directory, event_types=("click",)).event_types == ("click",)


def test_rows_without_ids_or_times_are_rejected(hand_dir: Path) -> None:
    with pytest.raises(ValueError, match="label_ts"):
        training_features(hand_dir, pd.DataFrame({"user_id": [1], "item_id": [1]}), CONFIG)
    rows = pd.DataFrame({"user_id": [1], "ts": [pd.NaT]})
    with pytest.raises(ValueError, match="no time"):
        stored_user_features(hand_dir, rows, CONFIG)


@pytest.mark.parametrize("unit", ["s", "ms"])
def test_numeric_times_are_refused_not_read_as_nanoseconds(hand_dir: Path, unit: str) -> None:
    """Epoch numbers would be read as nanoseconds (1970): every feature empty, no error."""
    epoch = int(T0.timestamp()) * (1 if unit == "s" else 1_000)
    rows = pd.DataFrame({"user_id": [1], "item_id": [3], "label_ts": [epoch]})
    for numbers in (rows, rows.astype({"label_ts": "float64"}), rows.astype(object)):
        with pytest.raises(ValueError, match=r"label_ts: numbers .*pd\.to_datetime"):
            training_features(hand_dir, numbers, CONFIG, progress=False)
    as_of = pd.DataFrame({"user_id": [1], "ts": [epoch]})
    with pytest.raises(ValueError, match=r"ts: numbers .*unit='s', utc=True"):
        stored_user_features(hand_dir, as_of, CONFIG)
    with pytest.raises(ValueError, match="ts: numbers"):
        stored_item_features(hand_dir, as_of.rename(columns={"user_id": "item_id"}), CONFIG)
    times = rows.assign(label_ts=pd.to_datetime(rows["label_ts"], unit=unit, utc=True))
    assert training_features(hand_dir, times, CONFIG, progress=False)["events_30d"][0] == 6


def test_snapshot_is_stored_features_at_as_of(hand_dir: Path) -> None:
    users, items = snapshot(hand_dir, T0, CONFIG)
    assert list(users["user_id"]) == [1, 2, 3]
    assert list(items["item_id"]) == [1, 2, 3, 4, 5]
    assert (users["event_timestamp"] == T0).all()
    expected = stored_user_features(hand_dir, users[["user_id", "ts"]], CONFIG)
    pd.testing.assert_frame_equal(users.drop(columns="event_timestamp"), expected)
    expected_items = stored_item_features(hand_dir, items[["item_id", "ts"]], CONFIG)
    pd.testing.assert_frame_equal(items.drop(columns="event_timestamp"), expected_items)


def test_snapshot_leaves_out_entities_first_seen_after_as_of(tmp_path: Path) -> None:
    events = [*HAND_EVENTS, (7, 8, T0 + DAY, 1.0, "view")]  # in no static table
    directory = _write(tmp_path, events)
    users, items = snapshot(directory, T0, CONFIG)
    assert 7 not in set(users["user_id"])
    assert 8 not in set(items["item_id"])
    later_users, later_items = snapshot(directory, T0 + 2 * DAY, CONFIG)
    assert 7 in set(later_users["user_id"])
    assert 8 in set(later_items["item_id"])


# -- a reference implementation, slow and obvious ----------------------------------------


def _reference(
    events: pd.DataFrame, user: int, item: int, ts: pd.Timestamp, config: FeatureConfig
) -> dict[str, Any]:
    """The stored features of (user, item) at ts by filtering and counting, row by row."""
    before = events[events["ts"] < ts]
    mine = before[before["user_id"] == user].sort_values("ts", kind="stable")
    out: dict[str, Any] = {"recent_item_ids": list(mine["item_id"][::-1][: config.history_len])}
    times = list(mine["ts"])
    session = 0
    for k in range(len(times) - 1, -1, -1):
        session += 1
        if k == 0 or _s(times[k]) - _s(times[k - 1]) > config.session_gap_s:  # whole seconds
            break
    out["session_events"] = session
    out["last_event_ts"] = _s(times[-1]) if times else 0
    for w in config.windows_days:
        window = mine[mine["ts"] >= ts - pd.Timedelta(days=w)]
        cats = window["item_id"].map(CATEGORIES)
        out[f"events_{w}d"] = len(window)
        out[f"cat_count_{w}d"] = [int((cats == c).sum()) for c in config.categories]
        out[f"cat_mean_{w}d"] = [
            float(window["value"][cats == c].mean()) if (cats == c).any() else 0.0
            for c in config.categories
        ]
        its = before[(before["item_id"] == item) & (before["ts"] >= ts - pd.Timedelta(days=w))]
        out[f"item_events_{w}d"] = len(its)
    item_events = before[before["item_id"] == item]
    out["item_mean_value"] = float(item_events["value"].mean()) if len(item_events) else 0.0
    out["item_first_ts"] = _s(item_events["ts"].min()) if len(item_events) else 0
    return out


_offsets = st.integers(min_value=-40 * 86_400, max_value=86_400)
_event = st.tuples(
    st.integers(1, 3),
    st.integers(1, 5),
    st.one_of(_offsets, st.sampled_from([0, -1800, -1801, -86_400, -7 * 86_400])),
    st.sampled_from([1.0, 2.0, 5.0]),
)


def _events(raw: list[tuple[int, int, int, float]]) -> list[Event]:
    return [(u, i, T0 + pd.Timedelta(seconds=s), v, "view") for u, i, s, v in raw]


@settings(max_examples=100, deadline=None)
@given(raw=st.lists(_event, max_size=25), label=_offsets)
def test_features_match_a_reference(raw: list[tuple[int, int, int, float]], label: int) -> None:
    events = _events(raw)
    ts = T0 + pd.Timedelta(seconds=label)
    config = FeatureConfig(history_len=4, windows_days=(1, 7), categories=("a", "b", "c"))
    with tempfile.TemporaryDirectory() as tmp:
        directory = _write(Path(tmp), events)
        rows = pd.DataFrame({"user_id": [1, 2, 3], "item_id": [3, 1, 5], "label_ts": ts})
        table = training_features(directory, rows, config, progress=False)
    frame = pd.DataFrame(events, columns=["user_id", "item_id", "ts", "value", "event"])
    for row in table.itertuples():
        expected = _reference(frame, row.user_id, row.item_id, ts, config)
        for name, value in expected.items():
            got = getattr(row, name)
            got = list(got) if isinstance(value, list) else got
            assert got == pytest.approx(value), (name, row.user_id, row.item_id)


@settings(max_examples=100, deadline=None)
@given(
    raw=st.lists(_event, max_size=20),
    later=st.lists(_event, min_size=1, max_size=10),
    label=_offsets,
)
def test_events_at_or_after_label_ts_never_change_features(
    raw: list[tuple[int, int, int, float]], later: list[tuple[int, int, int, float]], label: int
) -> None:
    ts = T0 + pd.Timedelta(seconds=label)
    # The appended events fall at or after the label time, some exactly at it.
    appended = [(u, i, ts + pd.Timedelta(seconds=abs(s) % 3), v, "view") for u, i, s, v in later]
    rows = pd.DataFrame(
        {"user_id": [1, 2, 3, 9], "item_id": [1, 3, 5, 9], "label_ts": ts, "label": 1}
    )
    config = FeatureConfig(history_len=3, windows_days=(1, 7), categories=("a", "b", "c"))
    with tempfile.TemporaryDirectory() as tmp:
        base = _write(Path(tmp) / "base", _events(raw))
        grown = _write(Path(tmp) / "grown", [*_events(raw), *appended])
        before = training_features(base, rows, config, progress=False)
        after = training_features(grown, rows, config, progress=False)
    pd.testing.assert_frame_equal(before, after)


# -- the leakage guard on a simulated world ----------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    config = WorldConfig(n_users=200, n_items=100, n_events=20_000, n_categories=5, days=20)
    synthesize(config, out, progress=False)
    return out


def _labels(world: Path, n: int = 1_000) -> pd.DataFrame:
    events = pd.read_parquet(world / EVENTS_FILE)
    views = events[events["event"] == "view"].sample(n, random_state=0)
    return pd.DataFrame(
        {
            "user_id": views["user_id"].to_numpy(),
            "item_id": views["item_id"].to_numpy(),
            "label_ts": views["ts"].to_numpy(),
            "label": np.ones(n, dtype=np.int64),
        }
    )


def test_training_table_of_a_simulated_world_passes_the_leakage_guard(world: Path) -> None:
    labels = _labels(world)
    config = feature_config_for(world)
    table = training_features(world, labels, config, progress=False)
    report = check_leakage(table, labels)
    assert report.ok, report.summary()
    assert report.n_rows == len(labels)
    assert table["user_known"].all()
    assert table["events_30d"].gt(0).mean() > 0.5  # features are not trivially empty


def test_the_leakage_guard_catches_features_computed_with_less_or_equal(world: Path) -> None:
    labels = _labels(world)
    config = feature_config_for(world)
    # "<=" instead of "<": computing as of a microsecond later includes the labelled view itself.
    later = labels.assign(label_ts=labels["label_ts"] + pd.Timedelta(microseconds=1))
    leaky = training_features(world, later, config, progress=False)
    leaky["label_ts"] = labels["label_ts"]
    report = check_leakage(leaky, labels)
    assert not report.ok
    assert report.n_leaky_rows == len(labels)  # every view sees itself


def test_items_without_a_category_column_are_all_unknown(tmp_path: Path) -> None:
    directory = _write(tmp_path, HAND_EVENTS)
    pq.write_table(pa.table({"item_id": pa.array([1, 2, 3], pa.int64())}), directory / ITEMS_FILE)
    assert feature_config_for(directory).categories == ()
    items = stored_item_features(directory, pd.DataFrame({"item_id": [3], "ts": T0}), CONFIG)
    assert (items.loc[0, "category"], items.loc[0, "category_index"]) == ("unknown", -1)
    assert items.loc[0, "item_events_7d"] == 2


def test_a_missing_events_file_names_the_directory(tmp_path: Path) -> None:
    directory = _write(tmp_path, HAND_EVENTS)
    (directory / EVENTS_FILE).unlink()
    with pytest.raises(ContractError, match=r"events\.parquet: not found"):
        stored_user_features(directory, pd.DataFrame({"user_id": [1], "ts": T0}), CONFIG)


def test_naive_times_are_utc_and_input_order_is_kept(hand_dir: Path) -> None:
    naive = pd.DataFrame({"user_id": [2, 1, 2], "ts": [T0.tz_localize(None)] * 3})
    frame = stored_user_features(hand_dir, naive, CONFIG)
    assert list(frame["user_id"]) == [2, 1, 2]
    assert list(frame["events_1d"]) == [0, 4, 0]
