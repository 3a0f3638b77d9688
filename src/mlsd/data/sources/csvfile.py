"""Bring-your-own interaction data: delimited text files → the dataset contract.

Every file is read with pandas as strings (nothing is mangled: ``007`` stays ``007``, ``NA`` stays
``NA``; only empty fields are missing), in file order. The named columns become the contract's
``user_id``, ``item_id``, ``ts``, ``value`` and ``event``; every other events column is kept as
a context column. Optional users/items files give attributes: their key column (``user_key`` /
``item_key``, by default the events' ``user_col`` / ``item_col``) becomes the id and every other
column an attribute.

Ids: when every id (events and users/items file together) is an integer of at most 18 digits
written the way the integer prints (``30``, ``-5``; not ``007``, ``+7`` or ``-0``), ids are kept.
Otherwise all ids of that kind get dense int64 ids 0, 1, ... in order of first appearance (events
file first, then the users/items file), and ``users``/``items`` keep the original in
``external_id``; the mapping is shared, so events and attributes still join. Parsing ``007`` and
``7`` as integers would silently merge two users; the dense mapping keeps them apart.

Files that pandas cannot read (rows with too many fields, an empty file, a file not in UTF-8) and
an events file with a header but no rows are refused with a ContractError that names the file
and, where pandas says, the line, and says what to do (``--sep``, re-encode to UTF-8): the CLI
prints it as one line, so a raw pandas message would leave the user guessing which file broke.

Each file's line numbers are kept (:func:`record_lines`), so a quarantined row names the line
of the file it came from, not only its position among the rows: blank lines and quoted fields
that span lines make the two differ.

Files without a header row (``header=False``) name their columns by position: ``"0"``, ``"1"``...
``sep`` and ``header`` apply to every file of one import.

Example, MovieLens 100K's ``u.data`` (tab-separated, no header)::

    import_csv(Path("u.data"), sep="\\t", header=False, user_col="0", item_col="1",
               value_col="2", ts_col="3", out=Path("data/ml100k-csv"))
"""

from __future__ import annotations

import csv
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd
from pandas.errors import EmptyDataError, ParserError, ParserWarning

from mlsd.data.schema import ContractError, DatasetInfo
from mlsd.data.validate import ValidationReport, write_dataset

CONTRACT_COLUMNS = ("user_id", "item_id", "ts", "event", "value")
DEFAULT_LICENCE = "unknown (bring-your-own data; check the terms of its owner)"
_CANONICAL_INTEGER_ID = r"0|-?[1-9][0-9]{0,17}"
"""An id that is kept as an integer: exactly the strings ``s`` with ``str(int(s)) == s``, 18 digits
at most (so it fits int64)."""
_SEPARATOR_NAMES = {"\t": "tab", ";": "semicolon", "|": "pipe", ",": "comma"}
_SEP_HINT = (
    "Pass the file's separator with --sep (e.g. --sep ';', or --sep '\\t' for tabs), "
    "and quote fields that contain it (and close every quote that is opened)."
)


@dataclass(frozen=True)
class CsvSpec:
    """Where a bring-your-own dataset lives and which columns mean what."""

    events: Path
    user_col: str
    item_col: str
    ts_col: str
    value_col: str | None = None
    event_col: str | None = None
    sep: str = ","
    header: bool = True
    users: Path | None = None
    items: Path | None = None
    user_key: str | None = None
    item_key: str | None = None

    def event_columns(self) -> dict[str, str]:
        """Source column → contract column, for the columns that were named."""
        roles = {
            "user_id": self.user_col,
            "item_id": self.item_col,
            "ts": self.ts_col,
            "value": self.value_col,
            "event": self.event_col,
        }
        named = {dst: src for dst, src in roles.items() if src is not None}
        if len(set(named.values())) != len(named):
            raise ContractError(f"{self.events}: one column is named for two roles: {named}.")
        return {src: dst for dst, src in named.items()}


@dataclass(frozen=True)
class CsvTables:
    """The files read and renamed to the contract, before validation."""

    events: pd.DataFrame
    users: pd.DataFrame | None
    items: pd.DataFrame | None
    input_files: dict[str, str]
    dense_ids: dict[str, bool]
    """Per id column, whether ids were mapped to dense ids."""
    input_lines: dict[str, npt.NDArray[np.int64]]
    """Per file kind, the line each row starts on (:func:`record_lines`), where known."""
    input_values: dict[str, pd.Series]
    """The events' id columns that were made dense, as the file had them."""


def read_delimited(path: Path, *, sep: str, header: bool) -> pd.DataFrame:
    """Read a delimited file as strings, in file order; columns by position when no header."""
    path = Path(path)
    if not path.is_file():
        raise ContractError(f"{path}: file not found; check the path.")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ParserWarning)
            frame = pd.read_csv(
                path,
                sep=sep,
                header=0 if header else None,
                dtype=str,
                keep_default_na=False,
                na_values=[""],
                # Rows with a field more than the header (a trailing separator, common in
                # exports) would otherwise make pandas take the first column as the index
                # and shift every other column left: user ids silently became item ids.
                index_col=False,
            )
        if any(issubclass(w.category, ParserWarning) for w in caught):
            _refuse_unnamed_fields(path, sep, len(frame.columns))
    except ParserError as exc:
        raise _parser_error(path, sep, exc) from exc
    except EmptyDataError as exc:
        raise ContractError(
            f"{path}: the file is empty (no header, no rows); check the path or export it again."
        ) from exc
    except UnicodeDecodeError as exc:
        raise _encoding_error(path) from exc
    frame.columns = [str(column) for column in frame.columns]
    return frame


def record_lines(
    path: Path, *, sep: str, header: bool, n_rows: int
) -> npt.NDArray[np.int64] | None:
    """The 1-based line of ``path`` on which each of its ``n_rows`` data rows starts, as
    :func:`read_delimited` read them; ``None`` when that cannot be told.

    pandas skips blank (and whitespace-only) lines and reads a quoted field across line breaks,
    and does not report where a row began. When the file has exactly one line per row (the
    common case, checked by counting its newlines), row ``i`` is on line ``i + 1`` (``i + 2``
    after a header). Otherwise the file is read again with the :mod:`csv` module, which splits
    records by the same rules and says where each one ends; if it does not find ``n_rows``
    rows, as pandas did, the lines are unknown rather than guessed.
    """
    first = 2 if header else 1
    n_lines, last = 0, b"\n"
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            n_lines += chunk.count(b"\n")
            last = chunk[-1:]
    n_lines += last != b"\n"
    if n_lines == n_rows + first - 1:
        return np.arange(first, first + n_rows, dtype=np.int64)
    if len(sep) != 1:  # the csv module splits on one character only
        return None
    starts: list[int] = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter=sep)
        end = 0
        try:
            for record in reader:
                start, end = end + 1, reader.line_num
                if record and (len(record) > 1 or record[0].strip()):
                    starts.append(start)
        except csv.Error:  # e.g. a field over the csv module's size limit, which pandas reads
            return None
    lines = np.asarray(starts[1:] if header else starts, dtype=np.int64)
    return lines if len(lines) == n_rows else None


def _refuse_unnamed_fields(path: Path, sep: str, n_named: int) -> None:
    """When rows have more fields than the header names: fine if every extra field is empty
    (a trailing separator: nothing is lost by dropping it), else a ContractError naming the
    first such row's line, since pandas would drop the values with only a warning."""
    full = pd.read_csv(
        path,
        sep=sep,
        header=None,
        skiprows=1,
        names=range(n_named + 64),
        dtype=str,
        keep_default_na=False,
        na_values=[""],
        index_col=False,
    )
    filled = full.iloc[:, n_named:].notna()
    rows = np.flatnonzero(filled.to_numpy().any(axis=1))
    if not len(rows):
        return
    row = int(rows[0])
    lines = record_lines(path, sep=sep, header=True, n_rows=len(full))
    where = f"line {lines[row]}" if lines is not None else f"data row {row + 1}"
    n_fields = n_named + int(np.flatnonzero(filled.iloc[row].to_numpy())[-1]) + 1
    raise ContractError(
        f"{path}, {where}: {n_fields} fields where the header names {n_named} (separator "
        f"{sep!r}; {len(rows)} such row(s)). Name every column in the header, or remove the "
        f"extra values. {_SEP_HINT}"
    )


def _parser_error(path: Path, sep: str, exc: ParserError) -> ContractError:
    """A ContractError for rows pandas could not split: the file, the line and the --sep hint."""
    detail = str(exc).strip().removeprefix("Error tokenizing data. C error: ")
    fields = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", detail)
    if fields:
        expected, line, saw = fields.groups()
        return ContractError(
            f"{path}, line {line}: {saw} fields where the first row has {expected} "
            f"(separator {sep!r}). {_SEP_HINT}"
        )
    line_match = re.search(r"\bline (\d+)", detail)  # pandas' "row N" is not a line number
    where = f"{path}, line {line_match.group(1)}" if line_match else str(path)
    return ContractError(f"{where}: cannot be read with separator {sep!r} ({detail}). {_SEP_HINT}")


def _encoding_error(path: Path) -> ContractError:
    """A ContractError for a file that is not UTF-8, naming the first line that is not."""
    where, byte = str(path), ""
    with path.open("rb") as handle:  # a newline byte never occurs inside a UTF-8 character
        for number, raw_line in enumerate(handle, start=1):
            try:
                raw_line.decode("utf-8")
            except UnicodeDecodeError as exc:
                where, byte = f"{path}, line {number}", f" (byte 0x{raw_line[exc.start]:02x})"
                break
    return ContractError(
        f"{where}: not valid UTF-8{byte}; the file is in another encoding (often Latin-1 or "
        f"Windows-1252). Re-encode it to UTF-8, e.g. "
        f"`iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}`, and import that."
    )


def _separator_hint(frame: pd.DataFrame, sep: str, header: bool) -> str:
    """When a file read as one column looks split by another separator, say which and how."""
    if len(frame.columns) != 1:
        return ""
    if header:
        first = str(frame.columns[0])
    else:
        first = frame.iloc[0, 0] if len(frame) and isinstance(frame.iloc[0, 0], str) else ""
    counts = {s: first.count(s) for s in _SEPARATOR_NAMES if s != sep and s in first}
    if not counts:
        return ""
    guess = max(counts, key=counts.__getitem__)
    flag = "'\\t'" if guess == "\t" else repr(guess)
    row = "header" if header else "first row"
    return (
        f" The {row} {first!r} was read as one column with separator {sep!r} but looks "
        f"{_SEPARATOR_NAMES[guess]}-separated: pass --sep {flag}."
    )


def require_columns(
    frame: pd.DataFrame, path: Path, columns: list[str], *, sep: str = ",", header: bool = True
) -> None:
    """Raise a ContractError naming the file, the missing columns and the ones it has.

    ``sep`` and ``header`` are how the file was read; they let the message point at a wrong
    separator when the whole header landed in one column.
    """
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ContractError(
            f"{path}: no column {', '.join(map(repr, missing))}; the file has columns "
            f"{', '.join(map(repr, frame.columns))}. Pass the right column names (files read "
            "without a header name their columns by position: '0', '1', ...)."
            + _separator_hint(frame, sep, header)
        )


def _rename(
    frame: pd.DataFrame, path: Path, columns: dict[str, str], reserved: set[str], spec: CsvSpec
) -> pd.DataFrame:
    """Rename source → contract columns; no other column may take a ``reserved`` name."""
    require_columns(frame, path, list(columns), sep=spec.sep, header=spec.header)
    clashes = [c for c in frame.columns if c in reserved and c not in columns]
    if clashes:
        raise ContractError(
            f"{path}: column(s) {', '.join(map(repr, clashes))} would clash with the contract's "
            "columns; name them as a role (e.g. value_col) or rename them in the file."
        )
    return frame.rename(columns=columns)


def _entity(path: Path | None, key: str, id_column: str, spec: CsvSpec) -> pd.DataFrame | None:
    """Read a users/items file and rename its key column to ``id_column``."""
    if path is None:
        return None
    raw = read_delimited(path, sep=spec.sep, header=spec.header)
    return _rename(raw, path, {key: id_column}, {id_column, "external_id"}, spec)


def _lines(
    path: Path | None, frame: pd.DataFrame | None, spec: CsvSpec
) -> npt.NDArray[np.int64] | None:
    if path is None or frame is None:
        return None
    return record_lines(path, sep=spec.sep, header=spec.header, n_rows=len(frame))


def dense_ids(
    event_ids: pd.Series, entity: pd.DataFrame | None, id_column: str
) -> tuple[pd.Series, pd.DataFrame | None, bool]:
    """Map ids to dense int64 ids shared by events and entity table, unless all are integers.

    Ids stay as they are only when each one is an integer written the way it prints (see
    ``_CANONICAL_INTEGER_ID``); ``007`` next to ``7`` would otherwise become one id.

    Returns:
        The events' ids, the entity table (with ``external_id`` when mapped; built from the
        mapping when there was no file, so the original ids are never lost), and whether ids
        were mapped. Missing ids stay missing, so validation quarantines them.
    """
    entity_ids = entity[id_column] if entity is not None else pd.Series([], dtype=object)
    both = pd.concat([event_ids, entity_ids], ignore_index=True)
    if both.dropna().str.fullmatch(_CANONICAL_INTEGER_ID).all():
        return event_ids, entity, False
    codes, uniques = pd.factorize(both)
    mapped = pd.Series(codes, dtype="Int64").mask(codes < 0)
    events_mapped = mapped.iloc[: len(event_ids)].reset_index(drop=True)
    if entity is None:
        table = pd.DataFrame({id_column: range(len(uniques)), "external_id": uniques})
        return events_mapped, table.astype({id_column: "int64", "external_id": "string"}), True
    entity = entity.assign(external_id=entity[id_column].astype("string"))
    entity[id_column] = mapped.iloc[len(event_ids) :].to_numpy()
    return events_mapped, entity, True


def read_csv_tables(spec: CsvSpec) -> CsvTables:
    """Read and rename the events (and optional users/items) files of one import."""
    raw = read_delimited(spec.events, sep=spec.sep, header=spec.header)
    events = _rename(raw, spec.events, spec.event_columns(), set(CONTRACT_COLUMNS), spec)
    if events.empty:
        raise ContractError(
            f"{spec.events}: a header but no data rows, so there are no events to import; "
            "check that this is the right file and that it was exported in full."
        )
    users = _entity(spec.users, spec.user_key or spec.user_col, "user_id", spec)
    items = _entity(spec.items, spec.item_key or spec.item_col, "item_id", spec)
    given = {column: events[column] for column in ("user_id", "item_id")}
    events["user_id"], users, dense_users = dense_ids(events["user_id"], users, "user_id")
    events["item_id"], items, dense_items = dense_ids(events["item_id"], items, "item_id")
    dense = {"user_id": dense_users, "item_id": dense_items}
    files = {"events": spec.events, "users": spec.users, "items": spec.items}
    frames = {"events": events, "users": users, "items": items}
    lines = {kind: _lines(path, frames[kind], spec) for kind, path in files.items()}
    return CsvTables(
        events=events,
        users=users,
        items=items,
        input_files={kind: path.name for kind, path in files.items() if path is not None},
        dense_ids=dense,
        input_lines={kind: found for kind, found in lines.items() if found is not None},
        input_values={column: given[column] for column, mapped in dense.items() if mapped},
    )


def import_csv(
    events: Path,
    *,
    user_col: str,
    item_col: str,
    ts_col: str,
    value_col: str | None = None,
    event_col: str | None = None,
    sep: str = ",",
    header: bool = True,
    ts_format: str = "unix",
    users: Path | None = None,
    items: Path | None = None,
    user_key: str | None = None,
    item_key: str | None = None,
    out: Path,
    name: str | None = None,
    licence: str = DEFAULT_LICENCE,
) -> ValidationReport:
    """Import delimited files into the contract directory ``out`` (see the module docstring).

    Args:
        events: the interactions file; ``user_col``, ``item_col``, ``ts_col`` name its columns,
            ``value_col`` (default 1.0) and ``event_col`` (default ``interaction``) optional.
        sep, header: the delimiter and whether the first row is a header (all files).
        ts_format: how ``ts`` is written: ``unix``, ``unix_ms``, ``iso`` or a strptime format.
        users, items: optional attribute files keyed by ``user_key`` / ``item_key``.
        name, licence: recorded in ``dataset.json``; ``name`` defaults to the events file stem.

    Raises:
        ContractError: a file or a named column is missing, a file cannot be read (rows with too
            many fields, empty, not UTF-8), or the events file has no data rows.
    """
    spec = CsvSpec(
        events=Path(events),
        user_col=user_col,
        item_col=item_col,
        ts_col=ts_col,
        value_col=value_col,
        event_col=event_col,
        sep=sep,
        header=header,
        users=None if users is None else Path(users),
        items=None if items is None else Path(items),
        user_key=user_key,
        item_key=item_key,
    )
    tables = read_csv_tables(spec)
    info = DatasetInfo(
        name=name or spec.events.stem,
        source=f"csv import of {spec.events}",
        licence=licence,
        extra={"dense_ids": tables.dense_ids},
    )
    return write_dataset(
        out,
        events=tables.events,
        users=tables.users,
        items=tables.items,
        info=info,
        ts_format=ts_format,
        input_files=tables.input_files,
        input_lines=tables.input_lines,
        input_values=tables.input_values,
        ts_column=ts_col if header else f"{ts_col} (by position)",
    )
