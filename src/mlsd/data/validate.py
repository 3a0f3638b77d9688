"""Validation + quarantine: coerce raw tables to the dataset contract, set bad rows aside.

Every loader ends in :func:`write_dataset`, and ``mlsd data validate DIR`` re-checks an existing
contract directory with :func:`validate_dir`. Both run the same rules in DuckDB, so a 100M-row
events file is checked out of core rather than in a pandas frame.

A row that breaks a rule goes to ``quarantine.parquet`` with the file it came from, its 0-based
row number there, the line of a text file it started on (when the loader knew it), the first rule
it broke (see :data:`REASONS`, in priority order) and the row itself as JSON: nothing the user
gave is dropped silently. The report lists the first few, so the user sees where to look.

Timestamps: ``"auto"`` (what ``validate_dir`` uses) reads timestamp columns as they are, text as
ISO 8601 and numbers as epoch time in the unit their magnitude implies (:func:`epoch_format`), so
a file of epoch milliseconds is not read as seconds tens of millennia ahead. A wrong format shows as
most rows failing the timestamp rules; then nothing is written and a :class:`ContractError` says
which format the values look like, rather than a directory being emptied into the quarantine.

Writes go through :func:`~mlsd.data.schema.replace_atomically`, quarantine first, so a failure
part-way leaves each file whole and never drops a row from ``events.parquet`` before it is in
``quarantine.parquet``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mlsd.data.schema import (
    EVENTS_FILE,
    EVENTS_SCHEMA,
    FLOAT32_MAX,
    INFO_FILE,
    ITEMS_FILE,
    ITEMS_REQUIRED,
    QUARANTINE_FILE,
    QUARANTINE_SCHEMA,
    USERS_FILE,
    USERS_REQUIRED,
    ContractError,
    DatasetInfo,
    content_hash,
    contract_mismatches,
    replace_atomically,
    write_info,
)

REASONS = (
    "null_user_id",
    "bad_user_id",
    "null_item_id",
    "bad_item_id",
    "bad_ts",
    "ts_out_of_range",
    "bad_value",
    "negative_value",
    "null_event",
    "unknown_user",
    "unknown_item",
    "duplicate",
)
"""Quarantine reasons for events, in the order they are checked (a row gets the first)."""

TS_FORMATS = ("auto", "unix", "unix_ms", "unix_us", "unix_ns", "iso", "datetime")
"""Named timestamp formats; any other string is a ``strptime`` format such as ``%Y-%m-%d``."""

_EPOCHS = {
    "unix": (1.0, "seconds"),
    "unix_ms": (1e3, "milliseconds"),
    "unix_us": (1e6, "microseconds"),
    "unix_ns": (1e9, "nanoseconds"),
}
"""Each epoch format: its units per second and their name, smallest unit last."""

_MAX_EPOCH_S = 1e11
"""Epoch seconds this large or larger are not read as timestamps (1e11 s is the year 5138)."""

_NUMERIC_TYPES = {
    "TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT",
    "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT", "FLOAT", "DOUBLE",
}  # fmt: skip

_TS_REASONS = ("bad_ts", "ts_out_of_range")

MAX_BAD_TS_SHARE = 0.5
"""Refuse, writing nothing, when more than this share of the events fail the timestamp rules."""

_ROW = "__row"


@dataclass(frozen=True)
class ValidationRules:
    """What counts as a plausible event.

    Attributes:
        ts_min: earliest plausible timestamp (ISO, UTC); earlier rows are quarantined.
        ts_max: latest plausible timestamp (ISO, UTC); ``None`` means one day after now.
        allow_negative_values: keep events with ``value < 0`` (e.g. signed feedback).
        default_event: the ``event`` of rows from a source without an event column.
    """

    ts_min: str = "1971-01-01"
    ts_max: str | None = None
    allow_negative_values: bool = False
    default_event: str = "interaction"

    def ts_max_or_now(self) -> pd.Timestamp:
        if self.ts_max is not None:
            return pd.Timestamp(self.ts_max, tz="UTC")
        return pd.Timestamp.now(tz="UTC") + pd.Timedelta(days=1)


@dataclass
class ValidationReport:
    """Counts of what :func:`write_dataset` or :func:`validate_dir` kept and set aside."""

    out: Path
    n_kept: int
    n_quarantined: int
    reasons: dict[str, int] = field(default_factory=dict)
    """Quarantined rows per ``file:reason``, e.g. ``{"events.parquet:duplicate": 3}``."""
    info: DatasetInfo | None = None
    examples: list[str] = field(default_factory=list)
    """The first few rows this run quarantined, e.g. ``"ratings.csv, line 12: bad_ts"``."""


def write_dataset(
    out: Path,
    *,
    events: pd.DataFrame | pa.Table,
    users: pd.DataFrame | pa.Table | None,
    items: pd.DataFrame | pa.Table | None,
    info: DatasetInfo,
    ts_format: str = "unix",
    input_files: Mapping[str, str] | None = None,
    input_lines: Mapping[str, npt.NDArray[np.int64]] | None = None,
    input_values: Mapping[str, pd.Series] | None = None,
    rules: ValidationRules | None = None,
    ts_column: str = "ts",
) -> ValidationReport:
    """Validate raw tables and write them as a contract directory.

    Args:
        out: the directory to write (created if missing; contract files are overwritten).
        events: ``user_id``, ``item_id``, ``ts`` (raw, read per ``ts_format``), optional
            ``event`` and ``value``, and any context columns (kept as they are). Row order is
            the input file's, so quarantined rows are reported by their input row number.
        users: ``user_id`` + attributes, or ``None`` to derive the users from the events.
        items: ``item_id`` + attributes, or ``None`` to derive the items from the events.
        info: name, source and licence; counts, time range and hash are filled in here.
        ts_format: one of :data:`TS_FORMATS` or a ``strptime`` format.
        input_files: names for the quarantine's ``file`` column, keyed by ``events``,
            ``users`` and ``items`` (defaults to the contract file names).
        input_lines: per kind, the 1-based line of the input text file each row starts on
            (one per row), for the quarantine's ``line`` column; a kind left out gets none.
        input_values: events columns the loader rewrote (e.g. ids made dense), as the input
            had them, one per row: a quarantined row's ``data`` shows what the user wrote.
        rules: what counts as plausible.
        ts_column: the timestamp column's name in the user's input (errors name it).

    Returns:
        The report, with the final ``dataset.json`` contents in ``report.info``.
    """
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    names = {"events": EVENTS_FILE, "users": USERS_FILE, "items": ITEMS_FILE, **(input_files or {})}
    con = _connect()
    con.register("raw_events", _with_row_number(events))
    if users is not None:
        con.register("raw_users", _with_row_number(users))
    if items is not None:
        con.register("raw_items", _with_row_number(items))
    try:
        return _run(
            con,
            out,
            info=info,
            ts_format=ts_format,
            names=names,
            lines=input_lines or {},
            values=input_values or {},
            has_users=users is not None,
            has_items=items is not None,
            rules=rules or ValidationRules(),
            previous=None,
            in_place=False,
            ts_column=ts_column,
        )
    except ContractError:
        if created and not any(out.iterdir()):  # refused before writing: leave no trace
            out.rmdir()
        raise


def validate_dir(directory: Path, *, rules: ValidationRules | None = None) -> ValidationReport:
    """Re-validate a contract directory in place.

    Bad rows move from ``events.parquet`` (and ``users``/``items``) to ``quarantine.parquet``,
    which keeps any rows quarantined before; ``dataset.json`` gets the new counts and hash.

    Raises:
        ContractError: a file is missing, unreadable, or lacks a required column.
    """
    directory = Path(directory)
    info_path = directory / INFO_FILE
    try:
        info = DatasetInfo.from_dict(json.loads(info_path.read_text()))
    except FileNotFoundError:
        info = DatasetInfo(name=directory.name, source="unknown", licence="unknown")
    except json.JSONDecodeError as exc:
        raise ContractError(f"{info_path}: not valid JSON ({exc}); fix or delete it.") from exc
    con = _connect()
    for table, name, required in (
        ("raw_events", EVENTS_FILE, True),
        ("raw_users", USERS_FILE, False),
        ("raw_items", ITEMS_FILE, False),
    ):
        path = directory / name
        if not path.is_file():
            if required:
                raise ContractError(
                    f"{path}: not found. A dataset directory needs {EVENTS_FILE}; "
                    "create one with `mlsd data import ...` or `mlsd data synth ...`."
                )
            continue
        _register_parquet(con, table, path)
    previous = _read_quarantine(directory / QUARANTINE_FILE)
    return _run(
        con,
        directory,
        info=info,
        ts_format="auto",
        names={"events": EVENTS_FILE, "users": USERS_FILE, "items": ITEMS_FILE},
        lines={},
        values={},
        has_users=(directory / USERS_FILE).is_file(),
        has_items=(directory / ITEMS_FILE).is_file(),
        rules=rules or ValidationRules(),
        previous=previous,
        in_place=True,
    )


def _connect() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    # Keep the scan order of registered frames, so row numbers are input row numbers.
    con.execute("SET preserve_insertion_order = true")
    return con


def _to_arrow(frame: pd.DataFrame) -> pa.Table:
    """Arrow table of a raw frame; a column of mixed Python types becomes text, not an error."""
    columns: dict[str, pa.Array] = {}
    for name in frame.columns:
        values = frame[name]
        try:
            columns[str(name)] = pa.array(values, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            text = values.map(lambda v: None if pd.isna(v) else str(v))
            columns[str(name)] = pa.array(text, type=pa.string(), from_pandas=True)
    return pa.table(columns)


def _with_row_number(table: pd.DataFrame | pa.Table) -> pa.Table:
    arrow = table if isinstance(table, pa.Table) else _to_arrow(table)
    if _ROW in arrow.column_names:
        raise ContractError(f"column {_ROW!r} is reserved; rename it in the input")
    return arrow.append_column(_ROW, pa.array(range(arrow.num_rows), type=pa.int64()))


def _register_parquet(con: duckdb.DuckDBPyConnection, table: str, path: Path) -> None:
    try:
        pq.read_metadata(path)
        literal = str(path).replace("'", "''")
        con.execute(
            f"CREATE VIEW {table} AS SELECT * EXCLUDE (file_row_number), "
            f"file_row_number AS {_ROW} FROM read_parquet('{literal}', file_row_number = true)"
        )
    except (pa.ArrowException, OSError, duckdb.Error) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ContractError(
            f"{path}: cannot be read as Parquet ({first_line}). "
            "Re-create it with `mlsd data import ...`, or restore it from a copy."
        ) from exc


def _columns(con: duckdb.DuckDBPyConnection, table: str) -> dict[str, str]:
    rows = con.execute(f"DESCRIBE {table}").fetchall()
    return {str(r[0]): str(r[1]) for r in rows}


def _require(columns: Mapping[str, str], needed: tuple[str, ...], file: str) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        present = ", ".join(c for c in columns if c != _ROW)
        raise ContractError(
            f"{file}: missing required column(s) {', '.join(missing)}; the file has: {present}. "
            "Rename the columns or pass the right --*-col options."
        )


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _int_id(col: str) -> str:
    """SQL for an integer id, NULL when the raw value is not an integer (``1.5``, ``abc``)."""
    c = _q(col)
    return (
        f"CASE WHEN TRY_CAST({c} AS DOUBLE) = TRY_CAST({c} AS BIGINT) "
        f"THEN TRY_CAST({c} AS BIGINT) END"
    )


def epoch_format(magnitude: float) -> str:
    """The epoch format whose unit makes a typical ``abs(ts)`` of ``magnitude`` plausible.

    The first unit in which ``magnitude`` is below :data:`_MAX_EPOCH_S` seconds: below 1e11
    is seconds, below 1e14 milliseconds, below 1e17 microseconds, else nanoseconds. Each
    boundary is also 1973-03-03 in the next unit, so any data from after 1973 is read in its
    own unit.
    """
    for fmt, (per_second, _) in _EPOCHS.items():
        if magnitude / per_second < _MAX_EPOCH_S:
            return fmt
    return "unix_ns"


def _median_magnitude(con: duckdb.DuckDBPyConnection, table: str, where: str = "TRUE") -> Any:
    """Approximate median of ``abs(ts)`` over the rows whose ``ts`` is a number (else None)."""
    row = con.execute(
        f"SELECT approx_quantile(abs(TRY_CAST(ts AS DOUBLE)), 0.5) FROM {table} WHERE {where}"
    ).fetchone()
    return None if row is None else row[0]


def _resolve_ts_format(con: duckdb.DuckDBPyConnection, ts_format: str, col_type: str) -> str:
    """The concrete format of ``raw_events.ts``: ``auto`` decided by column type and magnitude."""
    if ts_format != "auto":
        return ts_format
    upper = col_type.upper()
    if upper.startswith(("TIMESTAMP", "DATE")):
        return "datetime"
    if upper in _NUMERIC_TYPES or upper.startswith("DECIMAL"):
        magnitude = _median_magnitude(con, "raw_events")
        return "unix" if magnitude is None else epoch_format(float(magnitude))
    return "iso"


def _ts_expr(fmt: str) -> str:
    """SQL turning raw ``ts`` into TIMESTAMPTZ, NULL when it does not parse."""
    if fmt in _EPOCHS:
        seconds = f"(TRY_CAST(ts AS DOUBLE) / {_EPOCHS[fmt][0]!r})"
        # to_timestamp raises on values out of range, so bound them first.
        return f"CASE WHEN abs({seconds}) < {_MAX_EPOCH_S!r} THEN to_timestamp({seconds}) END"
    if fmt in {"iso", "datetime"}:
        return "TRY_CAST(ts AS TIMESTAMPTZ)"
    escaped = fmt.replace("'", "''")
    return f"CAST(try_strptime(CAST(ts AS VARCHAR), '{escaped}') AS TIMESTAMP) AT TIME ZONE 'UTC'"


def _entity_sql(table: str, key: str) -> str:
    """Coerced entity table with a reason per row (``null_*``, ``bad_*``, ``duplicate``)."""
    short = key.removesuffix("_id")
    return f"""
        WITH c AS (SELECT *, {_int_id(key)} AS __id FROM {table}),
        r AS (
            SELECT *, CASE
                WHEN {_q(key)} IS NULL THEN 'null_{short}_id'
                WHEN __id IS NULL THEN 'bad_{short}_id'
                WHEN row_number() OVER (PARTITION BY __id ORDER BY {_ROW}) > 1 THEN 'duplicate'
            END AS __reason FROM c
        ) SELECT * FROM r"""


def _events_sql(
    columns: Mapping[str, str], ts_format: str, rules: ValidationRules, known: tuple[bool, bool]
) -> str:
    has_users, has_items = known
    value = "TRY_CAST(value AS DOUBLE)" if "value" in columns else "1.0::DOUBLE"
    event = "CAST(event AS VARCHAR)" if "event" in columns else f"'{rules.default_event}'"
    negative = "FALSE" if rules.allow_negative_values else "__value < 0"
    ts_min = rules.ts_min.replace("'", "")
    ts_max = rules.ts_max_or_now().isoformat()
    unknown_user = "__user NOT IN (SELECT __id FROM users_ok)" if has_users else "FALSE"
    unknown_item = "__item NOT IN (SELECT __id FROM items_ok)" if has_items else "FALSE"
    return f"""
        WITH c AS (
            SELECT *, {_int_id("user_id")} AS __user, {_int_id("item_id")} AS __item,
                {_ts_expr(ts_format)} AS __ts, {value} AS __value, {event} AS __event
            FROM raw_events
        ),
        r1 AS (
            SELECT *, CASE
                WHEN user_id IS NULL THEN 'null_user_id'
                WHEN __user IS NULL THEN 'bad_user_id'
                WHEN item_id IS NULL THEN 'null_item_id'
                WHEN __item IS NULL THEN 'bad_item_id'
                WHEN __ts IS NULL THEN 'bad_ts'
                WHEN __ts < TIMESTAMPTZ '{ts_min}' OR __ts > TIMESTAMPTZ '{ts_max}'
                    THEN 'ts_out_of_range'
                WHEN __value IS NULL OR isnan(__value) OR isinf(__value)
                    OR abs(__value) > {FLOAT32_MAX!r}::DOUBLE THEN 'bad_value'
                WHEN {negative} THEN 'negative_value'
                WHEN __event IS NULL OR trim(__event) = '' THEN 'null_event'
                WHEN {unknown_user} THEN 'unknown_user'
                WHEN {unknown_item} THEN 'unknown_item'
            END AS __reason FROM c
        ),
        r2 AS (
            SELECT *, CASE WHEN __reason IS NULL AND row_number() OVER (
                PARTITION BY __reason IS NULL, __user, __item, __ts, __event ORDER BY {_ROW}
            ) > 1 THEN 'duplicate' ELSE __reason END AS __why FROM r1
        ) SELECT * EXCLUDE (__reason) RENAME (__why AS __reason) FROM r2"""


def _run(
    con: duckdb.DuckDBPyConnection,
    out: Path,
    *,
    info: DatasetInfo,
    ts_format: str,
    names: Mapping[str, str],
    lines: Mapping[str, npt.NDArray[np.int64]],
    values: Mapping[str, pd.Series],
    has_users: bool,
    has_items: bool,
    rules: ValidationRules,
    previous: pd.DataFrame | None,
    in_place: bool,
    ts_column: str = "ts",
) -> ValidationReport:
    if ts_format not in TS_FORMATS and "%" not in ts_format:
        raise ContractError(
            f"ts format {ts_format!r} is not one of {', '.join(TS_FORMATS)} "
            "and not a strptime format such as '%Y-%m-%d %H:%M:%S'"
        )
    event_cols = _columns(con, "raw_events")
    _require(event_cols, ("user_id", "item_id", "ts"), names["events"])
    fmt = _resolve_ts_format(con, ts_format, event_cols["ts"])
    quarantine: list[pd.DataFrame] = [] if previous is None else [previous]
    for kind, key, present in (("users", "user_id", has_users), ("items", "item_id", has_items)):
        if present:
            _require(_columns(con, f"raw_{kind}"), (key,), names[kind])
            con.execute(f"CREATE TEMP TABLE {kind}_checked AS {_entity_sql(f'raw_{kind}', key)}")
            con.execute(
                f"CREATE TEMP VIEW {kind}_ok AS SELECT * FROM {kind}_checked WHERE __reason IS NULL"
            )
            quarantine.append(_quarantined(con, f"{kind}_checked", names[kind], lines.get(kind)))
    sql = _events_sql(event_cols, fmt, rules, (has_users, has_items))
    con.execute(f"CREATE TEMP TABLE events_checked AS {sql}")
    _check_timestamps(
        con, names["events"], ts_format, fmt, rules, in_place=in_place, column=ts_column
    )
    events = _quarantined(con, "events_checked", names["events"], lines.get("events"))
    quarantine.append(_as_given(events, values))

    n_new = sum(len(frame) for frame in quarantine) - (0 if previous is None else len(previous))
    frames = [frame for frame in quarantine if not frame.empty]
    new = quarantine[1:] if previous is not None else quarantine
    examples = [_where(row) for frame in new for row in frame.head(5).itertuples()][:5]
    table = pd.concat(frames, ignore_index=True) if frames else _empty_quarantine()
    # Quarantine first: if writing the clean files then fails, no row is lost, only listed twice.
    _write_quarantine(out / QUARANTINE_FILE, table)
    # A clean in-place check of files already in contract types leaves them (and the hash) alone.
    if n_new or not in_place or not _in_contract_types(out, has_users, has_items):
        _write_clean(con, out, event_cols, has_users=has_users, has_items=has_items)
    return _finish(con, out, info, table, examples)


_ISO_DATE = re.compile(r"\s*\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}|\s*$)")
"""The start of an ISO 8601 date or date-time: what ``--ts-format iso`` reads."""


def _check_timestamps(
    con: duckdb.DuckDBPyConnection,
    file: str,
    requested: str,
    fmt: str,
    rules: ValidationRules,
    *,
    in_place: bool,
    column: str = "ts",
) -> None:
    """Refuse when most events fail the timestamp rules: the format is wrong, not the rows."""
    reasons = ", ".join(f"'{r}'" for r in _TS_REASONS)
    where = f"__reason IN ({reasons})"
    n_rows, n_bad = con.execute(
        f"SELECT count(*), count(*) FILTER (WHERE {where}) FROM events_checked"
    ).fetchone() or (0, 0)
    if n_bad <= MAX_BAD_TS_SHARE * n_rows:
        return
    sample_row = con.execute(
        f"SELECT CAST(ts AS VARCHAR) FROM events_checked WHERE {where} ORDER BY {_ROW} LIMIT 1"
    ).fetchone()
    sample = None if sample_row is None else sample_row[0]
    magnitude = _median_magnitude(con, "events_checked", where)
    read_as = f"{fmt!r} (inferred by 'auto')" if requested == "auto" else repr(fmt)
    if magnitude is not None and epoch_format(float(magnitude)) != fmt:
        likely = epoch_format(float(magnitude))
        hint = f"The values look like epoch {_EPOCHS[likely][1]}: use --ts-format {likely}."
    elif magnitude is not None:
        hint = (
            f"They are numbers outside the plausible range {rules.ts_min} .. "
            f"{rules.ts_max_or_now():%Y-%m-%d}; check the timestamp column holds epoch times "
            "(e.g. not a duration or an id)."
        )
    elif fmt not in {"iso", "datetime"} and _ISO_DATE.match(str(sample or "")):
        hint = "The values look like ISO 8601 text: use --ts-format iso."
    else:
        iso = "" if fmt in {"iso", "datetime"} else ", or --ts-format iso for ISO 8601 text"
        hint = f"Pass a strptime format such as --ts-format '%d/%m/%Y %H:%M:%S'{iso}."
    if in_place:
        hint += (
            " `mlsd data validate` reads the column as it is stored; re-import the source with "
            "`mlsd data import csv ... --ts-format FORMAT` to read it differently."
        )
    raise ContractError(
        f"{file}: {n_bad:,} of {n_rows:,} rows fail the timestamp rules (column {column}, read "
        f"as {read_as}), e.g. {column} = {sample!r}; nothing was written. {hint}"
    )


def _in_contract_types(directory: Path, has_users: bool, has_items: bool) -> bool:
    """Whether the dataset's files in ``directory`` already have the contract's column types
    (an untouched file does); what :mod:`mlsd.data.split` will check too."""
    files = (
        (EVENTS_FILE, EVENTS_SCHEMA, True),
        (USERS_FILE, USERS_REQUIRED, has_users),
        (ITEMS_FILE, ITEMS_REQUIRED, has_items),
    )
    return not any(
        contract_mismatches(directory / name, required)
        for name, required, present in files
        if present
    )


def _write_clean(
    con: duckdb.DuckDBPyConnection,
    out: Path,
    event_cols: Mapping[str, str],
    *,
    has_users: bool,
    has_items: bool,
) -> None:
    """Write the rows that passed every rule as the contract's Parquet files."""
    extra = [c for c in event_cols if c not in {"user_id", "item_id", "ts", "event", "value", _ROW}]
    extra_sql = "".join(f", {_q(c)}" for c in extra)
    _copy(
        con,
        "SELECT __user AS user_id, __item AS item_id, __ts AS ts, __event AS event, "
        f"CAST(__value AS FLOAT) AS value{extra_sql} FROM events_checked "
        f"WHERE __reason IS NULL ORDER BY __ts, {_ROW}",
        out / EVENTS_FILE,
    )
    for kind, key, present in (("users", "user_id", has_users), ("items", "item_id", has_items)):
        column = "__user" if kind == "users" else "__item"
        if present:
            select = (
                f"SELECT __id AS {key}, * EXCLUDE ({_q(key)}, __id, __reason, {_ROW}) "
                f"FROM {kind}_ok ORDER BY __id"
            )
        else:
            select = (
                f"SELECT DISTINCT {column} AS {key} FROM events_checked "
                f"WHERE __reason IS NULL ORDER BY 1"
            )
        _copy(con, select, out / (USERS_FILE if kind == "users" else ITEMS_FILE))


def _quarantined(
    con: duckdb.DuckDBPyConnection,
    table: str,
    file: str,
    lines: npt.NDArray[np.int64] | None,
) -> pd.DataFrame:
    raw = [c for c in _columns(con, table) if not c.startswith("__")]
    struct = ", ".join(f"{_q(c)}: {_q(c)}" for c in raw) or "'empty': NULL"
    frame: pd.DataFrame = con.execute(
        f"SELECT ? AS file, {_ROW} AS row, __reason AS reason, "
        f"CAST(to_json({{{struct}}}) AS VARCHAR) AS data "
        f"FROM {table} WHERE __reason IS NOT NULL ORDER BY {_ROW}",
        [file],
    ).df()
    line = pd.array([pd.NA] * len(frame), dtype="Int64")
    if lines is not None and len(frame):
        line = pd.array(lines[frame["row"].to_numpy()], dtype="Int64")
    return frame.assign(line=line)


def _as_given(quarantined: pd.DataFrame, values: Mapping[str, pd.Series]) -> pd.DataFrame:
    """The quarantined rows' ``data`` with the values the loader rewrote put back."""
    if quarantined.empty or not values:
        return quarantined
    rows = quarantined["row"].to_numpy()
    data = [json.loads(text) for text in quarantined["data"]]
    for column, given in values.items():
        for record, value in zip(data, given.iloc[rows], strict=True):
            record[column] = None if pd.isna(value) else value
    text = [
        json.dumps(record, default=str, ensure_ascii=False, separators=(",", ":"))
        for record in data
    ]
    return quarantined.assign(data=text)


def _where(row: Any) -> str:
    """One quarantined row as the report lists it: the file, the line (else the row), why."""
    at = f"line {row.line}" if not pd.isna(row.line) else f"row {row.row}"
    return f"{row.file}, {at}: {row.reason}"


def _copy(con: duckdb.DuckDBPyConnection, select: str, path: Path) -> None:
    """Write a query to Parquet atomically (a re-validated file may be the query's input)."""

    def write(tmp: Path) -> None:
        literal = str(tmp).replace("'", "''")
        con.execute(f"COPY ({select}) TO '{literal}' (FORMAT parquet, COMPRESSION zstd)")

    replace_atomically(path, write)


def _empty_quarantine() -> pd.DataFrame:
    return QUARANTINE_SCHEMA.empty_table().to_pandas()


def _read_quarantine(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path).to_pandas()
    except (pa.ArrowException, OSError) as exc:
        raise ContractError(f"{path}: cannot be read as Parquet ({exc}); move it aside.") from exc
    if "line" not in table.columns:  # written before the column existed
        table["line"] = pd.array([pd.NA] * len(table), dtype="Int64")
    return table


def _write_quarantine(path: Path, table: pd.DataFrame) -> None:
    if table.empty:
        path.unlink(missing_ok=True)
        return
    arrow = pa.Table.from_pandas(table[list(QUARANTINE_SCHEMA.names)], preserve_index=False)
    replace_atomically(path, lambda tmp: pq.write_table(arrow.cast(QUARANTINE_SCHEMA), tmp))


def _finish(
    con: duckdb.DuckDBPyConnection,
    out: Path,
    info: DatasetInfo,
    quarantine: pd.DataFrame,
    examples: list[str],
) -> ValidationReport:
    events = str(out / EVENTS_FILE)
    n_events, n_users, n_items, ts_min, ts_max = con.execute(
        "SELECT count(*), count(DISTINCT user_id), count(DISTINCT item_id), min(ts), max(ts) "
        "FROM read_parquet(?)",
        [events],
    ).fetchone() or (0, 0, 0, None, None)
    info.n_events = int(n_events)
    info.n_users = _count_rows(out / USERS_FILE)
    info.n_items = _count_rows(out / ITEMS_FILE)
    info.ts_min = _iso(ts_min)
    info.ts_max = _iso(ts_max)
    reasons = _reason_counts(quarantine)
    info.quarantined = reasons
    info.extra = {**info.extra, "n_active_users": int(n_users), "n_active_items": int(n_items)}
    info.content_hash = content_hash(out)
    write_info(out, info)
    return ValidationReport(
        out=out,
        n_kept=info.n_events,
        n_quarantined=int(sum(reasons.values())),
        reasons=reasons,
        info=info,
        examples=examples,
    )


def _reason_counts(quarantine: pd.DataFrame) -> dict[str, int]:
    if quarantine.empty:
        return {}
    keys = quarantine["file"].astype(str) + ":" + quarantine["reason"].astype(str)
    return {str(k): int(v) for k, v in keys.value_counts().sort_index().items()}


def _count_rows(path: Path) -> int:
    return int(pq.read_metadata(path).num_rows) if path.is_file() else 0


def _iso(value: Any) -> str | None:
    return None if value is None else pd.Timestamp(value).isoformat()
