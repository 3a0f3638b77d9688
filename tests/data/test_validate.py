"""Validation + quarantine: bad rows are set aside with the right reason, good rows all kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlsd.cli import run
from mlsd.data.schema import (
    EVENTS_FILE,
    EVENTS_SCHEMA,
    INFO_FILE,
    QUARANTINE_FILE,
    ContractError,
    DatasetInfo,
    read_info,
)
from mlsd.data.validate import ValidationRules, validate_dir, write_dataset

T0 = 1_600_000_000  # 2020-09-13


def _info() -> DatasetInfo:
    return DatasetInfo(name="t", source="test", licence="none")


def _good_events(n: int = 50) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": [1 + i % 5 for i in range(n)],
            "item_id": [10 + i % 7 for i in range(n)],
            "ts": [T0 + 60 * i for i in range(n)],
            "event": ["rate"] * n,
            "value": [float(1 + i % 5) for i in range(n)],
            "device": ["phone" if i % 2 else "web" for i in range(n)],
        }
    )


def _users() -> pd.DataFrame:
    return pd.DataFrame({"user_id": [1, 2, 3, 4, 5], "gender": ["F", "M", "F", "M", "F"]})


def _items() -> pd.DataFrame:
    return pd.DataFrame({"item_id": list(range(10, 17)), "title": [f"t{i}" for i in range(7)]})


def _quarantine(directory: Path) -> pd.DataFrame:
    return pq.read_table(directory / QUARANTINE_FILE).to_pandas()


def test_clean_input_keeps_every_row_with_contract_types(tmp_path: Path) -> None:
    report = write_dataset(
        tmp_path, events=_good_events(), users=_users(), items=_items(), info=_info()
    )
    assert (report.n_kept, report.n_quarantined) == (50, 0)
    assert not (tmp_path / QUARANTINE_FILE).exists()
    schema = pq.read_schema(tmp_path / EVENTS_FILE)
    for field in EVENTS_SCHEMA:
        assert schema.field(field.name).type == field.type, field.name
    assert schema.names[5:] == ["device"]  # context columns are kept
    info = read_info(tmp_path)
    assert (info.n_events, info.n_users, info.n_items) == (50, 5, 7)
    assert info.ts_min == pd.Timestamp(T0, unit="s", tz="UTC").isoformat()
    assert info.content_hash.startswith("sha256:")


def test_each_injected_bad_row_is_quarantined_with_its_reason(tmp_path: Path) -> None:
    good = _good_events()
    bad = pd.DataFrame(
        [
            (None, 10, T0, "rate", 3.0, "web", "null_user_id"),
            ("u7", 10, T0, "rate", 3.0, "web", "bad_user_id"),
            (1.5, 10, T0, "rate", 3.0, "web", "bad_user_id"),
            (1, None, T0, "rate", 3.0, "web", "null_item_id"),
            (1, "ten", T0, "rate", 3.0, "web", "bad_item_id"),
            (1, 10, "yesterday", "rate", 3.0, "web", "bad_ts"),
            (1, 10, 0, "rate", 3.0, "web", "ts_out_of_range"),
            (1, 10, T0 + 10 * 365 * 86400 * 10, "rate", 3.0, "web", "ts_out_of_range"),
            (1, 10, T0 + 1, "rate", float("nan"), "web", "bad_value"),
            (1, 10, T0 + 2, "rate", float("inf"), "web", "bad_value"),
            (1, 10, T0 + 3, "rate", -1.0, "web", "negative_value"),
            (1, 10, T0 + 4, None, 3.0, "web", "null_event"),
            (99, 10, T0 + 5, "rate", 3.0, "web", "unknown_user"),
            (1, 99, T0 + 6, "rate", 3.0, "web", "unknown_item"),
            (1, 10, T0, "rate", 5.0, "web", "duplicate"),  # same (user, item, ts, event) as row 0
        ],
        columns=[*good.columns, "expected"],
    )
    # Interleave the bad rows among the good ones so row numbers are checked too.
    rows = []
    expected: dict[int, str] = {}
    good_iter = iter(good.to_dict("records"))
    for bad_row in bad.to_dict("records"):
        rows.append(next(good_iter))
        expected[len(rows)] = bad_row.pop("expected")
        rows.append(bad_row)
    rows.extend(good_iter)
    events = pd.DataFrame(rows).astype({"user_id": object, "item_id": object, "ts": object})

    report = write_dataset(tmp_path, events=events, users=_users(), items=_items(), info=_info())

    assert report.n_kept == len(good)
    assert report.n_quarantined == len(bad)
    quarantine = _quarantine(tmp_path)
    assert dict(zip(quarantine["row"], quarantine["reason"], strict=True)) == expected
    assert set(quarantine["file"]) == {EVENTS_FILE}
    kept = pq.read_table(tmp_path / EVENTS_FILE).to_pandas()
    assert sorted(kept["value"]) == sorted(good["value"])  # no good row lost
    first_bad = json.loads(quarantine.loc[quarantine["reason"] == "bad_user_id", "data"].iloc[0])
    assert first_bad["user_id"] == "u7"  # the raw row is kept, as given
    info = read_info(tmp_path)
    assert info.quarantined[f"{EVENTS_FILE}:ts_out_of_range"] == 2
    assert sum(info.quarantined.values()) == len(bad)


def test_duplicate_and_malformed_users_are_quarantined(tmp_path: Path) -> None:
    users = pd.concat(
        [_users(), pd.DataFrame({"user_id": [3, None, "x"], "gender": ["M", "F", "F"]})],
        ignore_index=True,
    ).astype({"user_id": object})
    report = write_dataset(tmp_path, events=_good_events(), users=users, items=None, info=_info())
    assert report.reasons == {
        "users.parquet:bad_user_id": 1,
        "users.parquet:duplicate": 1,
        "users.parquet:null_user_id": 1,
    }
    kept_users = pq.read_table(tmp_path / "users.parquet").to_pandas()
    assert kept_users["user_id"].tolist() == [1, 2, 3, 4, 5]
    assert kept_users.loc[2, "gender"] == "F"  # the first row for user 3 wins
    items = pq.read_table(tmp_path / "items.parquet").to_pandas()
    assert items["item_id"].tolist() == list(range(10, 17))  # derived from events


@pytest.mark.parametrize(
    ("ts_format", "raw"),
    [
        ("unix", T0),
        ("unix_ms", T0 * 1000),
        ("iso", "2020-09-13T12:26:40Z"),
        ("iso", "2020-09-13 14:26:40+02:00"),
        ("%d/%m/%Y %H:%M:%S", "13/09/2020 12:26:40"),
    ],
)
def test_timestamp_formats_parse_to_utc(tmp_path: Path, ts_format: str, raw: object) -> None:
    events = pd.DataFrame({"user_id": [1], "item_id": [2], "ts": [raw]})
    write_dataset(
        tmp_path, events=events, users=None, items=None, info=_info(), ts_format=ts_format
    )
    kept = pq.read_table(tmp_path / EVENTS_FILE).to_pandas()
    assert kept["ts"].iloc[0] == pd.Timestamp("2020-09-13 12:26:40", tz="UTC")
    assert kept["event"].iloc[0] == "interaction"
    assert kept["value"].iloc[0] == 1.0


def test_rules_can_allow_negative_values(tmp_path: Path) -> None:
    events = pd.DataFrame({"user_id": [1], "item_id": [2], "ts": [T0], "value": [-2.0]})
    rules = ValidationRules(allow_negative_values=True)
    report = write_dataset(
        tmp_path, events=events, users=None, items=None, info=_info(), rules=rules
    )
    assert report.n_kept == 1


def test_a_value_beyond_float32_is_quarantined_as_bad_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finite as a double but not as the contract's float32: quarantined, not a DuckDB crash."""
    f32_max = float(np.finfo(np.float32).max)
    events = pd.DataFrame(
        {
            "user_id": [1, 2, 3, 4, 5],
            "item_id": [10, 11, 12, 13, 14],
            "ts": [T0 + i for i in range(5)],
            "value": [4.0, 1e39, -1e39, f32_max, 3.0],
        }
    )
    report = write_dataset(tmp_path / "a", events=events, users=None, items=None, info=_info())
    assert (report.n_kept, report.reasons) == (3, {f"{EVENTS_FILE}:bad_value": 2})
    quarantine = _quarantine(tmp_path / "a")
    assert dict(zip(quarantine["row"], quarantine["reason"], strict=True)) == {
        1: "bad_value",
        2: "bad_value",
    }
    kept = pq.read_table(tmp_path / "a" / EVENTS_FILE).column("value").to_pylist()
    assert kept == [4.0, f32_max, 3.0]

    # The same rows in an events.parquet of doubles, checked in place.
    directory = tmp_path / "b"
    directory.mkdir()
    frame = events.assign(ts=pd.to_datetime(events["ts"], unit="s", utc=True), event="rate")
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), directory / EVENTS_FILE)
    report = validate_dir(directory)
    assert (report.n_kept, report.reasons) == (3, {f"{EVENTS_FILE}:bad_value": 2})

    # And from a CSV through the CLI: the report names the line.
    csv = tmp_path / "ratings.csv"
    csv.write_text("u,i,t,r\n1,10,1600000000,4\n2,11,1600000100,1e39\n3,12,1600000200,3\n")
    args = ["--user-col", "u", "--item-col", "i", "--ts-col", "t", "--value-col", "r"]
    code = run(["data", "import", "csv", "--events", str(csv), *args, "--out", str(tmp_path / "c")])
    assert code == 0
    assert "ratings.csv, line 3: bad_value" in capsys.readouterr().out


def test_validate_dir_moves_injected_rows_and_is_idempotent(tmp_path: Path) -> None:
    write_dataset(tmp_path, events=_good_events(), users=_users(), items=_items(), info=_info())
    hash_before = read_info(tmp_path).content_hash
    again = validate_dir(tmp_path)
    assert (again.n_kept, again.n_quarantined) == (50, 0)
    assert read_info(tmp_path).content_hash == hash_before

    table = pq.read_table(tmp_path / EVENTS_FILE).to_pandas()
    injected = table.iloc[[0, 1]].copy()
    injected.loc[injected.index[0], "user_id"] = 42  # unknown user; row 1 stays an exact copy
    polluted = pd.concat([table, injected], ignore_index=True)
    pq.write_table(pa.Table.from_pandas(polluted, preserve_index=False), tmp_path / EVENTS_FILE)

    report = validate_dir(tmp_path)

    assert report.n_kept == 50
    quarantine = _quarantine(tmp_path)
    assert dict(zip(quarantine["row"], quarantine["reason"], strict=True)) == {
        50: "unknown_user",
        51: "duplicate",
    }
    assert quarantine["line"].isna().all()  # a Parquet file has rows, not lines
    assert report.examples == [
        "events.parquet, row 50: unknown_user",
        "events.parquet, row 51: duplicate",
    ]
    assert read_info(tmp_path).n_events == 50


def test_validate_dir_keeps_a_quarantine_written_before_the_line_column(tmp_path: Path) -> None:
    events = pd.concat([_good_events(), _good_events().iloc[[0]]], ignore_index=True)
    write_dataset(
        tmp_path, events=events, users=None, items=None, info=_info(),
        input_lines={"events": np.arange(2, 53)},
    )  # fmt: skip
    assert _quarantine(tmp_path)[["row", "line"]].values.tolist() == [[50, 52]]
    old = pq.read_table(tmp_path / QUARANTINE_FILE).drop(["line"])
    pq.write_table(old, tmp_path / QUARANTINE_FILE)
    table = pq.read_table(tmp_path / EVENTS_FILE).to_pandas()
    polluted = pd.concat([table, table.iloc[[3]]], ignore_index=True)
    pq.write_table(pa.Table.from_pandas(polluted, preserve_index=False), tmp_path / EVENTS_FILE)

    report = validate_dir(tmp_path)

    quarantine = _quarantine(tmp_path)
    assert quarantine["reason"].tolist() == ["duplicate", "duplicate"]
    assert quarantine["line"].isna().all()  # the old row's line was not recorded
    assert report.examples == ["events.parquet, row 50: duplicate"]


def test_missing_required_column_names_file_and_columns(tmp_path: Path) -> None:
    events = pd.DataFrame({"user": [1], "item_id": [2], "ts": [T0]})
    with pytest.raises(ContractError, match=r"u\.data: missing required column\(s\) user_id"):
        write_dataset(
            tmp_path,
            events=events,
            users=None,
            items=None,
            info=_info(),
            input_files={"events": "u.data"},
        )


def test_unreadable_events_file_is_a_contract_error(tmp_path: Path) -> None:
    write_dataset(tmp_path, events=_good_events(), users=None, items=None, info=_info())
    (tmp_path / EVENTS_FILE).write_bytes(b"this is not parquet at all")
    with pytest.raises(ContractError, match=r"events\.parquet: cannot be read as Parquet"):
        validate_dir(tmp_path)


def test_missing_events_file_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match="mlsd data import"):
        validate_dir(tmp_path)


def test_unknown_ts_format_is_rejected(tmp_path: Path) -> None:
    events = pd.DataFrame({"user_id": [1], "item_id": [2], "ts": [T0]})
    with pytest.raises(ContractError, match="strptime"):
        write_dataset(
            tmp_path, events=events, users=None, items=None, info=_info(), ts_format="epoch"
        )


def test_clean_in_place_check_leaves_files_untouched(tmp_path: Path) -> None:
    write_dataset(tmp_path, events=_good_events(), users=_users(), items=_items(), info=_info())
    # Re-encode with pyarrow: same rows, different bytes than the validator would write.
    table = pq.read_table(tmp_path / EVENTS_FILE)
    pq.write_table(table, tmp_path / EVENTS_FILE, compression="snappy")
    before = (tmp_path / EVENTS_FILE).read_bytes()

    report = validate_dir(tmp_path)

    assert report.n_quarantined == 0
    assert (tmp_path / EVENTS_FILE).read_bytes() == before


@pytest.mark.parametrize(
    ("column", "arrow_type"),
    [("ts", pa.timestamp("ms", tz="UTC")), ("event", pa.large_string())],
)
def test_a_clean_file_in_other_arrow_types_is_rewritten_so_split_takes_it(
    tmp_path: Path, column: str, arrow_type: pa.DataType
) -> None:
    # DuckDB names timestamp[ms] and timestamp[us] alike, and large_string and string alike:
    # left as it was, `mlsd data split` would refuse the file and send the user back here.
    write_dataset(tmp_path, events=_good_events(), users=_users(), items=_items(), info=_info())
    table = pq.read_table(tmp_path / EVENTS_FILE)
    index = table.schema.get_field_index(column)
    table = table.set_column(index, column, table.column(column).cast(arrow_type))
    pq.write_table(table, tmp_path / EVENTS_FILE)

    report = validate_dir(tmp_path)

    assert report.n_quarantined == 0
    assert (
        pq.read_schema(tmp_path / EVENTS_FILE).field(column).type
        == EVENTS_SCHEMA.field(column).type
    )
    assert run(["data", "split", str(tmp_path), "--val-frac", "0.1", "--test-frac", "0.1"]) == 0


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _with_events(directory: Path, **columns: object) -> None:
    """Overwrite columns of ``events.parquet`` the way another tool might have written it."""
    table = pq.read_table(directory / EVENTS_FILE).to_pandas().assign(**columns)
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), directory / EVENTS_FILE)


@pytest.mark.parametrize("per_second", [1, 1_000, 1_000_000, 1_000_000_000])
def test_auto_reads_epoch_integers_in_the_unit_their_magnitude_implies(
    tmp_path: Path, per_second: int
) -> None:
    write_dataset(tmp_path, events=_good_events(), users=_users(), items=_items(), info=_info())
    expected = pd.read_parquet(tmp_path / EVENTS_FILE)["ts"]
    if per_second > 1:  # sub-second parts must survive too
        expected = expected + pd.Timedelta(milliseconds=123)
    epoch = (expected - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1) * per_second
    if per_second > 1:
        epoch = epoch + 123 * per_second // 1000
    _with_events(tmp_path, ts=epoch.astype("int64"))

    report = validate_dir(tmp_path)

    assert (report.n_kept, report.n_quarantined) == (50, 0)
    kept = pq.read_table(tmp_path / EVENTS_FILE)
    assert kept.schema.field("ts").type == EVENTS_SCHEMA.field("ts").type  # rewritten as contract
    assert kept.column("ts").to_pandas().tolist() == expected.tolist()
    assert read_info(tmp_path).ts_min == expected.min().isoformat()


def test_seconds_format_on_millisecond_values_is_refused_and_writes_nothing(
    tmp_path: Path,
) -> None:
    write_dataset(tmp_path, events=_good_events(), users=_users(), items=_items(), info=_info())
    before = _snapshot(tmp_path)
    events = _good_events().assign(ts=lambda f: f["ts"] * 1000)

    with pytest.raises(ContractError) as error:
        write_dataset(
            tmp_path,
            events=events,
            users=_users(),
            items=_items(),
            info=_info(),
            ts_format="unix",
            input_files={"events": "clicks.csv"},
        )

    message = str(error.value)
    assert message.startswith("clicks.csv: 50 of 50 rows fail the timestamp rules (column ts")
    assert f"ts = '{T0 * 1000}'" in message  # a raw value, as given
    assert "epoch milliseconds: use --ts-format unix_ms" in message
    assert _snapshot(tmp_path) == before  # the previous dataset is byte-identical


def test_in_place_validate_refuses_unparseable_timestamps_and_keeps_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_dataset(tmp_path, events=_good_events(), users=_users(), items=_items(), info=_info())
    _with_events(tmp_path, ts=[f"13/09/2020 12:{i:02d}:00" for i in range(50)])
    before = _snapshot(tmp_path)

    assert run(["data", "validate", str(tmp_path)]) == 1

    err = capsys.readouterr().err
    assert "events.parquet: 50 of 50 rows fail the timestamp rules" in err
    assert "--ts-format" in err
    assert _snapshot(tmp_path) == before  # not emptied into the quarantine


def test_a_failed_quarantine_write_leaves_the_events_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_dataset(tmp_path, events=_good_events(), users=_users(), items=_items(), info=_info())
    table = pq.read_table(tmp_path / EVENTS_FILE).to_pandas()
    polluted = pd.concat([table, table.iloc[[0]]], ignore_index=True)  # one duplicate to move
    pq.write_table(pa.Table.from_pandas(polluted, preserve_index=False), tmp_path / EVENTS_FILE)
    before = _snapshot(tmp_path)

    def disk_full(table: pa.Table, where: str | Path, **kwargs: object) -> None:
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(pq, "write_table", disk_full)
    with pytest.raises(OSError, match="No space left"):
        validate_dir(tmp_path)

    # The duplicate is still in events.parquet, not lost between the two files; no .tmp left.
    assert _snapshot(tmp_path) == before


def test_a_failed_dataset_json_write_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_dataset(tmp_path, events=_good_events(), users=_users(), items=_items(), info=_info())
    old = (tmp_path / INFO_FILE).read_text()
    _with_events(tmp_path, user_id=[1] * 49 + [42])  # an unknown user, so validate rewrites
    write_text = Path.write_text

    def disk_full(self: Path, data: str, *args: object, **kwargs: object) -> int:
        write_text(self, data[: len(data) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        validate_dir(tmp_path)

    assert (tmp_path / INFO_FILE).read_text() == old
    assert not list(tmp_path.glob("*.tmp"))
