"""The service log: what the feed service served and what users did, as date-partitioned Parquet.

Four append-only tables (:data:`SCHEMAS` holds their fixed columns)::

    <log_dir>/<table>/date=YYYY-MM-DD/part-<pid>-<uuid>.parquet

``requests`` (one row per request), ``exposures`` (one row per item shown), ``candidates``
(every scored candidate of a sampled request, with the ranker's inputs as ``f_<name>`` float32
and ``c_<name>`` int32 columns) and ``feedback`` (clicks, views, ratings). Timestamps are
``timestamp[us, tz=UTC]``; strings are ``""`` when not applicable, never null.

Writing (:class:`ServiceLog`) sits in the request path of a service that targets a p99 of
10 ms, so a ``log_*`` call only appends one tuple to an in-memory buffer under a lock (a few
microseconds). A daemon thread turns a buffer into Arrow and writes one part file per date
when it holds ``flush_rows`` rows or ``flush_interval_s`` has passed: every flush is a new
file (that is the rotation), written to a dot-named ``.tmp`` file and ``os.replace``\\ d into
place, so a reader never sees a partial file and several processes can share one ``log_dir``
(part names carry the pid and a UUID); create the log in each worker after a fork. A failed
write (disk full, permissions) or a value that does not fit its column is logged and its rows
counted in :attr:`ServiceLog.dropped_rows`; it never raises into the request path::

    with ServiceLog("logs/feed", retention_days=30) as log:
        log.log_request(rid, time.time(), user_id, "ranker:7", path="online",
                        latency_ms=4.2, status=200, k=20)
        log.log_exposures(rid, ts, user_id, "ranker:7", item_ids, scores, path="online")

Reading: :mod:`mlsd.monitoring.log_reader` (DuckDB over the same layout).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import shutil
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Self

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

REQUESTS = "requests"
EXPOSURES = "exposures"
CANDIDATES = "candidates"
FEEDBACK = "feedback"
TABLES = (REQUESTS, EXPOSURES, CANDIDATES, FEEDBACK)

NUMERIC_PREFIX = "f_"
"""Candidates column prefix of a numeric ranker feature (float32)."""
CATEGORICAL_PREFIX = "c_"
"""Candidates column prefix of a categorical ranker feature (int32 code)."""
ANONYMOUS_USER = -1

_TS = pa.timestamp("us", tz="UTC")
SCHEMAS: dict[str, pa.Schema] = {
    REQUESTS: pa.schema(
        [
            ("request_id", pa.string()),
            ("ts", _TS),
            ("user_id", pa.int64()),
            ("model_version", pa.string()),
            ("experiment", pa.string()),
            ("arm", pa.string()),
            ("path", pa.string()),
            ("fallbacks", pa.string()),
            ("latency_ms", pa.float32()),
            ("status", pa.int16()),
            ("k", pa.int16()),
        ]
    ),
    EXPOSURES: pa.schema(
        [
            ("request_id", pa.string()),
            ("ts", _TS),
            ("user_id", pa.int64()),
            ("item_id", pa.int64()),
            ("position", pa.int16()),
            ("score", pa.float32()),
            ("model_version", pa.string()),
            ("experiment", pa.string()),
            ("arm", pa.string()),
            ("path", pa.string()),
            ("source", pa.string()),
        ]
    ),
    CANDIDATES: pa.schema(
        [
            ("request_id", pa.string()),
            ("ts", _TS),
            ("user_id", pa.int64()),
            ("item_id", pa.int64()),
            ("model_version", pa.string()),
            ("score", pa.float32()),
        ]
    ),
    FEEDBACK: pa.schema(
        [
            ("ts", _TS),
            ("user_id", pa.int64()),
            ("item_id", pa.int64()),
            ("event", pa.string()),
            ("value", pa.float64()),
            ("request_id", pa.string()),
        ]
    ),
}
"""The fixed columns of each table, in file order (candidates add their feature columns)."""

# Columns with one value per log call; the other columns hold one value per item.
_PER_CALL: dict[str, tuple[str, ...]] = {
    REQUESTS: tuple(SCHEMAS[REQUESTS].names),
    EXPOSURES: ("request_id", "ts", "user_id", "model_version", "experiment", "arm", "path"),
    CANDIDATES: ("request_id", "ts", "user_id", "model_version"),
    FEEDBACK: tuple(SCHEMAS[FEEDBACK].names),
}
_DAY_US = 86_400_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_POSITIONS = np.arange(4096, dtype=np.int16)
_POSITIONS.flags.writeable = False
_WARN_EVERY_S = 10.0


class Throttle:
    """Lets at most one event through every ``every_s`` seconds, so a burst of drops or of
    failures cannot flood the service's own log; counts the ones it holds back.

    Not thread-safe: call it under the caller's lock (or from one thread)."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._last = -math.inf
        self._held = 0

    def ready(self) -> int | None:
        """``None``: hold this event back; else let it through, with the number held back since
        the last one that was."""
        now = time.monotonic()
        if now - self._last < self.every_s:
            self._held += 1
            return None
        held, self._held, self._last = self._held, 0, now
        return held


_RETENTION_EVERY_S = 600.0

Timestamp = float | datetime
"""UNIX seconds (``time.time()``) or a datetime (naive means UTC)."""
ItemColumn = npt.NDArray[Any] | str | list[str]
_Chunk = tuple[tuple[Any, ...], int, dict[str, ItemColumn]]
_NO_ITEMS: dict[str, ItemColumn] = {}

logger = logging.getLogger(__name__)


def to_micros(ts: Timestamp) -> int:
    """Microseconds since the UNIX epoch of UNIX seconds or a datetime (naive means UTC)."""
    if isinstance(ts, datetime):
        aware = ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)
        return (aware - _EPOCH) // timedelta(microseconds=1)
    return round(ts * 1_000_000)


def check_log_options(
    *,
    flush_rows: int = 5_000,
    flush_interval_s: float = 2.0,
    retention_days: int | None = None,
    max_buffered_rows: int = 1_000_000,
) -> dict[str, Any]:
    """:class:`ServiceLog`'s options with their defaults; ValueError names an invalid one."""
    if flush_rows < 1 or flush_interval_s <= 0 or max_buffered_rows < flush_rows:
        raise ValueError(
            "ServiceLog needs flush_rows >= 1, flush_interval_s > 0 and max_buffered_rows >= "
            f"flush_rows, got {flush_rows}, {flush_interval_s} and {max_buffered_rows}"
        )
    if retention_days is not None and retention_days < 0:
        raise ValueError(f"retention_days must be >= 0 or None, got {retention_days}")
    return {
        "flush_rows": flush_rows,
        "flush_interval_s": flush_interval_s,
        "retention_days": retention_days,
        "max_buffered_rows": max_buffered_rows,
    }


class _Buffer:
    __slots__ = ("chunks", "rows")

    def __init__(self) -> None:
        self.chunks: list[_Chunk] = []
        self.rows = 0


class LogWriter(ABC):
    """The writing side of the service log: the ``log_*`` calls of the request path.

    Each call checks and packs its arguments into one chunk (the per-call values and the
    per-item columns) and hands it to :meth:`_append`; :class:`ServiceLog` buffers chunks and
    writes them from a thread of this process, :class:`mlsd.monitoring.log_process.
    ProcessServiceLog` sends them to a writer process.
    """

    log_dir: Path

    @property
    @abstractmethod
    def written_rows(self) -> int:
        """Rows written to part files so far."""

    @property
    @abstractmethod
    def dropped_rows(self) -> int:
        """Rows lost to a failed write, a full buffer or a call after :meth:`close`."""

    @property
    @abstractmethod
    def write_errors(self) -> int:
        """Failed part-file writes so far."""

    @abstractmethod
    def _append(
        self, table: str, row: tuple[Any, ...], n: int, items: dict[str, ItemColumn]
    ) -> None:
        """Take one chunk: ``row`` the per-call values, ``n`` rows, ``items`` their columns."""

    @abstractmethod
    def flush(self) -> None:
        """Write every row logged so far now; never raises."""

    @abstractmethod
    def close(self) -> None:
        """Write what is left and stop; later calls do nothing, later rows are dropped."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the hot path -------------------------------------------------------------------------

    def log_request(
        self,
        request_id: str,
        ts: Timestamp,
        user_id: int | None,
        model_version: str,
        *,
        path: str,
        latency_ms: float,
        status: int,
        k: int,
        experiment: str = "",
        arm: str = "",
        fallbacks: Sequence[str] | str = "",
    ) -> None:
        """One ``requests`` row; ``user_id`` None is an anonymous visitor (-1)."""
        joined = fallbacks if isinstance(fallbacks, str) else ",".join(fallbacks)
        uid = ANONYMOUS_USER if user_id is None else user_id
        row = (request_id, to_micros(ts), uid, model_version, experiment, arm, path, joined,
               latency_ms, status, k)  # fmt: skip
        self._append(REQUESTS, row, 1, _NO_ITEMS)

    def log_exposures(
        self,
        request_id: str,
        ts: Timestamp,
        user_id: int | None,
        model_version: str,
        item_ids: npt.ArrayLike,
        scores: npt.ArrayLike,
        *,
        positions: npt.ArrayLike | None = None,
        sources: Sequence[str] | str = "",
        experiment: str = "",
        arm: str = "",
        path: str = "online",
    ) -> None:
        """One ``exposures`` row per item shown, in display order (``positions`` default 0..n-1).

        ``sources`` names the retrieval source of each item, or one string for all of them.
        Raises ValueError when the per-item arguments differ in length (a caller bug).
        """
        items = np.array(item_ids, dtype=np.int64)
        n = len(items)
        columns: dict[str, ItemColumn] = {
            "item_id": items,
            "score": np.array(scores, dtype=np.float32),
            "position": _POSITIONS[:n] if positions is None else np.array(positions, np.int16),
            "source": sources if isinstance(sources, str) else list(sources),
        }
        _check_lengths(EXPOSURES, n, columns)
        uid = ANONYMOUS_USER if user_id is None else user_id
        row = (request_id, to_micros(ts), uid, model_version, experiment, arm, path)
        self._append(EXPOSURES, row, n, columns)

    def log_candidates(
        self,
        request_id: str,
        ts: Timestamp,
        user_id: int | None,
        model_version: str,
        item_ids: npt.ArrayLike,
        scores: npt.ArrayLike,
        numeric: Mapping[str, npt.ArrayLike],
        categorical: Mapping[str, npt.ArrayLike],
    ) -> None:
        """Every scored candidate of a (sampled) request with the ranker's input features.

        Args:
            item_ids, scores: (n_candidates,) ids and predictions.
            numeric: feature name → (n_candidates,) values, stored as ``f_<name>`` float32.
            categorical: feature name → (n_candidates,) codes, stored as ``c_<name>`` int32.
        """
        items = np.array(item_ids, dtype=np.int64)
        columns: dict[str, ItemColumn] = {
            "item_id": items,
            "score": np.array(scores, dtype=np.float32),
        }
        for name, values in numeric.items():
            columns[NUMERIC_PREFIX + name] = np.array(values, dtype=np.float32)
        for name, values in categorical.items():
            columns[CATEGORICAL_PREFIX + name] = np.array(values, dtype=np.int32)
        _check_lengths(CANDIDATES, len(items), columns)
        uid = ANONYMOUS_USER if user_id is None else user_id
        self._append(
            CANDIDATES, (request_id, to_micros(ts), uid, model_version), len(items), columns
        )

    def log_feedback(
        self,
        ts: Timestamp,
        user_id: int | None,
        item_id: int,
        event: str,
        *,
        value: float = 1.0,
        request_id: str = "",
    ) -> None:
        """One ``feedback`` row (a click, view, rating...); ``request_id`` "" when unknown."""
        uid = ANONYMOUS_USER if user_id is None else user_id
        self._append(
            FEEDBACK, (to_micros(ts), uid, item_id, event, value, request_id), 1, _NO_ITEMS
        )


class ServiceLog(LogWriter):
    """Thread-safe, append-only writer of the four service log tables under ``log_dir``.

    Args:
        log_dir: Root directory; created on the first write.
        flush_rows: A table's buffer is written once it holds this many rows.
        flush_interval_s: Every buffer is written at least this often (seconds).
        retention_days: Delete date partitions older than this many days (None keeps all).
        max_buffered_rows: Rows a table may hold while a write is slow or failing; further
            rows are dropped (and counted) rather than exhausting memory.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        *,
        flush_rows: int = 5_000,
        flush_interval_s: float = 2.0,
        retention_days: int | None = None,
        max_buffered_rows: int = 1_000_000,
    ) -> None:
        check_log_options(
            flush_rows=flush_rows,
            flush_interval_s=flush_interval_s,
            retention_days=retention_days,
            max_buffered_rows=max_buffered_rows,
        )
        self.log_dir = Path(log_dir)
        self.flush_rows = flush_rows
        self.flush_interval_s = flush_interval_s
        self.retention_days = retention_days
        self.max_buffered_rows = max_buffered_rows
        self._dropped = 0
        self._written = 0
        self._errors = 0
        self._buffers = {name: _Buffer() for name in TABLES}
        self._drop_warnings = Throttle(_WARN_EVERY_S)
        self._lock = threading.Lock()  # guards the buffers and the counters
        self._write_lock = threading.Lock()  # one writer at a time: flush() waits for it
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="mlsd-service-log", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    @property
    def written_rows(self) -> int:
        return self._written

    @property
    def dropped_rows(self) -> int:
        return self._dropped

    @property
    def write_errors(self) -> int:
        return self._errors

    def _append(
        self, table: str, row: tuple[Any, ...], n: int, items: dict[str, ItemColumn]
    ) -> None:
        with self._lock:
            buffer = self._buffers[table]
            if self._closed or buffer.rows >= self.max_buffered_rows:
                self._drop(table, n)
                return
            buffer.chunks.append((row, n, items))
            buffer.rows += n
            full = buffer.rows >= self.flush_rows
        if full:
            self._wake.set()

    def _drop(self, table: str, n: int) -> None:
        # Called under the lock; warns at most every _WARN_EVERY_S so a burst cannot flood logs.
        self._dropped += n
        if self._drop_warnings.ready() is not None:
            why = "the log is closed" if self._closed else "its buffer is full"
            logger.warning(
                "service log: dropping %s rows under %s: %s (%d dropped so far)",
                table, self.log_dir, why, self._dropped,
            )  # fmt: skip

    # -- flushing -------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write every buffered row now (waits for a write in progress); never raises."""
        self._write(only_full=False)

    def close(self) -> None:
        """Stop the writer thread and write what is left; later calls do nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._wake.set()
        self._thread.join()
        self._write(only_full=False)
        atexit.unregister(self.close)

    def _run(self) -> None:
        next_flush = time.monotonic() + self.flush_interval_s
        next_retention = time.monotonic()
        while not self._stop.is_set():
            self._wake.wait(timeout=max(0.0, next_flush - time.monotonic()))
            self._wake.clear()
            if self._stop.is_set():
                return
            now = time.monotonic()
            due = now >= next_flush
            self._write(only_full=not due)
            if due:
                next_flush = time.monotonic() + self.flush_interval_s
            if self.retention_days is not None and now >= next_retention:
                next_retention = now + _RETENTION_EVERY_S
                try:
                    apply_retention(self.log_dir, self.retention_days)
                except Exception:
                    logger.exception("service log: retention under %s failed", self.log_dir)

    def _write(self, *, only_full: bool) -> None:
        with self._write_lock:
            taken: dict[str, _Buffer] = {}
            with self._lock:
                for name, buffer in self._buffers.items():
                    if buffer.rows and (not only_full or buffer.rows >= self.flush_rows):
                        taken[name] = buffer
                        self._buffers[name] = _Buffer()
            for name, buffer in taken.items():
                self._write_table(name, buffer.chunks)

    def _write_table(self, table: str, chunks: list[_Chunk]) -> None:
        try:
            parts = _partitions(table, chunks)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            # A value that does not fit the schema (say k = 40000 in int16) costs only its call.
            good = [chunk for chunk in chunks if _converts(table, chunk)]
            self._count_failure(table, sum(c[1] for c in chunks) - sum(c[1] for c in good),
                                "a value does not fit the schema")  # fmt: skip
            parts = _partitions(table, good) if good else []
        for part in parts:
            try:
                write_part(self.log_dir, table, part)
            except Exception as exc:  # disk full, permissions...
                self._count_failure(table, part.num_rows, f"{type(exc).__name__}: {exc}")
            else:
                with self._lock:
                    self._written += part.num_rows

    def _count_failure(self, table: str, n_rows: int, why: str) -> None:
        with self._lock:
            self._errors += 1
            self._dropped += n_rows
        logger.error(
            "service log: could not write %d %s rows under %s (%s); dropped",
            n_rows, table, self.log_dir, why,
        )  # fmt: skip


def _converts(table: str, chunk: _Chunk) -> bool:
    try:
        _to_arrow(table, [chunk])
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return False
    return True


def _check_lengths(table: str, n: int, columns: Mapping[str, ItemColumn]) -> None:
    for name, values in columns.items():
        if not isinstance(values, str) and len(values) != n:
            raise ValueError(f"{table}: {name} has {len(values)} values for {n} items")


def _partitions(table: str, chunks: list[_Chunk]) -> list[pa.Table]:
    """The buffered calls of one table as Arrow tables, one per UTC date of their rows' ``ts``
    (a call of no rows, e.g. an empty answer's exposures, writes nothing)."""
    data = _to_arrow(table, chunks)
    ts_index = _PER_CALL[table].index("ts")
    days = np.array([chunk[0][ts_index] for chunk in chunks], dtype=np.int64) // _DAY_US
    row_days = np.repeat(days, [chunk[1] for chunk in chunks])
    dates = np.unique(row_days)
    if len(dates) <= 1:
        return [data] if len(dates) else []
    return [data.filter(pa.array(row_days == day)) for day in dates]


def _to_arrow(table: str, chunks: list[_Chunk]) -> pa.Table:
    schema = SCHEMAS[table]
    counts = np.array([chunk[1] for chunk in chunks], dtype=np.int64)
    # each call's own values on each of its rows (a call may have 0 rows, or several)
    repeat = None if np.all(counts == 1) else pa.array(np.repeat(np.arange(len(chunks)), counts))
    columns: dict[str, pa.Array] = {}
    for j, name in enumerate(_PER_CALL[table]):
        values = pa.array([chunk[0][j] for chunk in chunks], type=schema.field(name).type)
        columns[name] = values if repeat is None else values.take(repeat)
    names = [name for name in schema.names if name not in columns]
    seen = dict.fromkeys(name for chunk in chunks for name in chunk[2])  # first-seen order
    names += [name for name in seen if name not in names]
    fields = [
        schema.field(name) if name in schema.names else _feature_field(name) for name in names
    ]
    for item_field in fields:
        columns[item_field.name] = _item_column(item_field, chunks)
    out_fields = [schema.field(name) for name in schema.names] + [
        f for f in fields if f.name not in schema.names
    ]
    out_schema = pa.schema(out_fields)
    return pa.Table.from_arrays([columns[f.name] for f in out_schema], schema=out_schema)


def _feature_field(name: str) -> pa.Field:
    if name.startswith(NUMERIC_PREFIX):
        return pa.field(name, pa.float32())
    return pa.field(name, pa.int32())


def _item_column(item_field: pa.Field, chunks: list[_Chunk]) -> pa.Array:
    """One per-item column over all calls; a call without this feature contributes nulls."""
    parts = [chunk[2].get(item_field.name) for chunk in chunks]
    if pa.types.is_string(item_field.type):
        strings: list[str] = []
        for part, chunk in zip(parts, chunks, strict=True):
            strings.extend(
                [part] * chunk[1] if isinstance(part, str) else (part or [""] * chunk[1])
            )
        return pa.array(strings, type=item_field.type)
    if all(isinstance(part, np.ndarray) for part in parts):
        return pa.array(np.concatenate(parts), type=item_field.type)  # type: ignore[arg-type]
    arrays = [
        pa.nulls(chunk[1], item_field.type) if part is None else pa.array(part, item_field.type)
        for part, chunk in zip(parts, chunks, strict=True)
    ]
    return pa.concat_arrays(arrays)


def write_part(log_dir: Path, table: str, data: pa.Table) -> Path:
    """Write rows of one UTC date atomically as a new part file; returns its path."""
    first = data.column("ts")[0].as_py()
    part_dir = log_dir / table / f"date={first:%Y-%m-%d}"
    part_dir.mkdir(parents=True, exist_ok=True)
    name = f"part-{os.getpid()}-{uuid.uuid4().hex}.parquet"
    tmp = part_dir / f".{name}.tmp"  # neither matches *.parquet nor is visible to readers
    try:
        pq.write_table(data, tmp, compression="zstd")
        os.replace(tmp, part_dir / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return part_dir / name


def apply_retention(log_dir: Path, retention_days: int, *, today: date | None = None) -> list[Path]:
    """Delete every table's date partitions older than ``retention_days`` before ``today`` (UTC).

    Returns the deleted partition directories. Safe to run from several processes at once.
    """
    oldest = (today or datetime.now(UTC).date()) - timedelta(days=retention_days)
    deleted = []
    for table in TABLES:
        for partition in sorted((Path(log_dir) / table).glob("date=*")):
            try:
                day = date.fromisoformat(partition.name.removeprefix("date="))
            except ValueError:
                continue  # not ours: leave it
            if day < oldest:
                shutil.rmtree(partition, ignore_errors=True)
                deleted.append(partition)
    return deleted
