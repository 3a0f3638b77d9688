"""The leakage guard catches features computed from events at or after their label time."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from mlsd.data.leakage import (
    DEFAULT_KEYS,
    LeakageError,
    assert_no_leakage,
    check_leakage,
    check_leakage_files,
)

T0 = pd.Timestamp("2024-01-01", tz="UTC")
KEYS = list(DEFAULT_KEYS)


def _at(hours: float) -> pd.Timestamp:
    return T0 + pd.Timedelta(hours=hours)


@pytest.fixture
def events() -> pd.DataFrame:
    """Ratings of two users; the labels are the events from hour 10 on."""
    rows = [
        (1, 100, 1, 4.0),
        (1, 101, 3, 2.0),
        (2, 100, 4, 5.0),
        (1, 102, 10, 5.0),  # label
        (2, 103, 12, 1.0),  # label
        (1, 100, 15, 3.0),  # label (the pair 1/100 again, later)
    ]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "hour", "value"])
    return frame.assign(ts=T0 + pd.to_timedelta(frame.hour, unit="h")).drop(columns="hour")


@pytest.fixture
def labels(events: pd.DataFrame) -> pd.DataFrame:
    chosen = events[events.ts >= _at(10)]
    return chosen.rename(columns={"ts": "label_ts"})[KEYS].reset_index(drop=True)


def _user_history(labels: pd.DataFrame, events: pd.DataFrame, *, until: str) -> pd.DataFrame:
    """Each label's user events: before (``"<"``), up to (``"<="``) or regardless of its time."""
    pairs = labels.merge(events.drop(columns="item_id"), on="user_id")
    if until == "<":
        pairs = pairs[pairs.ts < pairs.label_ts]
    elif until == "<=":
        pairs = pairs[pairs.ts <= pairs.label_ts]
    return pairs


def _user_feature(
    labels: pd.DataFrame, events: pd.DataFrame, name: str, agg: str, *, until: str
) -> pd.DataFrame:
    """One user feature per label with its as-of time, computed with plain pandas."""
    grouped = _user_history(labels, events, until=until).groupby(KEYS)
    feature = grouped.agg(**{name: ("value", agg), f"{name}__asof": ("ts", "max")})
    return labels.merge(feature.reset_index(), on=KEYS, how="left")


def test_mean_rating_over_all_events_is_caught(labels: pd.DataFrame, events: pd.DataFrame) -> None:
    clean = _user_feature(labels, events, "user_mean_rating", "mean", until="<")
    leaky = _user_feature(labels, events, "user_mean_all", "mean", until="all")
    features = clean.merge(leaky, on=KEYS)
    report = check_leakage(features, labels)
    assert not report.ok
    assert report.leaky_columns == ["user_mean_all"]
    assert report.n_rows == 3
    # each user's last event is at or after each of their labels (user 1: hour 15, user 2: 12)
    assert report.n_leaky_rows == 3
    assert report.leaky_counts == {"user_mean_all": 3}
    assert report.example == {
        "user_id": 1,
        "item_id": 102,
        "label_ts": _at(10),
        "features_row": 0,
        "user_mean_all": pytest.approx((4 + 2 + 5 + 3) / 4),
        "user_mean_all__asof": _at(15),
    }


def test_count_with_less_or_equal_leaks_at_the_boundary(
    labels: pd.DataFrame, events: pd.DataFrame
) -> None:
    strict = _user_feature(labels, events, "user_count", "count", until="<")
    inclusive = _user_feature(labels, events, "user_count_le", "count", until="<=")
    features = strict.merge(inclusive, on=KEYS)
    report = check_leakage(features, labels)
    assert report.leaky_columns == ["user_count_le"]
    assert report.n_leaky_rows == 3  # every label sees its own event
    assert report.example is not None
    assert report.example["user_count_le__asof"] == report.example["label_ts"]
    with pytest.raises(LeakageError, match="user_count_le") as info:
        assert_no_leakage(features, labels)
    message = str(info.value)
    assert "user_count (" not in message
    assert "item_id=102" in message
    assert info.value.report.n_leaky_rows == 3
    assert isinstance(info.value, ValueError)


def test_features_strictly_before_the_label_pass(
    labels: pd.DataFrame, events: pd.DataFrame
) -> None:
    mean = _user_feature(labels, events, "user_mean_rating", "mean", until="<")
    count = _user_feature(labels, events, "user_count", "count", until="<")
    features = mean.merge(count, on=KEYS)
    report = check_leakage(features, labels)
    assert report.ok
    assert (report.n_rows, report.n_leaky_rows, report.leaky_columns) == (3, 0, [])
    assert report.example is None
    assert_no_leakage(features, labels)


def _one_row(asof: pd.Timestamp, label: pd.Timestamp) -> tuple[pd.DataFrame, pd.DataFrame]:
    labels = pd.DataFrame({"user_id": [1], "item_id": [2], "label_ts": [label]})
    return labels.assign(f=[0.5], f__asof=[asof]), labels


@pytest.mark.parametrize(
    ("asof", "leaks"),
    [
        (_at(5), True),  # equal: the label's own event
        (_at(5) - pd.Timedelta(microseconds=1), False),
        (_at(6), True),
        (pd.NaT, False),  # no event used, e.g. a cold user
    ],
)
def test_boundary_equality_is_leakage(asof: pd.Timestamp, leaks: bool) -> None:
    features, labels = _one_row(asof, _at(5))
    assert check_leakage(features, labels).ok is not leaks


def test_single_feature_ts_names_every_feature_column() -> None:
    labels = pd.DataFrame({"user_id": [1, 2], "item_id": [7, 7], "label_ts": [_at(5), _at(5)]})
    features = labels.assign(user_mean=[3.0, 4.0], item_pop=[10, 11], feature_ts=[_at(4), _at(5)])
    report = check_leakage(features, labels)
    assert report.leaky_columns == ["user_mean", "item_pop"]
    assert report.n_leaky_rows == 1
    assert report.example == {
        "user_id": 2,
        "item_id": 7,
        "label_ts": _at(5),
        "features_row": 1,
        "user_mean": 4.0,
        "item_pop": 11,
        "feature_ts": _at(5),
    }


def test_asof_column_overrides_feature_ts_for_its_feature() -> None:
    labels = pd.DataFrame({"user_id": [1], "item_id": [7], "label_ts": [_at(5)]})
    features = labels.assign(a=[1.0], b=[2.0], b__asof=[_at(6)], feature_ts=[_at(1)])
    assert check_leakage(features, labels).leaky_columns == ["b"]
    features = features.assign(feature_ts=[_at(5)], b__asof=[_at(1)])
    assert check_leakage(features, labels).leaky_columns == ["a"]


def test_rows_are_matched_on_the_label_time_too() -> None:
    """The pair 1/7 has two labels; only the first one's features saw the future."""
    labels = pd.DataFrame({"user_id": [1, 1], "item_id": [7, 7], "label_ts": [_at(10), _at(20)]})
    features = labels.assign(f=[1.0, 2.0], feature_ts=[_at(15), _at(15)])
    report = check_leakage(features, labels)
    assert (report.n_rows, report.n_leaky_rows) == (2, 1)
    assert report.example is not None
    assert report.example["label_ts"] == _at(10)
    # keys without the label time: it joins the key anyway, since both tables have it
    report = check_leakage(features, labels, keys=("user_id", "item_id"))
    assert (report.n_rows, report.n_leaky_rows) == (2, 1)


def test_ambiguous_label_time_without_it_in_the_features_is_an_error() -> None:
    labels = pd.DataFrame({"user_id": [1, 1], "item_id": [7, 7], "label_ts": [_at(10), _at(20)]})
    features = pd.DataFrame({"user_id": [1], "item_id": [7], "f": [1.0], "feature_ts": [_at(5)]})
    with pytest.raises(ValueError, match=r"labels: 1 labels share a key .*add 'label_ts'"):
        check_leakage(features, labels, keys=("user_id", "item_id"))


def test_one_label_per_key_needs_no_label_time_in_the_features() -> None:
    labels = pd.DataFrame({"user_id": [1, 2], "item_id": [7, 7], "label_ts": [_at(10), _at(20)]})
    features = pd.DataFrame({"user_id": [1, 2], "item_id": [7, 7], "feature_ts": [_at(5), _at(20)]})
    report = check_leakage(features, labels, keys=("user_id", "item_id"))
    assert (report.n_rows, report.n_leaky_rows) == (2, 1)
    assert report.leaky_columns == ["feature_ts"]


def test_key_mismatches_are_counted_not_leakage() -> None:
    labels = pd.DataFrame(
        {"user_id": [1, 2, 3], "item_id": [7, 7, 7], "label_ts": [_at(5), _at(5), _at(5)]}
    )
    features = pd.DataFrame(
        {
            "user_id": [1, 2, 9, 9],
            "item_id": [7, 7, 7, 8],
            "label_ts": [_at(5), _at(6), _at(5), _at(5)],  # user 2: a different label time
            "f": [1.0, 2.0, 3.0, 4.0],
            "feature_ts": [_at(1), _at(9), _at(9), _at(9)],
        }
    )
    report = check_leakage(features, labels)
    assert report.ok
    assert report.n_rows == 1
    assert report.n_features_without_label == 3
    assert report.n_labels_without_features == 2
    assert "3 feature rows without a label and 2 labels without features" in report.summary()


def test_time_zones_are_compared_in_utc() -> None:
    labels = pd.DataFrame(
        {"user_id": [1], "item_id": [2], "label_ts": [pd.Timestamp("2024-01-01")]}
    )
    asof = pd.Timestamp("2024-01-01T01:00:00", tz="Europe/Paris")  # = midnight UTC
    features = labels.assign(label_ts=[T0], f=[1.0], f__asof=[asof])
    assert check_leakage(features, labels).leaky_columns == ["f"]


def test_numeric_times_such_as_day_indices_work() -> None:
    labels = pd.DataFrame({"user_id": [1, 1], "item_id": [2, 3], "label_ts": [10, 10]})
    features = labels.assign(f=[1.0, 2.0], feature_ts=[9, 10])
    report = check_leakage(features, labels)
    assert (report.n_leaky_rows, report.leaky_columns) == (1, ["f"])


@pytest.mark.parametrize(
    ("drop_from", "column", "message"),
    [
        ("features", "item_id", r"features: column 'item_id' is missing"),
        ("labels", "label_ts", r"labels: column 'label_ts' is missing"),
        ("features", "feature_ts", r"features: no 'feature_ts' column and no '<feature>__asof'"),
    ],
)
def test_missing_columns_are_named(drop_from: str, column: str, message: str) -> None:
    labels = pd.DataFrame({"user_id": [1], "item_id": [2], "label_ts": [_at(5)]})
    features = labels.assign(f=[1.0], feature_ts=[_at(1)])
    tables = {"features": features, "labels": labels}
    tables[drop_from] = tables[drop_from].drop(columns=column)
    with pytest.raises(ValueError, match=message):
        check_leakage(tables["features"], tables["labels"])


def test_asof_without_its_feature_is_an_error() -> None:
    labels = pd.DataFrame({"user_id": [1], "item_id": [2], "label_ts": [_at(5)]})
    features = labels.assign(f__asof=[_at(1)])
    with pytest.raises(ValueError, match="'f__asof' has no feature column 'f'"):
        check_leakage(features, labels)


def test_unparseable_times_name_the_column() -> None:
    labels = pd.DataFrame({"user_id": [1], "item_id": [2], "label_ts": [_at(5)]})
    features = labels.assign(f=[1.0], f__asof=["yesterday"])
    with pytest.raises(ValueError, match="'f__asof' does not hold timestamps"):
        check_leakage(features, labels)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_files_are_checked_like_frames(
    tmp_path: Path, suffix: str, labels: pd.DataFrame, events: pd.DataFrame
) -> None:
    features = _user_feature(labels, events, "user_count_le", "count", until="<=")
    paths = {"features": tmp_path / f"f{suffix}", "labels": tmp_path / f"l{suffix}"}
    for name, frame in (("features", features), ("labels", labels)):
        if suffix == ".csv":
            frame.to_csv(paths[name], index=False)
        else:
            frame.to_parquet(paths[name])
    report = check_leakage_files(paths["features"], paths["labels"])
    assert report.leaky_columns == ["user_count_le"]
    assert report.n_leaky_rows == 3
    assert report.example is not None
    assert report.example["label_ts"] == _at(10)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    labels = pd.DataFrame({"user_id": [1], "item_id": [2], "label_ts": [_at(5)]})
    labels.to_parquet(tmp_path / "labels.parquet")
    labels.drop(columns="item_id").assign(feature_ts=[_at(1)]).to_parquet(tmp_path / "f.parquet")
    with pytest.raises(ValueError, match=r"f\.parquet: column 'item_id' is missing"):
        check_leakage_files(tmp_path / "f.parquet", tmp_path / "labels.parquet")
    with pytest.raises(FileNotFoundError, match=r"nope\.parquet: features file not found"):
        check_leakage_files(tmp_path / "nope.parquet", tmp_path / "labels.parquet")
    (tmp_path / "f.json").write_text("{}")
    with pytest.raises(ValueError, match=r"f\.json: features must be a \.parquet or \.csv"):
        check_leakage_files(tmp_path / "f.json", tmp_path / "labels.parquet")


def test_example_names_only_the_features_leaking_in_that_row() -> None:
    labels = pd.DataFrame({"user_id": [1, 2], "item_id": [7, 7], "label_ts": [_at(5), _at(5)]})
    features = labels.assign(a=[1.0, 2.0], a__asof=[_at(5), _at(1)], b=[3.0, 4.0])
    features = features.assign(b__asof=[_at(1), _at(6)])
    report = check_leakage(features, labels)
    assert report.leaky_columns == ["a", "b"]
    assert report.example is not None
    assert report.example["features_row"] == 0
    assert "a__asof" in report.example
    assert "b" not in report.example
    assert "b__asof" not in report.example


def test_duplicate_labels_do_not_duplicate_checked_rows() -> None:
    labels = pd.DataFrame({"user_id": [1, 1], "item_id": [7, 7], "label_ts": [_at(5), _at(5)]})
    features = labels.iloc[:1].assign(f=[1.0], feature_ts=[_at(6)])
    report = check_leakage(features, labels)
    assert (report.n_rows, report.n_leaky_rows, report.n_labels_without_features) == (1, 1, 0)


def test_an_empty_asof_column_read_as_floats_means_no_event_used(tmp_path: Path) -> None:
    labels = pd.DataFrame({"user_id": [1], "item_id": [2], "label_ts": [_at(5)]})
    features = labels.assign(f=[0.0], f__asof=[float("nan")])
    assert check_leakage(features, labels).ok
    features.to_csv(tmp_path / "f.csv", index=False)
    labels.to_csv(tmp_path / "l.csv", index=False)
    assert check_leakage_files(tmp_path / "f.csv", tmp_path / "l.csv").ok


def test_a_feature_without_an_asof_time_beside_asof_columns_is_an_error() -> None:
    labels = pd.DataFrame({"user_id": [1], "item_id": [7], "label_ts": [_at(5)]})
    features = labels.assign(user_mean=[3.5], user_mean__asof=[_at(4)], item_ctr=[0.2])
    with pytest.raises(ValueError, match=r"features: feature column\(s\) \['item_ctr'\] have no"):
        check_leakage(features, labels)
    # with a feature_ts for the rest, item_ctr is checked by it
    report = check_leakage(features.assign(feature_ts=[_at(6)]), labels)
    assert report.leaky_columns == ["item_ctr"]


def test_feature_rows_of_which_none_matches_a_label_fail_the_check() -> None:
    """Label times written at another precision: nothing is checked, which is no pass."""
    labels = pd.DataFrame({"user_id": [1, 2], "item_id": [5, 6], "label_ts": [_at(5), _at(5)]})
    features = labels.assign(
        label_ts=[_at(5) + pd.Timedelta("1ms")] * 2, x=[1.0, 2.0], feature_ts=[_at(29)] * 2
    )
    report = check_leakage(features, labels)
    assert report.nothing_checked
    assert not report.ok
    assert report.summary().startswith("nothing checked: none of the 2 feature rows matches")
    with pytest.raises(LeakageError, match="nothing checked"):
        assert_no_leakage(features, labels)
    # no feature rows at all: nothing to check, and nothing wrong
    empty = check_leakage(features.iloc[:0], labels)
    assert empty.ok
    assert not empty.nothing_checked
