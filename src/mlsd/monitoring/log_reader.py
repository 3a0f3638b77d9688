"""Reading the service log (:mod:`mlsd.monitoring.logs`'s layout) through DuckDB.

Every reader is a DuckDB view over a table's part files with Hive partition pruning on
``date`` (:func:`create_view`): :func:`read_table` returns one table (an empty, correctly typed
one when nothing was logged), :func:`summarize` computes the service and click-through figures
in SQL, so it stays a matter of seconds at 10M exposures, and the monitor
(:mod:`mlsd.monitoring.monitor`) and the A/B report (:mod:`mlsd.evaluation.experiment_log`) run
their own SQL on the same views.

Click attribution: a ``feedback`` row with event ``"click"`` counts for the exposure with the
same ``(request_id, item_id)``; a click without a request id (``""``) counts for the latest
exposure of the same ``(user_id, item_id)`` at most ``attribution_window_s`` before it. An
exposure is clicked or not: two clicks on it count once, so CTR = clicked / exposures.
:func:`create_log_views` defines it once, as the view :data:`ATTRIBUTED` of the window's
exposures with a ``clicked`` flag, which the summary, the monitor and the A/B report aggregate.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from mlsd.monitoring.logs import ANONYMOUS_USER, EXPOSURES, FEEDBACK, REQUESTS, SCHEMAS, TABLES

DEFAULT_ATTRIBUTION_WINDOW_S = 1800.0
ATTRIBUTED = "attributed_exposures"
"""The view of :func:`create_log_views`: every exposure row with ``clicked`` (BOOLEAN)."""


def read_table(
    log_dir: str | os.PathLike[str],
    table: str,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    columns: Sequence[str] | None = None,
) -> pa.Table:
    """The rows of one table with ``start <= ts < end`` (naive datetimes mean UTC), unordered.

    Nothing logged yet gives an empty table with the contract schema. Columns keep the
    contract types; ``candidates`` adds its feature columns.
    """
    if table not in SCHEMAS:
        raise ValueError(f"unknown service log table {table!r}: expected one of {TABLES}")
    with connect() as con:
        create_view(con, Path(log_dir), table, start, end)
        available = [row[0] for row in con.sql(f"DESCRIBE {table}").fetchall()]
        wanted = list(columns) if columns is not None else available
        missing = [name for name in wanted if name not in available]
        if missing:
            raise ValueError(
                f"service log table {table!r} under {log_dir} has no column(s) {missing}; "
                f"it has {available}"
            )
        data = con.sql(
            f"SELECT {', '.join(_quote(n) for n in wanted)} FROM {table}"
        ).to_arrow_table()
    known = SCHEMAS[table]
    return data.cast(
        pa.schema([known.field(f.name) if f.name in known.names else f for f in data.schema])
    )


def connect(*, threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection in UTC (``threads``: DuckDB's default when None)."""
    config: dict[str, str | bool | int | float | list[str]] = {}
    if threads is not None:
        config["threads"] = threads
    con = duckdb.connect(config=config)
    con.execute("SET TimeZone = 'UTC'")  # timestamps come back as timestamp[us, tz=UTC]
    con.execute("SET enable_progress_bar = false")  # it would garble `mlsd feed logs --json`
    return con


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _utc(ts: datetime) -> datetime:
    return ts.astimezone(UTC) if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def create_view(
    con: duckdb.DuckDBPyConnection,
    log_dir: Path,
    table: str,
    start: datetime | None,
    end: datetime | None,
    *,
    name: str | None = None,
) -> bool:
    """A temporary view named ``name`` (default ``table``) over the table's part files with
    ``start <= ts < end`` (naive datetimes mean UTC), pruned by date partition; with no part
    file, an empty view of the table's schema. Returns whether part files exist."""
    root = Path(log_dir) / table
    name = table if name is None else name
    if not any(root.glob("date=*/*.parquet")):
        con.register(f"_empty_{table}", SCHEMAS[table].empty_table())
        con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT * FROM _empty_{table}")
        return False
    where = ["TRUE"]
    if start is not None:
        first = _utc(start)
        where += [f"date >= DATE '{first:%Y-%m-%d}'", f"ts >= TIMESTAMPTZ '{first.isoformat()}'"]
    if end is not None:
        last = _utc(end)
        where += [f"date <= DATE '{last:%Y-%m-%d}'", f"ts < TIMESTAMPTZ '{last.isoformat()}'"]
    pattern = str(root / "date=*" / "*.parquet").replace("'", "''")
    con.execute(
        f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT * EXCLUDE (date) FROM read_parquet("
        f"'{pattern}', hive_partitioning = true, union_by_name = true) WHERE {' AND '.join(where)}"
    )
    return True


LATE_EXPOSURES = "_exposures_to_late_clicks"
"""The view of the exposures up to the attribution window after the window's end: a click
without request id read after ``end`` belongs to the latest exposure before it, which may be
after ``end`` too (then it counts in the next window, not in this one)."""

# Clicked exposures: by (request_id, item_id), else the latest exposure of (user_id, item_id)
# at most the window before a click without request id (an ASOF join, over only the exposures
# of clicked (user, item) pairs: sorting all of them made it 5x slower at 10M rows), looked for
# among {pairs_from}, the exposures up to the clicks' own end. The keys are distinct, so the
# LEFT JOIN keeps exactly the window's exposure rows (a duplicated row is clicked twice, like it
# is shown twice). A click with a null request id, user or event matches nothing.
_ATTRIBUTED_SQL = f"""
WITH clicks AS (SELECT request_id, user_id, item_id, ts FROM feedback WHERE event = 'click'),
direct AS (SELECT request_id, item_id FROM clicks WHERE request_id <> ''),
unnamed AS (SELECT * FROM clicks WHERE request_id = '' AND user_id <> {ANONYMOUS_USER}),
pair_exposures AS (
    SELECT request_id, user_id, item_id, ts
    FROM {{pairs_from}} SEMI JOIN unnamed USING (user_id, item_id)
),
windowed AS (
    SELECT e.request_id, e.item_id
    FROM unnamed c
    ASOF JOIN pair_exposures e
        ON c.user_id = e.user_id AND c.item_id = e.item_id AND c.ts >= e.ts
    WHERE epoch_us(c.ts) - epoch_us(e.ts) <= {{window_us}}
),
clicked_keys AS (SELECT * FROM direct UNION SELECT * FROM windowed)
SELECT e.*, k.item_id IS NOT NULL AS clicked
FROM exposures e LEFT JOIN clicked_keys k USING (request_id, item_id)
"""


def attributed_exposures_sql(
    attribution_window_s: float = DEFAULT_ATTRIBUTION_WINDOW_S, *, pairs_from: str = EXPOSURES
) -> str:
    """SQL of every row of the ``exposures`` view with ``clicked`` (see the module docstring),
    over the ``exposures`` and ``feedback`` views of the connection it runs on (their windows
    are the caller's: :func:`create_log_views`), a click without request id going to the
    latest exposure of ``pairs_from`` before it. The window is rounded to microseconds."""
    window_us = round(attribution_window_s * 1_000_000)
    return _ATTRIBUTED_SQL.format(window_us=window_us, pairs_from=pairs_from)


def create_log_views(
    con: duckdb.DuckDBPyConnection,
    log_dir: str | os.PathLike[str],
    start: datetime | None,
    end: datetime | None,
    *,
    attribution_window_s: float = DEFAULT_ATTRIBUTION_WINDOW_S,
    tables: Sequence[str] = (REQUESTS, EXPOSURES, FEEDBACK),
) -> dict[str, bool]:
    """The views of ``tables`` over ``[start, end)`` (:func:`create_view`), ``feedback``'s up to
    ``attribution_window_s`` after ``end`` (a click comes after its exposure), and, with
    ``exposures`` and ``feedback`` among them, the view :data:`ATTRIBUTED` of the window's
    exposures with their ``clicked`` flag. Returns whether each table has part files."""
    root = Path(log_dir)
    late = None if end is None else _utc(end) + timedelta(seconds=attribution_window_s)
    present = {
        table: create_view(con, root, table, start, late if table == FEEDBACK else end)
        for table in tables
    }
    if EXPOSURES in present and FEEDBACK in present:
        pairs_from = EXPOSURES
        if late is not None:
            create_view(con, root, EXPOSURES, start, late, name=LATE_EXPOSURES)
            pairs_from = LATE_EXPOSURES
        sql = attributed_exposures_sql(attribution_window_s, pairs_from=pairs_from)
        con.execute(f"CREATE OR REPLACE TEMP VIEW {ATTRIBUTED} AS {sql}")
    return present


@dataclass(frozen=True)
class CtrStats:
    """Exposures and clicked exposures of one group."""

    exposures: int
    clicks: int

    @property
    def ctr(self) -> float | None:
        return self.clicks / self.exposures if self.exposures else None


@dataclass(frozen=True)
class LogSummary:
    """What the service did over a window of its log; rates are None when nothing was seen."""

    start: datetime | None
    end: datetime | None
    requests: int
    first_request: datetime | None
    last_request: datetime | None
    error_rate: float | None
    """Share of requests with status >= 500."""
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    path_share: Mapping[str, float]
    fallback_rate: float | None
    """Share of requests that used any fallback."""
    users: int
    """Distinct known users (anonymous visitors excluded) in requests and exposures."""
    exposures: int
    clicks: int
    """Clicked exposures (see the module docstring for the attribution)."""
    ctr_by_arm: Mapping[tuple[str, str], CtrStats]
    """(experiment, arm) → CTR; ("", "") is traffic outside any experiment."""
    ctr_by_model: Mapping[str, CtrStats]
    events: Mapping[str, int]
    """Feedback rows per event type."""
    attribution_window_s: float = DEFAULT_ATTRIBUTION_WINDOW_S

    @property
    def ctr(self) -> float | None:
        return self.clicks / self.exposures if self.exposures else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: datetimes as ISO 8601 strings, the CTR groups as lists of records."""

        def iso(ts: datetime | None) -> str | None:
            return None if ts is None else ts.isoformat()

        def group(stats: CtrStats) -> dict[str, Any]:
            return {"exposures": stats.exposures, "clicks": stats.clicks, "ctr": stats.ctr}

        return {
            "start": iso(self.start),
            "end": iso(self.end),
            "requests": self.requests,
            "first_request": iso(self.first_request),
            "last_request": iso(self.last_request),
            "error_rate": self.error_rate,
            "latency_p50_ms": self.latency_p50_ms,
            "latency_p95_ms": self.latency_p95_ms,
            "latency_p99_ms": self.latency_p99_ms,
            "path_share": dict(self.path_share),
            "fallback_rate": self.fallback_rate,
            "users": self.users,
            "exposures": self.exposures,
            "clicks": self.clicks,
            "ctr": self.ctr,
            "ctr_by_arm": [
                {"experiment": experiment, "arm": arm, **group(stats)}
                for (experiment, arm), stats in self.ctr_by_arm.items()
            ],
            "ctr_by_model": [
                {"model_version": version, **group(stats)}
                for version, stats in self.ctr_by_model.items()
            ],
            "events": dict(self.events),
            "attribution_window_s": self.attribution_window_s,
        }


_REQUESTS_SQL = """
SELECT count(*),
       avg(CASE WHEN status >= 500 THEN 1.0 ELSE 0.0 END),
       quantile_cont(latency_ms::DOUBLE, [0.5, 0.95, 0.99]),
       avg(CASE WHEN fallbacks <> '' OR starts_with(path, 'fallback:') THEN 1.0 ELSE 0.0 END),
       min(ts), max(ts)
FROM requests
"""
_USERS_SQL = f"""
SELECT count(DISTINCT user_id) FROM (
    SELECT user_id FROM requests UNION ALL SELECT user_id FROM exposures
) WHERE user_id <> {ANONYMOUS_USER}
"""
# One pass of GROUPING SETS over the attributed exposures: overall, per arm, per model.
_CTR_SQL = f"""
SELECT GROUPING(experiment, arm, model_version) AS level, experiment, arm, model_version,
       count(*) AS exposures, count(*) FILTER (clicked) AS clicks
FROM {ATTRIBUTED}
GROUP BY GROUPING SETS ((), (experiment, arm), (model_version))
ORDER BY level, experiment, arm, model_version
"""


def summarize(
    log_dir: str | os.PathLike[str],
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    attribution_window_s: float = DEFAULT_ATTRIBUTION_WINDOW_S,
) -> LogSummary:
    """Service and click-through figures of the requests and exposures in [start, end).

    Clicks are looked for up to ``attribution_window_s`` after ``end``. All in DuckDB SQL.
    """
    with connect() as con:
        create_log_views(con, log_dir, start, end, attribution_window_s=attribution_window_s)
        [row] = con.execute(_REQUESTS_SQL).fetchall()  # an aggregate has exactly one row
        n_requests, error_rate, latencies, fallback_rate, first, last = row
        paths = con.sql(
            "SELECT path, count(*) FROM requests GROUP BY path ORDER BY 2 DESC"
        ).fetchall()
        [(n_users,)] = con.execute(_USERS_SQL).fetchall()
        events = con.sql("SELECT event, count(*) FROM feedback GROUP BY event ORDER BY 2 DESC")
        event_counts = {str(event): int(count) for event, count in events.fetchall()}
        groups = con.execute(_CTR_SQL).fetchall()
    overall = CtrStats(0, 0)
    by_arm: dict[tuple[str, str], CtrStats] = {}
    by_model: dict[str, CtrStats] = {}
    for level, experiment, arm, version, n_exposures, n_clicks in groups:
        stats = CtrStats(int(n_exposures), int(n_clicks))
        if level == 0b111:
            overall = stats
        elif level == 0b001:
            by_arm[(experiment, arm)] = stats
        else:
            by_model[version] = stats
    p50, p95, p99 = latencies if latencies is not None else (None, None, None)
    return LogSummary(
        start=None if start is None else _utc(start),
        end=None if end is None else _utc(end),
        requests=int(n_requests),
        first_request=first,
        last_request=last,
        error_rate=error_rate,
        latency_p50_ms=p50,
        latency_p95_ms=p95,
        latency_p99_ms=p99,
        path_share={str(path): count / n_requests for path, count in paths},
        fallback_rate=fallback_rate,
        users=int(n_users),
        exposures=overall.exposures,
        clicks=overall.clicks,
        ctr_by_arm=by_arm,
        ctr_by_model=by_model,
        events=event_counts,
        attribution_window_s=attribution_window_s,
    )
