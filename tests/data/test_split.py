"""The global temporal split: boundaries, cut point definitions, stats, schema, errors."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlsd.data.schema import (
    EVENTS_FILE,
    EVENTS_SCHEMA,
    ITEMS_FILE,
    USERS_FILE,
    ContractError,
    DatasetInfo,
    read_info,
    write_info,
)
from mlsd.data.sources.synthetic import WorldConfig, synthesize
from mlsd.data.split import (
    PROTOCOL,
    SplitSpec,
    TimestampLike,
    cut_points,
    cut_points_by_quantile,
    cut_points_by_time,
    dev_copy,
    parse_timestamp,
    split_dataset,
)

T0 = pd.Timestamp("2024-01-01", tz="UTC")
US = pd.Timedelta(microseconds=1)


def _at(hours: float) -> pd.Timestamp:
    return T0 + pd.Timedelta(hours=hours)


def _events(rows: list[tuple[int, int, pd.Timestamp]]) -> pd.DataFrame:
    users, items, ts = zip(*rows, strict=True)
    return pd.DataFrame(
        {
            "user_id": np.asarray(users, dtype="int64"),
            "item_id": np.asarray(items, dtype="int64"),
            "ts": pd.DatetimeIndex(ts).as_unit("us"),
            "event": "rate",
            "value": np.arange(len(rows), dtype="float32"),
        }
    )


def _write(directory: Path, events: pd.DataFrame, schema: pa.Schema = EVENTS_SCHEMA) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.Table.from_pandas(events, schema=schema, preserve_index=False),
        directory / "events.parquet",
    )
    write_info(
        directory,
        DatasetInfo(name="tiny", source="test", licence="none", content_hash="sha256:tiny"),
    )
    return directory


def _read(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path)


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["ts", "user_id", "item_id", "value"]).reset_index(drop=True)


SPEC = SplitSpec(_at(10), _at(20))


def test_events_exactly_at_cut_points_go_to_the_later_window(tmp_path: Path) -> None:
    rows = [(1, 1, _at(10) - US), (2, 2, _at(10)), (3, 3, _at(20) - US), (4, 4, _at(20))]
    result = split_dataset(_write(tmp_path, _events(rows)), spec=SPEC)
    assert _read(result.paths["train"]).user_id.tolist() == [1]
    assert _read(result.paths["val"]).user_id.tolist() == [2, 3]
    assert _read(result.paths["test"]).user_id.tolist() == [4]


def test_windows_partition_the_events(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    hours = rng.uniform(0, 30, size=500).round(2)  # rounding makes ties, some at the cuts
    hours[:3] = [10.0, 20.0, 20.0]
    rows = [
        (int(u), int(i), _at(h))
        for u, i, h in zip(rng.integers(0, 40, 500), rng.integers(0, 60, 500), hours, strict=True)
    ]
    events = _events(rows)
    result = split_dataset(_write(tmp_path, events), spec=SPEC)
    parts = {name: _read(result.paths[name]) for name in ("train", "val", "test")}
    assert (parts["train"].ts < SPEC.t1).all()
    assert ((parts["val"].ts >= SPEC.t1) & (parts["val"].ts < SPEC.t2)).all()
    assert (parts["test"].ts >= SPEC.t2).all()
    union = pd.concat(parts.values(), ignore_index=True)
    pd.testing.assert_frame_equal(_sorted(union), _sorted(events))
    assert {n: len(p) for n, p in parts.items()} == {n: result.stats[n]["n_events"] for n in parts}
    assert sum(len(p) for p in parts.values()) == len(events)


def test_stats_count_warm_and_cold_users_and_new_items(tmp_path: Path) -> None:
    rows = [
        (1, 10, _at(1)),  # train: users {1}, items {10}
        (1, 10, _at(2)),
        (2, 20, _at(12)),  # val: user 2 cold, user 1 warm; item 20 new, item 10 seen
        (1, 10, _at(13)),
        (2, 20, _at(21)),  # test: users 1, 2 warm, user 3 cold; items 30, 40 new
        (3, 30, _at(22)),
        (3, 40, _at(23)),
        (1, 20, _at(24)),
    ]
    result = split_dataset(_write(tmp_path, _events(rows)), spec=SPEC)
    assert result.stats["train"] == {
        "n_events": 2,
        "n_users": 1,
        "n_items": 1,
        "ts_min": _at(1).isoformat(),
        "ts_max": _at(2).isoformat(),
    }
    val, test = result.stats["val"], result.stats["test"]
    assert (val["n_events"], val["n_users"], val["n_items"]) == (2, 2, 2)
    assert (val["n_warm_users"], val["n_cold_users"], val["n_new_items"]) == (1, 1, 1)
    assert (test["n_events"], test["n_users"], test["n_items"]) == (4, 3, 3)
    assert (test["n_warm_users"], test["n_cold_users"], test["n_new_items"]) == (2, 1, 2)
    assert (test["ts_min"], test["ts_max"]) == (_at(21).isoformat(), _at(24).isoformat())


def test_manifest_records_cuts_hash_protocol_and_stats(tmp_path: Path) -> None:
    rows = [(1, 1, _at(1)), (1, 2, _at(11)), (2, 1, _at(21))]
    result = split_dataset(_write(tmp_path, _events(rows)), spec=SPEC)
    assert result.out == tmp_path / "split"
    manifest = json.loads((tmp_path / "split" / "split.json").read_text())
    assert manifest["t1"] == _at(10).isoformat()
    assert manifest["t2"] == _at(20).isoformat()
    assert manifest["dataset"]["content_hash"] == "sha256:tiny" == result.content_hash
    assert manifest["protocol"] == PROTOCOL
    assert manifest["cut"] == {"by": "given"}
    assert manifest["windows"] == result.stats
    assert manifest["windows"]["test"]["n_cold_users"] == 1


def test_output_schema_is_the_input_schema_exactly(tmp_path: Path) -> None:
    schema = pa.schema(
        [
            *EVENTS_SCHEMA,
            pa.field("session_id", pa.int32()),
            pa.field("device", pa.dictionary(pa.int32(), pa.string())),
        ]
    )
    events = _events([(1, 1, _at(1)), (2, 2, _at(11)), (3, 3, _at(21)), (4, 4, _at(22))])
    events["session_id"] = pd.array([7, None, 8, None], dtype="Int32")
    events["device"] = pd.Categorical(["ios", "web", "ios", "web"])
    result = split_dataset(_write(tmp_path, events, schema), spec=SPEC)
    source = pq.read_schema(tmp_path / "events.parquet")
    for name in ("train", "val", "test"):
        written = pq.read_schema(result.paths[name])
        assert written.equals(source, check_metadata=True), name
    test = pq.read_table(result.paths["test"])
    assert test.column("ts").type == pa.timestamp("us", tz="UTC")
    assert test.column("value").type == pa.float32()
    assert test.column("session_id").to_pylist() == [8, None]
    assert test.column("ts").to_pylist() == [_at(21).to_pydatetime(), _at(22).to_pydatetime()]


def test_rerun_writes_identical_files(tmp_path: Path) -> None:
    rows = [(u, u % 7, _at(u * 0.3)) for u in range(100)]
    directory = _write(tmp_path, _events(rows))
    first = split_dataset(directory, val_frac=0.2, test_frac=0.2)
    before = {p.name: p.read_bytes() for p in first.paths.values()}
    second = split_dataset(directory, val_frac=0.2, test_frac=0.2)
    assert second.spec == first.spec
    assert {p.name: p.read_bytes() for p in second.paths.values()} == before
    assert sorted(p.name for p in first.out.iterdir()) == [
        "split.json",
        "test.parquet",
        "train.parquet",
        "val.parquet",
    ]


def test_quantile_cut_points_take_the_last_fractions_of_events() -> None:
    ts = [_at(h) for h in range(10)]
    spec = cut_points_by_quantile(ts, val_frac=0.1, test_frac=0.2)
    assert (spec.t1, spec.t2) == (_at(7), _at(8))
    # float noise: 1 - 0.1 - 0.2 is 0.7000000000000001 and 0.1 + 0.2 is 0.30000000000000004
    spec = cut_points_by_quantile(ts[::-1], val_frac=0.2, test_frac=0.1)
    assert (spec.t1, spec.t2) == (_at(7), _at(9))


def test_quantile_ties_at_the_cut_go_to_the_later_window() -> None:
    ts = [_at(h) for h in (0, 1, 2, 3, 3, 3, 4)]
    # the last round(0.3 * 7) = 2 events start at position 5, tied with positions 3 and 4
    spec = cut_points_by_quantile(ts, val_frac=0.4, test_frac=0.3)
    assert (spec.t1, spec.t2) == (_at(2), _at(3))


def test_time_cut_points_take_fractions_of_the_span() -> None:
    ts = [_at(0), _at(1), _at(2), _at(100)]
    spec = cut_points_by_time(ts, val_frac=0.1, test_frac=0.2)
    assert (spec.t1, spec.t2) == (_at(70), _at(80))


def test_duckdb_cut_points_match_the_in_memory_ones(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for trial in range(20):
        n = int(rng.integers(5, 200))
        hours = np.sort(rng.integers(0, 50, size=n)).astype(float)
        rows = [(0, 0, _at(h)) for h in hours]
        directory = _write(tmp_path / str(trial), _events(rows))
        val_frac, test_frac = (float(x) for x in rng.choice([0.05, 0.1, 0.2, 0.3], size=2))
        for by, in_memory in (("events", cut_points_by_quantile), ("time", cut_points_by_time)):
            try:
                expected = in_memory([r[2] for r in rows], val_frac=val_frac, test_frac=test_frac)
            except ContractError:
                with pytest.raises(ContractError):
                    cut_points(
                        directory / "events.parquet", val_frac=val_frac, test_frac=test_frac, by=by
                    )
                continue
            got = cut_points(
                directory / "events.parquet", val_frac=val_frac, test_frac=test_frac, by=by
            )
            assert got == expected, (trial, by, n, val_frac, test_frac)


def test_fractions_are_recorded_in_the_manifest(tmp_path: Path) -> None:
    rows = [(u, u, _at(u)) for u in range(10)]
    result = split_dataset(_write(tmp_path, _events(rows)), val_frac=0.1, test_frac=0.2, by="time")
    assert result.cut == {"by": "time", "val_frac": 0.1, "test_frac": 0.2}
    assert [result.stats[w]["n_events"] for w in ("train", "val", "test")] == [7, 1, 2]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-01-01", T0),
        ("2024-01-01T02:00:00Z", _at(2)),
        ("2024-01-01T03:00:00+01:00", _at(2)),
        (date(2024, 1, 1), T0),
        (pd.Timestamp("2024-01-01 02:00"), _at(2)),
    ],
)
def test_parse_timestamp_gives_utc(text: TimestampLike, expected: pd.Timestamp) -> None:
    parsed = parse_timestamp(text)
    assert parsed == expected
    assert str(parsed.tz) == "UTC"


def test_parse_timestamp_rejects_garbage() -> None:
    with pytest.raises(ContractError, match="ISO 8601"):
        parse_timestamp("next tuesday")


def test_spec_needs_t1_before_t2() -> None:
    with pytest.raises(ContractError, match="t1 < t2"):
        SplitSpec(_at(2), _at(2))
    spec = SplitSpec(parse_timestamp("2024-01-01"), parse_timestamp("2024-01-02"))
    assert spec.t2 - spec.t1 == pd.Timedelta(days=1)


def test_sub_microsecond_cuts_round_up_so_ts_below_stays_below() -> None:
    spec = SplitSpec(_at(1) + pd.Timedelta(nanoseconds=1), _at(2))
    assert spec.t1 == _at(1) + US


def test_missing_events_names_the_path_and_how_to_create_it(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match=r"events\.parquet: not found.*mlsd data import"):
        split_dataset(tmp_path, spec=SPEC)


def test_unreadable_events_file_is_a_contract_error(tmp_path: Path) -> None:
    (tmp_path / "events.parquet").write_text("user_id,item_id\n")
    with pytest.raises(ContractError, match=r"events\.parquet: not a readable Parquet file"):
        split_dataset(tmp_path, spec=SPEC)


def test_wrong_ts_type_is_a_contract_error(tmp_path: Path) -> None:
    schema = EVENTS_SCHEMA.set(2, pa.field("ts", pa.timestamp("ns"), nullable=False))
    events = _events([(1, 1, _at(1))])
    events["ts"] = events.ts.dt.tz_localize(None).astype("datetime64[ns]")
    with pytest.raises(ContractError, match=r"'ts' is timestamp\[ns\].*timestamp\[us, tz=UTC\]"):
        split_dataset(_write(tmp_path, events, schema), spec=SPEC)


@pytest.mark.parametrize(
    ("spec", "window"),
    [
        (SplitSpec(_at(0), _at(20)), "train"),  # t1 at the first event
        (SplitSpec(_at(12), _at(13)), "val"),  # a gap in the data
        (SplitSpec(_at(10), _at(40)), "test"),  # t2 after the last event
    ],
)
def test_empty_window_names_the_window_and_the_data_range(
    tmp_path: Path, spec: SplitSpec, window: str
) -> None:
    rows = [(1, 1, _at(0)), (1, 2, _at(11)), (2, 1, _at(30))]
    with pytest.raises(ContractError, match=rf"the {window} window .* holds no events") as info:
        split_dataset(_write(tmp_path, _events(rows)), spec=spec)
    assert _at(0).isoformat() in str(info.value)
    assert _at(30).isoformat() in str(info.value)
    assert not (tmp_path / "split").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spec": SPEC, "val_frac": 0.1, "test_frac": 0.2}, "not both"),
        ({}, "give cut points"),
        ({"val_frac": 0.1}, "give cut points"),
        ({"val_frac": 0.0, "test_frac": 0.2}, r"val_frac must be in \(0, 1\)"),
        ({"val_frac": 0.1, "test_frac": 1.0}, r"test_frac must be in \(0, 1\)"),
        ({"val_frac": 0.5, "test_frac": 0.5}, "must be < 1"),
        ({"val_frac": 0.1, "test_frac": 0.2, "by": "users"}, "by must be one of"),
        ({"spec": SPEC, "by": "users"}, "by must be one of"),
    ],
)
def test_bad_arguments_are_contract_errors(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    rows = [(u, u, _at(u)) for u in range(10)]
    with pytest.raises(ContractError, match=message):
        split_dataset(_write(tmp_path, _events(rows)), **kwargs)  # type: ignore[arg-type]


def test_cut_points_that_coincide_are_explained(tmp_path: Path) -> None:
    rows = [(1, 1, _at(0))] + [(1, 1, _at(5))] * 9
    with pytest.raises(ContractError, match="coincide"):
        split_dataset(_write(tmp_path, _events(rows)), val_frac=0.1, test_frac=0.2)


def _ml100k_events(ml100k_dir: Path) -> pd.DataFrame:
    raw = pd.read_csv(ml100k_dir / "u.data", sep="\t", names=["user", "item", "rating", "unix"])
    return pd.DataFrame(
        {
            "user_id": raw.user.astype("int64"),
            "item_id": raw.item.astype("int64"),
            "ts": pd.to_datetime(raw.unix, unit="s", utc=True).astype("datetime64[us, UTC]"),
            "event": "rate",
            "value": raw.rating.astype("float32"),
        }
    )


@pytest.mark.dataset
@pytest.mark.parametrize(
    ("by", "n_users", "n_warm"),
    [("events", 301, 109), ("time", 281, 99)],
)
def test_ml100k_last_fifth_as_test_matches_design(
    ml100k_dir: Path, tmp_path: Path, by: str, n_users: int, n_warm: int
) -> None:
    """DESIGN.md: "ML-100K with the last 20% of time as test: 301 test users, 109 warm"."""
    events = _ml100k_events(ml100k_dir)
    result = split_dataset(_write(tmp_path, events), val_frac=0.1, test_frac=0.2, by=by)
    test = result.stats["test"]
    assert (test["n_users"], test["n_warm_users"]) == (n_users, n_warm)
    assert test["n_cold_users"] == n_users - n_warm
    # the same numbers straight from pandas
    before = events[events.ts < result.spec.t2]
    in_test = events[events.ts >= result.spec.t2]
    assert in_test.user_id.nunique() == n_users
    assert in_test.user_id.drop_duplicates().isin(before.user_id).sum() == n_warm
    assert sum(result.stats[w]["n_events"] for w in ("train", "val", "test")) == 100_000


def test_a_failed_window_write_keeps_the_old_file_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [(u, u % 7, _at(u * 0.3)) for u in range(100)]
    directory = _write(tmp_path, _events(rows))
    first = split_dataset(directory, spec=SPEC)
    before = {p.name: p.read_bytes() for p in first.out.iterdir()}

    def disk_full(
        self: pq.ParquetWriter, table: pa.Table, row_group_size: int | None = None
    ) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", disk_full)
    with pytest.raises(OSError, match="No space left"):
        split_dataset(directory, spec=SplitSpec(_at(5), _at(25)))

    assert {p.name: p.read_bytes() for p in first.out.iterdir()} == before  # no .tmp either


def test_dev_copy_keeps_the_events_before_the_test_window(tmp_path: Path) -> None:
    """A dev copy is the dataset as of its test window's start (the temporal protocol's t2):
    users and items as they are, a contract of its own (name, counts, hash, its origin), so
    that settings are compared on it without the real test window."""
    world = tmp_path / "world"
    synthesize(WorldConfig(n_users=60, n_items=40, n_events=3_000, days=10, seed=4), world)
    original = read_info(world)
    copy = dev_copy(world, tmp_path / "dev", val_frac=0.1, test_frac=0.2)
    events = pd.read_parquet(world / EVENTS_FILE)
    t2 = cut_points_by_quantile(events["ts"], val_frac=0.1, test_frac=0.2).t2
    kept = pd.read_parquet(tmp_path / "dev" / EVENTS_FILE)
    assert len(kept) == (events["ts"] < t2).sum() == copy.n_events > 0
    assert kept["ts"].max() < t2
    assert pq.read_schema(tmp_path / "dev" / EVENTS_FILE).equals(
        pq.read_schema(world / EVENTS_FILE)
    )
    for name in (USERS_FILE, ITEMS_FILE):
        assert (tmp_path / "dev" / name).read_bytes() == (world / name).read_bytes()
    assert copy.name == f"{original.name}-dev"
    assert copy.content_hash not in ("", original.content_hash)
    assert copy.extra["dev_copy"] == {"of": original.content_hash, "before": t2.isoformat()}
    # Its own test window is the last 20% of what is left: earlier than the original's.
    assert split_dataset(tmp_path / "dev", val_frac=0.1, test_frac=0.2).spec.t2 < t2
    with pytest.raises(ContractError, match="must be outside"):
        dev_copy(world, world / "dev")
