"""The dataset contract: one directory shape that every loader writes and every step reads.

A contract directory holds:

- ``events.parquet``: ``user_id`` (int64), ``item_id`` (int64), ``ts`` (timestamp[us, UTC]),
  ``event`` (string, e.g. ``rate``, ``click``, ``view``), ``value`` (float32, e.g. the rating),
  plus optional context columns (e.g. ``session_id``).
- ``users.parquet``: ``user_id`` (int64) + static attributes (strings), e.g. ``age_bucket``.
- ``items.parquet``: ``item_id`` (int64) + attributes, e.g. ``title``, ``category``,
  ``genres`` (``|``-separated), ``created_ts``.
- ``dataset.json``: :class:`DatasetInfo`.
- ``quarantine.parquet`` (only when rows were rejected): the rejected rows as strings, with
  ``file``, ``row`` (0-based position in the input), ``line`` (the 1-based line of a text input
  the row started on, when known) and ``reason``.

Every file is written to a temporary name beside it and renamed over the old one
(:func:`replace_atomically`), so a crash or a full disk mid-write leaves the previous file, never
a truncated one, and no temporary file behind.

Ids are int64 everywhere so joins and index arrays stay cheap at 100M events; a source whose ids
are not integers gets dense ids and keeps its own in an ``external_id`` column.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1

EVENTS_FILE = "events.parquet"
USERS_FILE = "users.parquet"
ITEMS_FILE = "items.parquet"
INFO_FILE = "dataset.json"
QUARANTINE_FILE = "quarantine.parquet"

TS_TYPE = pa.timestamp("us", tz="UTC")

FLOAT32_MAX = 3.4028234663852886e38
"""The largest finite float32: an event's ``value`` is float32 (in the contract and in the
online store's features), where a larger one would become infinite."""

EVENTS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("ts", TS_TYPE, nullable=False),
        pa.field("event", pa.string(), nullable=False),
        pa.field("value", pa.float32(), nullable=False),
    ]
)
"""Required columns of ``events.parquet``; extra context columns may follow."""

USERS_REQUIRED = pa.schema([pa.field("user_id", pa.int64(), nullable=False)])
ITEMS_REQUIRED = pa.schema([pa.field("item_id", pa.int64(), nullable=False)])

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("file", pa.string()),
        pa.field("row", pa.int64()),
        pa.field("reason", pa.string()),
        pa.field("line", pa.int64()),
        pa.field("data", pa.string()),
    ]
)
"""``data`` is the offending row as JSON, so nothing the user gave is lost."""


class ContractError(ValueError):
    """A file breaks the dataset contract in a way no row-level quarantine can fix."""


@dataclass
class DatasetInfo:
    """The contents of ``dataset.json``."""

    name: str
    source: str
    licence: str
    n_events: int = 0
    n_users: int = 0
    n_items: int = 0
    ts_min: str | None = None
    ts_max: str | None = None
    schema_version: int = SCHEMA_VERSION
    content_hash: str = ""
    quarantined: dict[str, int] = field(default_factory=dict)
    """Quarantined row counts per reason."""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DatasetInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


def contract_mismatches(path: Path, required: pa.Schema) -> list[str]:
    """How the Parquet file ``path`` departs from the contract's ``required`` columns, one
    phrase per column (``"column 'ts' is timestamp[ms, tz=UTC], the contract says ..."``);
    empty when it conforms. Arrow's types, not DuckDB's names for them, which do not tell a
    millisecond from a microsecond timestamp, or ``large_string`` from ``string``.

    Raises:
        pyarrow.ArrowInvalid, OSError: ``path`` is not a readable Parquet file.
    """
    schema = pq.read_schema(path)
    problems = []
    for expected in required:
        if expected.name not in schema.names:
            problems.append(f"column {expected.name!r} is missing")
        elif (found := schema.field(expected.name).type) != expected.type:
            problems.append(
                f"column {expected.name!r} is {found}, the contract says {expected.type}"
            )
    return problems


def read_info(directory: Path) -> DatasetInfo:
    """Read ``dataset.json`` of a contract directory."""
    path = Path(directory) / INFO_FILE
    if not path.is_file():
        raise ContractError(
            f"{path}: not found. Is {directory} a dataset directory? "
            "Create one with `mlsd data import ...` or `mlsd data synth ...`."
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ContractError(f"{path}: not valid JSON ({exc}); re-create the dataset.") from exc
    return DatasetInfo.from_dict(raw)


def write_info(directory: Path, info: DatasetInfo) -> Path:
    """Write ``dataset.json`` atomically (see :func:`replace_atomically`)."""
    text = info.to_json() + "\n"
    return replace_atomically(Path(directory) / INFO_FILE, lambda tmp: tmp.write_text(text))


def replace_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on ``path`` + ``.tmp``, then rename that over ``path``.

    Readers see the old file or the new one, never a half-written one. If ``write`` (or the
    rename) fails, the temporary file is removed, ``path`` is left as it was and the error
    propagates.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def content_hash(directory: Path) -> str:
    """SHA-256 over the contract's Parquet files (events, users, items), in a fixed order."""
    digest = hashlib.sha256()
    for name in (EVENTS_FILE, USERS_FILE, ITEMS_FILE):
        path = Path(directory) / name
        digest.update(name.encode())
        if path.is_file():
            with path.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return "sha256:" + digest.hexdigest()
