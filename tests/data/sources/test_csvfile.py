"""Generic CSV import: real MovieLens files through the generic options, dense ids, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from mlsd.data.schema import ContractError, read_info
from mlsd.data.sources.csvfile import import_csv, read_delimited, record_lines
from mlsd.data.sources.movielens import import_movielens

CONTRACT = ["user_id", "item_id", "ts", "value"]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def parquet(out: Path, name: str) -> pd.DataFrame:
    return pd.read_parquet(out / f"{name}.parquet")


@pytest.mark.dataset
def test_ml100k_u_data_without_header_matches_the_movielens_importer(
    ml100k_dir: Path, tmp_path: Path
) -> None:
    report = import_csv(
        ml100k_dir / "u.data",
        sep="\t",
        header=False,
        user_col="0",
        item_col="1",
        value_col="2",
        ts_col="3",
        out=tmp_path / "csv",
    )
    assert report.info is not None
    assert (report.n_kept, report.n_quarantined) == (100_000, 0)
    assert (report.info.n_users, report.info.n_items) == (943, 1_682)
    import_movielens("movielens-100k", source=ml100k_dir, out=tmp_path / "ml")
    pd.testing.assert_frame_equal(
        parquet(tmp_path / "csv", "events")[CONTRACT], parquet(tmp_path / "ml", "events")[CONTRACT]
    )
    assert set(parquet(tmp_path / "csv", "events")["event"]) == {"interaction"}


@pytest.mark.dataset
def test_latest_small_with_an_items_file(ml_latest_small_dir: Path, tmp_path: Path) -> None:
    report = import_csv(
        ml_latest_small_dir / "ratings.csv",
        user_col="userId",
        item_col="movieId",
        ts_col="timestamp",
        value_col="rating",
        items=ml_latest_small_dir / "movies.csv",
        out=tmp_path,
        name="latest-small-csv",
    )
    assert report.info is not None
    assert (report.n_kept, report.n_quarantined) == (100_836, 0)
    assert (report.info.n_users, report.info.n_items) == (610, 9_742)
    assert report.info.name == "latest-small-csv"
    items = parquet(tmp_path, "items").set_index("item_id")
    assert items.loc[1, "title"] == "Toy Story (1995)"


def test_string_ids_get_dense_ids_shared_with_the_attribute_files(tmp_path: Path) -> None:
    events = write(
        tmp_path / "events.csv",
        "who,what,when,device\n"
        "alice,song-x,1700000000,phone\n"
        "bob,song-y,1700000001,web\n"
        "alice,song-y,1700000002,\n"
        "carol,song-x,1700000003,web\n",
    )
    users = write(tmp_path / "people.csv", "name,country\ndave,NA\ncarol,FR\nalice,SE\nbob,US\n")
    report = import_csv(
        events, user_col="who", item_col="what", ts_col="when", users=users, user_key="name",
        out=tmp_path / "out",
    )  # fmt: skip
    assert (report.n_kept, report.n_quarantined) == (4, 0)
    out = tmp_path / "out"
    joined = (
        parquet(out, "events")
        .merge(parquet(out, "users"), on="user_id")
        .merge(parquet(out, "items").rename(columns={"external_id": "item"}), on="item_id")
        .sort_values("ts")
    )
    assert joined["external_id"].tolist() == ["alice", "bob", "alice", "carol"]
    assert joined["country"].tolist() == ["SE", "US", "SE", "FR"]
    assert joined["item"].tolist() == ["song-x", "song-y", "song-y", "song-x"]
    assert joined["device"].tolist() == ["phone", "web", None, "web"]  # context column kept
    user_table = parquet(out, "users").set_index("external_id")
    assert user_table.loc["dave", "user_id"] == 3  # only in the users file: the next dense id
    assert user_table.loc["dave", "country"] == "NA"  # Namibia, not a missing value
    assert read_info(out).extra["dense_ids"] == {"user_id": True, "item_id": True}


def test_a_missing_string_id_stays_missing_and_is_quarantined(tmp_path: Path) -> None:
    events = write(tmp_path / "e.csv", "u,i,t\nann,x,1700000000\n,x,1700000001\n")
    report = import_csv(events, user_col="u", item_col="i", ts_col="t", out=tmp_path / "out")
    assert (report.n_kept, report.reasons) == (1, {"e.csv:null_user_id": 1})
    assert parquet(tmp_path / "out", "users")["external_id"].tolist() == ["ann"]


def test_a_quarantined_row_keeps_the_ids_the_file_gave_not_the_dense_ones(
    tmp_path: Path,
) -> None:
    events = write(tmp_path / "e.csv", "u,i,t\nann,x,1700000000\nbob,007,soon\n")
    import_csv(events, user_col="u", item_col="i", ts_col="t", out=tmp_path / "out")
    quarantine = parquet(tmp_path / "out", "quarantine")
    assert json.loads(quarantine["data"].item()) == {
        "user_id": "bob",
        "item_id": "007",
        "ts": "soon",
    }


def test_integer_ids_are_kept(tmp_path: Path) -> None:
    events = write(tmp_path / "e.csv", "u,i,t\n42,7,1700000000\n5,7,1700000001\n")
    import_csv(events, user_col="u", item_col="i", ts_col="t", out=tmp_path / "out")
    assert parquet(tmp_path / "out", "users")["user_id"].tolist() == [5, 42]
    assert "external_id" not in parquet(tmp_path / "out", "users").columns
    assert read_info(tmp_path / "out").extra["dense_ids"] == {"user_id": False, "item_id": False}


def test_iso_timestamps_and_a_bad_row_reported_by_position(tmp_path: Path) -> None:
    events = write(
        tmp_path / "clicks.tsv",
        "user\titem\tat\tkind\tscore\n"
        "1\t10\t2024-01-02T03:04:05Z\tclick\t1\n"
        "1\t11\tyesterday\tclick\t1\n"
        "2\t10\t2024-01-02 05:04:06+01:00\tview\t0.5\n",
    )
    report = import_csv(
        events, sep="\t", user_col="user", item_col="item", ts_col="at", event_col="kind",
        value_col="score", ts_format="iso", out=tmp_path / "out",
    )  # fmt: skip
    assert (report.n_kept, report.n_quarantined) == (2, 1)
    table = parquet(tmp_path / "out", "events")
    assert table["ts"].tolist() == [
        pd.Timestamp("2024-01-02 03:04:05", tz="UTC"),
        pd.Timestamp("2024-01-02 04:04:06", tz="UTC"),
    ]
    assert table["event"].tolist() == ["click", "view"]
    assert table["value"].tolist() == [1.0, 0.5]
    quarantine = parquet(tmp_path / "out", "quarantine")
    assert quarantine[["file", "row", "line", "reason"]].values.tolist() == [
        ["clicks.tsv", 1, 3, "bad_ts"]
    ]
    assert report.examples == ["clicks.tsv, line 3: bad_ts"]


def test_quarantined_rows_name_their_line_across_blank_lines_and_multiline_fields(
    tmp_path: Path,
) -> None:
    events = write(
        tmp_path / "e.csv",
        "user,item,ts,note\n"  # line 1
        "1,2,1700000000,a\n"  # 2
        "\n"  # 3: blank, skipped
        "4,5,noon,b\n"  # 4: bad ts
        "   \n"  # 5: whitespace only, skipped
        '6,7,1700000000,"two\nlines"\n'  # 6-7: one row
        ",8,1700000000,c\n"  # 8: no user
        "9,10,1700000000,d",  # 9, no final newline
    )
    report = import_csv(events, user_col="user", item_col="item", ts_col="ts", out=tmp_path / "o")
    quarantine = parquet(tmp_path / "o", "quarantine")
    assert quarantine[["row", "line", "reason"]].values.tolist() == [
        [1, 4, "bad_ts"],
        [3, 8, "null_user_id"],
    ]
    assert report.examples == ["e.csv, line 4: bad_ts", "e.csv, line 8: null_user_id"]
    assert parquet(tmp_path / "o", "events")["note"].tolist() == ["a", "two\nlines", "d"]


@pytest.mark.parametrize(
    ("text", "sep", "header", "expected"),
    [
        ("a,b\n1,2\n3,4\n", ",", True, [2, 3]),
        ("1\t2\n3\t4", "\t", False, [1, 2]),
        ("a,b\r\n1,2\r\n\r\n3,4\r\n", ",", True, [2, 4]),
        ('a,b\n"x\n\ny",2\n3,4\n', ",", True, [2, 5]),  # a blank line inside quotes is data
        ("a::b\n1::2\n\n3::4\n", "::", True, None),  # the csv module cannot split on "::"
        (f'a,b\n"{"x" * 200_000}",1\n\n2,3\n', ",", True, None),  # over csv's field limit
    ],
)
def test_record_lines(
    tmp_path: Path, text: str, sep: str, header: bool, expected: list[int] | None
) -> None:
    path = tmp_path / "f.txt"
    path.write_bytes(text.encode())
    n_rows = len(read_delimited(path, sep=sep, header=header)) if sep != "::" else 2
    lines = record_lines(path, sep=sep, header=header, n_rows=n_rows)
    assert (None if lines is None else lines.tolist()) == expected


def test_strptime_timestamps(tmp_path: Path) -> None:
    events = write(tmp_path / "e.csv", "u;i;t\n1;2;31/12/2023 23:59\n")
    import_csv(
        events, sep=";", user_col="u", item_col="i", ts_col="t", ts_format="%d/%m/%Y %H:%M",
        out=tmp_path / "out",
    )  # fmt: skip
    ts = parquet(tmp_path / "out", "events")["ts"].tolist()
    assert ts == [pd.Timestamp("2023-12-31 23:59", tz="UTC")]


def test_a_wrong_timestamp_format_names_the_users_column_and_writes_nothing(
    tmp_path: Path,
) -> None:
    events = write(tmp_path / "e.csv", "user,item,time\n1,2,2024-01-01T10:00:00Z\n3,4,2024-01-02\n")
    out = tmp_path / "out"
    with pytest.raises(ContractError) as error:
        import_csv(events, user_col="user", item_col="item", ts_col="time", out=out)
    message = str(error.value)
    assert "(column time, read as 'unix'), e.g. time = '2024-01-01T10:00:00Z'" in message
    assert "The values look like ISO 8601 text: use --ts-format iso." in message
    assert not out.exists()  # "nothing was written": not even the directory
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(ContractError, match="column 2 \\(by position\\)"):
        import_csv(
            write(tmp_path / "n.csv", "1,2,yesterday\n"),
            user_col="0", item_col="1", ts_col="2", header=False, out=existing,
        )  # fmt: skip
    assert existing.is_dir()  # the user's own directory stays


def test_missing_column_names_file_column_and_the_columns_it_has(tmp_path: Path) -> None:
    events = write(tmp_path / "e.csv", "user,item,time\n1,2,1700000000\n")
    with pytest.raises(ContractError) as error:
        import_csv(events, user_col="user", item_col="item", ts_col="timestamp", out=tmp_path)
    message = str(error.value)
    assert str(events) in message
    assert "no column 'timestamp'" in message
    assert "'user', 'item', 'time'" in message


def test_missing_key_column_in_an_attribute_file(tmp_path: Path) -> None:
    events = write(tmp_path / "e.csv", "user,item,ts\n1,2,1700000000\n")
    items = write(tmp_path / "items.csv", "movie,title\n2,Heat\n")
    with pytest.raises(ContractError, match=r"items\.csv: no column 'item'; .*'movie', 'title'"):
        import_csv(events, user_col="user", item_col="item", ts_col="ts", items=items, out=tmp_path)


def test_missing_file_is_named(tmp_path: Path) -> None:
    events = write(tmp_path / "e.csv", "user,item,ts\n1,2,1700000000\n")
    missing = tmp_path / "nope.csv"
    with pytest.raises(ContractError, match=r"nope\.csv: file not found"):
        import_csv(missing, user_col="user", item_col="item", ts_col="ts", out=tmp_path / "o")
    with pytest.raises(ContractError, match=r"nope\.csv: file not found"):
        import_csv(
            events, user_col="user", item_col="item", ts_col="ts", users=missing, out=tmp_path
        )


def test_unnamed_column_may_not_take_a_contract_name(tmp_path: Path) -> None:
    events = write(tmp_path / "e.csv", "user,item,ts,value\n1,2,1700000000,9\n")
    with pytest.raises(ContractError, match="'value' would clash"):
        import_csv(events, user_col="user", item_col="item", ts_col="ts", out=tmp_path / "o")
    with pytest.raises(ContractError, match="named for two roles"):
        import_csv(events, user_col="user", item_col="user", ts_col="ts", out=tmp_path / "o")


def test_zero_padded_and_signed_ids_are_not_merged_with_plain_ones(tmp_path: Path) -> None:
    events = write(
        tmp_path / "e.csv",
        "u,i,t\n007,1,1700000000\n7,1,1700000001\n+7,2,1700000002\n-0,2,1700000003\n0,2,1700000004\n",
    )
    report = import_csv(events, user_col="u", item_col="i", ts_col="t", out=tmp_path / "out")
    assert (report.n_kept, report.n_quarantined) == (5, 0)
    users = parquet(tmp_path / "out", "users")
    assert users["external_id"].tolist() == ["007", "7", "+7", "-0", "0"]
    assert users["user_id"].tolist() == [0, 1, 2, 3, 4]
    assert read_info(tmp_path / "out").extra["dense_ids"] == {"user_id": True, "item_id": False}


def test_plain_integer_ids_keep_their_values(tmp_path: Path) -> None:
    events = write(tmp_path / "e.csv", "u,i,t\n1,30,1700000000\n2,-5,1700000001\n30,0,1700000002\n")
    import_csv(events, user_col="u", item_col="i", ts_col="t", out=tmp_path / "out")
    assert parquet(tmp_path / "out", "events")["user_id"].tolist() == [1, 2, 30]
    assert parquet(tmp_path / "out", "events")["item_id"].tolist() == [30, -5, 0]
    assert read_info(tmp_path / "out").extra["dense_ids"] == {"user_id": False, "item_id": False}


def test_a_zero_padded_key_in_the_users_file_is_not_joined_to_the_plain_id(tmp_path: Path) -> None:
    events = write(tmp_path / "e.csv", "u,i,t\n7,1,1700000000\n007,1,1700000001\n")
    users = write(tmp_path / "people.csv", "u,country\n007,SE\n")
    report = import_csv(
        events, user_col="u", item_col="i", ts_col="t", users=users, out=tmp_path / "out"
    )
    table = parquet(tmp_path / "out", "users")
    assert table[["user_id", "external_id", "country"]].values.tolist() == [[1, "007", "SE"]]
    assert report.reasons == {"e.csv:unknown_user": 1}  # user "7" is not user "007"
    assert parquet(tmp_path / "out", "events")["user_id"].tolist() == [1]


def import_events(path: Path, tmp_path: Path) -> None:
    import_csv(path, user_col="u", item_col="i", ts_col="t", out=tmp_path / "out")


def test_a_row_with_too_many_fields_names_the_file_line_and_sep(tmp_path: Path) -> None:
    events = write(tmp_path / "e.csv", "u,i,t\n1,2,1700000000\n1,2,1700000001,x\n")
    with pytest.raises(ContractError) as error:
        import_events(events, tmp_path)
    message = str(error.value)
    assert f"{events}, line 3: 4 fields where the first row has 3" in message
    assert "--sep" in message


def test_a_trailing_separator_on_every_row_keeps_each_value_in_its_column(
    tmp_path: Path,
) -> None:
    """pandas took the first column as the index when rows had one field more than the
    header: user ids vanished and item ids became users, with nothing quarantined."""
    events = write(
        tmp_path / "e.csv",
        "u,i,t,logged\n101,7,1700000000,1700000005,\n102,8,1700000001,1700000009,\n",
    )
    import_events(events, tmp_path)
    got = parquet(tmp_path / "out", "events")
    assert got["user_id"].tolist() == [101, 102]
    assert got["item_id"].tolist() == [7, 8]
    assert got["logged"].tolist() == ["1700000005", "1700000009"]


def test_a_value_beyond_the_headers_columns_is_refused_naming_its_line(tmp_path: Path) -> None:
    events = write(tmp_path / "e.csv", "u,i,t\n1,2,1700000000,\n\n1,3,1700000001,x\n")
    with pytest.raises(ContractError) as error:
        import_events(events, tmp_path)
    message = str(error.value)
    assert f"{events}, line 4: 4 fields where the header names 3" in message
    assert "1 such row(s)" in message


def test_an_empty_file_is_named(tmp_path: Path) -> None:
    events = write(tmp_path / "e.csv", "")
    with pytest.raises(ContractError, match=r"e\.csv: the file is empty"):
        import_events(events, tmp_path)


def test_a_latin1_file_names_the_line_and_asks_for_utf8(tmp_path: Path) -> None:
    events = tmp_path / "e.csv"
    events.write_bytes("u,i,t\n1,2,1700000000\nj\u00e9r\u00f4me,2,1700000001\n".encode("latin-1"))
    with pytest.raises(ContractError) as error:
        import_events(events, tmp_path)
    message = str(error.value)
    assert f"{events}, line 3: not valid UTF-8 (byte 0xe9)" in message
    assert "Re-encode it to UTF-8" in message


@pytest.mark.parametrize(
    ("sep", "flag"), [("\t", "--sep '\\t'"), (";", "--sep ';'"), ("|", "--sep '|'")]
)
def test_a_file_read_with_the_wrong_separator_says_which_it_looks_like(
    tmp_path: Path, sep: str, flag: str
) -> None:
    events = write(tmp_path / "e.txt", f"u{sep}i{sep}t\n1{sep}2{sep}1700000000\n")
    with pytest.raises(ContractError) as error:
        import_events(events, tmp_path)
    message = str(error.value)
    assert f"{events}: no column 'u', 'i', 't'" in message
    assert f"pass {flag}." in message


def test_a_headerless_file_with_the_wrong_separator_says_which_it_looks_like(
    tmp_path: Path,
) -> None:
    events = write(tmp_path / "u.data", "1\t2\t1700000000\n")
    with pytest.raises(ContractError, match=r"u\.data: no column '1', '2'.*pass --sep '\\t'\."):
        import_csv(
            events, header=False, user_col="0", item_col="1", ts_col="2", out=tmp_path / "out"
        )


def test_an_events_file_with_only_a_header_is_refused(tmp_path: Path) -> None:
    events = write(tmp_path / "e.csv", "u,i,t\n")
    with pytest.raises(ContractError, match=r"e\.csv: a header but no data rows"):
        import_events(events, tmp_path)
    assert not (tmp_path / "out").exists()
