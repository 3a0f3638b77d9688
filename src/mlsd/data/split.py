"""Global temporal split: train ``ts < t1``, validation ``t1 <= ts < t2``, test ``ts >= t2``.

This is the evaluation protocol of DESIGN.md: every user is cut at the same instants, so nothing
the models see in train or validation happened after the events they are scored on. DuckDB
streams over ``events.parquet`` (cut points, counts, filters), so a 100M-event file never sits in
a pandas frame; each window is written with the source file's exact Arrow schema, to a temporary
file renamed into place, so a failed write leaves that file's previous version, never a truncated
one, and no ``.tmp`` file.

Cut points come from a :class:`SplitSpec` or from fractions, under one of two definitions
(:data:`CUT_DEFINITIONS`):

- ``by="events"``: quantiles of the event timestamps: test starts at the first of the last
  ``round(test_frac * n)`` events in time order, validation at the first of the last
  ``round((val_frac + test_frac) * n)``; events tied with a cut go to the later window.
  This reproduces DESIGN.md's figure: ML-100K with ``test_frac=0.2`` has 301 test users, 109 warm.
- ``by="time"``: fractions of the time span, ``t2 = ts_min + (1 - test_frac) * (ts_max - ts_min)``
  (ML-100K: 281 test users, 99 warm).

Example::

    result = split_dataset(Path("data/ml-100k"), val_frac=0.1, test_frac=0.2, by="events")
    result.stats["test"]["n_warm_users"]  # 109
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any, TypeAlias

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mlsd.data.schema import (
    EVENTS_FILE,
    EVENTS_SCHEMA,
    ITEMS_FILE,
    USERS_FILE,
    ContractError,
    DatasetInfo,
    contract_mismatches,
    read_info,
    replace_atomically,
    write_info,
)

PROTOCOL = (
    "global temporal split (UTC): train ts < t1, validation t1 <= ts < t2, test ts >= t2; "
    "features for a label at time t use only events before t"
)
SPLIT_FILE = "split.json"
WINDOWS = ("train", "val", "test")
SPLIT_FILES = {window: f"{window}.parquet" for window in WINDOWS}
_BATCH_ROWS = 1_000_000

TimestampLike: TypeAlias = str | date | datetime | pd.Timestamp


def parse_timestamp(value: TimestampLike) -> pd.Timestamp:
    """Parse an ISO string, date or datetime as a UTC timestamp (naive input is taken as UTC)."""
    try:
        ts = pd.Timestamp(value)
    except (ValueError, TypeError) as exc:
        raise ContractError(
            f"cannot read {value!r} as a timestamp; use ISO 8601 such as 2018-03-01 or "
            "2018-03-01T12:00:00Z"
        ) from exc
    if ts is pd.NaT:
        raise ContractError(f"{value!r} is not a timestamp; use ISO 8601 such as 2018-03-01")
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


@dataclass(frozen=True)
class SplitSpec:
    """The two cut points, UTC, rounded up to the microsecond (the contract's resolution).

    Rounding up keeps ``ts < t`` exact for microsecond event timestamps.
    """

    t1: pd.Timestamp
    t2: pd.Timestamp

    def __post_init__(self) -> None:
        t1 = parse_timestamp(self.t1).ceil("us")
        t2 = parse_timestamp(self.t2).ceil("us")
        if not t1 < t2:
            raise ContractError(
                f"cut points must satisfy t1 < t2 (validation is [t1, t2)); got t1={t1}, t2={t2}"
            )
        object.__setattr__(self, "t1", t1)
        object.__setattr__(self, "t2", t2)


@dataclass
class SplitResult:
    """What :func:`split_dataset` wrote.

    Attributes:
        spec: the cut points used.
        stats: per window (``train``, ``val``, ``test``): ``n_events``, ``n_users``, ``n_items``,
            ``ts_min``, ``ts_max`` (ISO); for ``val`` and ``test`` also ``n_warm_users`` (users
            with events before the window start), ``n_cold_users`` and ``n_new_items`` (items
            never seen before the window start).
        paths: ``train``, ``val``, ``test`` Parquet files and ``manifest`` (``split.json``).
        out: the output folder.
        content_hash: the split dataset's content hash (from ``dataset.json``).
        cut: how the cut points were chosen (``by`` and the fractions, or ``given``).
    """

    spec: SplitSpec
    stats: dict[str, dict[str, Any]]
    paths: dict[str, Path]
    out: Path
    content_hash: str
    cut: dict[str, Any] = field(default_factory=dict)


def _check_fracs(val_frac: float, test_frac: float) -> None:
    for name, frac in (("val_frac", val_frac), ("test_frac", test_frac)):
        if not 0.0 < frac < 1.0:
            raise ContractError(f"{name} must be in (0, 1); got {frac}")
    if val_frac + test_frac >= 1.0:
        raise ContractError(
            f"val_frac + test_frac must be < 1 so train is not empty; got {val_frac} + {test_frac}"
        )


def _spec_from_us(t1_us: int, t2_us: int, definition: str) -> SplitSpec:
    t1, t2 = (pd.Timestamp(int(t), unit="us", tz="UTC") for t in (t1_us, t2_us))
    if not t1 < t2:
        raise ContractError(
            f"cut points by {definition} coincide at {t1}, so the validation window would be "
            "empty (too few events for val_frac, or many events share that timestamp); "
            "raise val_frac or give t1 and t2"
        )
    return SplitSpec(t1, t2)


def _as_us(ts: Sequence[Any] | pd.Series | pd.DatetimeIndex | np.ndarray) -> np.ndarray:
    index = pd.DatetimeIndex(pd.to_datetime(ts, utc=True))
    if len(index) == 0 or index.hasnans:
        raise ContractError("cut points need at least one timestamp and no missing ones")
    return np.asarray(index.as_unit("us").asi8)


def _cut_positions(n: int, val_frac: float, test_frac: float) -> tuple[int, int]:
    """0-based positions, in time order, of the events that open validation and test."""
    # round() rather than floor(): n * 0.7 may be 6.999999999999999 in floating point.
    k2 = min(n - round(n * test_frac), n - 1)
    k1 = min(n - round(n * (val_frac + test_frac)), k2)
    return max(k1, 0), k2


def cut_points_by_quantile(
    ts: Sequence[Any] | pd.Series | pd.DatetimeIndex | np.ndarray,
    *,
    val_frac: float,
    test_frac: float,
) -> SplitSpec:
    """Cut points at quantiles of the event timestamps (``by="events"``).

    With ``n`` events in time order, ``t2`` is the timestamp of the first of the last
    ``round(test_frac * n)`` events and ``t1`` that of the first of the last
    ``round((val_frac + test_frac) * n)``. Events tied with a cut go to the later window.
    """
    _check_fracs(val_frac, test_frac)
    ts_us = np.sort(_as_us(ts))
    k1, k2 = _cut_positions(len(ts_us), val_frac, test_frac)
    return _spec_from_us(int(ts_us[k1]), int(ts_us[k2]), "events")


def _time_cuts(ts_min_us: int, ts_max_us: int, val_frac: float, test_frac: float) -> SplitSpec:
    span = ts_max_us - ts_min_us
    t1 = ts_min_us + round((1.0 - test_frac - val_frac) * span)
    t2 = ts_min_us + round((1.0 - test_frac) * span)
    return _spec_from_us(t1, t2, "time")


def cut_points_by_time(
    ts: Sequence[Any] | pd.Series | pd.DatetimeIndex | np.ndarray,
    *,
    val_frac: float,
    test_frac: float,
) -> SplitSpec:
    """Cut points at fractions of the time span (``by="time"``).

    ``t2 = ts_min + (1 - test_frac) * (ts_max - ts_min)`` and ``t1`` likewise with
    ``1 - test_frac - val_frac``, rounded to the microsecond.
    """
    _check_fracs(val_frac, test_frac)
    ts_us = _as_us(ts)
    return _time_cuts(int(ts_us.min()), int(ts_us.max()), val_frac, test_frac)


CUT_DEFINITIONS: dict[str, Callable[..., SplitSpec]] = {
    "events": cut_points_by_quantile,
    "time": cut_points_by_time,
}
"""In-memory cut point definitions by name; :func:`cut_points` computes the same out of core."""


def _events_path(dataset_dir: Path) -> Path:
    path = Path(dataset_dir) / EVENTS_FILE
    if not path.is_file():
        raise ContractError(
            f"{path}: not found. A split needs a dataset directory with {EVENTS_FILE}; create one "
            "with `mlsd data import ...` or `mlsd data synth ...`."
        )
    try:
        problems = contract_mismatches(path, EVENTS_SCHEMA)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ContractError(f"{path}: not a readable Parquet file ({exc}); re-import it") from exc
    if problems:
        raise ContractError(f"{path}: {'; '.join(problems)}; re-import or run `mlsd data validate`")
    return path


def _count(con: duckdb.DuckDBPyConnection, events_path: Path) -> int:
    row = con.execute("SELECT count(*) FROM read_parquet(?)", [str(events_path)]).fetchone()
    n = 0 if row is None else int(row[0])
    if n == 0:
        raise ContractError(f"{events_path}: no events to split")
    return n


def cut_points(
    events_path: Path, *, val_frac: float, test_frac: float, by: str = "events"
) -> SplitSpec:
    """Cut points of a Parquet events file, computed in DuckDB (out of core).

    ``by="events"`` holds every timestamp once in DuckDB's ``quantile_disc`` state (8 bytes per
    event, ~1 GB of memory for 100M events); ``by="time"`` only needs the min and max.
    """
    if by not in CUT_DEFINITIONS:
        raise ContractError(f"by must be one of {sorted(CUT_DEFINITIONS)}; got {by!r}")
    _check_fracs(val_frac, test_frac)
    with duckdb.connect() as con:
        n = _count(con, events_path)
        if by == "events":
            # quantile_disc(q) is the event at position ceil(n * q) - 1; (k + 0.5) / n hits k.
            q = [(k + 0.5) / n for k in _cut_positions(n, val_frac, test_frac)]
            row = con.execute(
                "SELECT quantile_disc(epoch_us(ts), ?) FROM read_parquet(?)", [q, str(events_path)]
            ).fetchone()
            assert row is not None
            return _spec_from_us(int(row[0][0]), int(row[0][1]), "events")
        row = con.execute(
            "SELECT min(epoch_us(ts)), max(epoch_us(ts)) FROM read_parquet(?)", [str(events_path)]
        ).fetchone()
    assert row is not None
    return _time_cuts(int(row[0]), int(row[1]), val_frac, test_frac)


def _resolve_spec(
    events_path: Path,
    spec: SplitSpec | None,
    val_frac: float | None,
    test_frac: float | None,
    by: str,
) -> tuple[SplitSpec, dict[str, Any]]:
    if by not in CUT_DEFINITIONS:
        raise ContractError(f"by must be one of {sorted(CUT_DEFINITIONS)}; got {by!r}")
    fracs_given = val_frac is not None or test_frac is not None
    if spec is not None and fracs_given:
        raise ContractError("give either cut points (t1, t2) or fractions, not both")
    if spec is not None:
        return spec, {"by": "given"}
    if val_frac is None or test_frac is None:
        raise ContractError(
            "give cut points (t1 and t2) or both fractions (val_frac and test_frac)"
        )
    spec = cut_points(events_path, val_frac=val_frac, test_frac=test_frac, by=by)
    return spec, {"by": by, "val_frac": val_frac, "test_frac": test_frac}


def _ts_sql(ts: pd.Timestamp) -> str:
    """``ts`` as a DuckDB TIMESTAMPTZ literal (microseconds)."""
    return f"make_timestamptz({ts.value // 1000})"


def _window_sql(spec: SplitSpec) -> tuple[str, list[str]]:
    """The window index (0 train, 1 val, 2 test) as SQL, and each window's WHERE clause."""
    t1, t2 = _ts_sql(spec.t1), _ts_sql(spec.t2)
    index = f"CASE WHEN ts < {t1} THEN 0 WHEN ts < {t2} THEN 1 ELSE 2 END"
    return index, [f"ts < {t1}", f"ts >= {t1} AND ts < {t2}", f"ts >= {t2}"]


def _iso(us: int | None) -> str | None:
    return None if us is None else pd.Timestamp(us, unit="us", tz="UTC").isoformat()


def _window_stats(con: duckdb.DuckDBPyConnection, path: Path, spec: SplitSpec) -> dict[str, Any]:
    """Per-window counts in three scans; warm = first event in an earlier window."""
    params = {"path": str(path)}
    events = f"SELECT user_id, item_id, ts, {_window_sql(spec)[0]} AS w FROM read_parquet($path)"
    stats: dict[str, dict[str, Any]] = {
        name: {"n_events": 0, "n_users": 0, "n_items": 0, "ts_min": None, "ts_max": None}
        for name in WINDOWS
    }
    basic = con.execute(
        f"SELECT w, count(*), min(epoch_us(ts)), max(epoch_us(ts)) FROM ({events}) GROUP BY w",
        params,
    ).fetchall()
    for w, n, lo, hi in basic:
        stats[WINDOWS[w]].update(n_events=n, ts_min=_iso(lo), ts_max=_iso(hi))
    for entity in ("user", "item"):
        rows = con.execute(
            f"""SELECT w, count(*), count(*) FILTER (WHERE first_w < w)
                FROM (SELECT w, min(w) OVER (PARTITION BY {entity}_id) AS first_w
                      FROM ({events}) GROUP BY {entity}_id, w)
                GROUP BY w""",
            params,
        ).fetchall()
        for w, n, seen_before in rows:
            window = stats[WINDOWS[w]]
            window[f"n_{entity}s"] = n
            if w > 0 and entity == "user":
                window.update(n_warm_users=seen_before, n_cold_users=n - seen_before)
            elif w > 0:
                window["n_new_items"] = n - seen_before
    for name in WINDOWS[1:]:
        for key in ("n_warm_users", "n_cold_users", "n_new_items"):
            stats[name].setdefault(key, 0)
    return stats


def _check_not_empty(path: Path, spec: SplitSpec, stats: dict[str, Any]) -> None:
    starts = [s["ts_min"] for s in stats.values() if s["ts_min"] is not None]
    ends = [s["ts_max"] for s in stats.values() if s["ts_max"] is not None]
    bounds = {
        "train": f"ts < t1 = {spec.t1}",
        "val": f"{spec.t1} <= ts < {spec.t2}",
        "test": f"ts >= t2 = {spec.t2}",
    }
    for name in WINDOWS:
        if stats[name]["n_events"] == 0:
            raise ContractError(
                f"{path}: the {name} window ({bounds[name]}) holds no events; the data spans "
                f"{min(starts, default=None)} .. {max(ends, default=None)}. "
                "Choose t1 < t2 inside that range with events between them."
            )


def _write_events(con: duckdb.DuckDBPyConnection, path: Path, where: str, target: Path) -> None:
    """Stream the events of ``path`` that match ``where`` (SQL) to ``target`` with the
    source's exact schema (atomic rename).

    A failed write leaves the previous ``target`` and no ``.tmp`` file behind.
    """
    schema = pq.read_schema(path)
    query = f"SELECT * FROM read_parquet($path) WHERE {where}"
    reader = con.sql(query, params={"path": str(path)}).to_arrow_reader(_BATCH_ROWS)

    def write(tmp: Path) -> None:
        with pq.ParquetWriter(tmp, schema) as writer:
            for batch in reader:
                # DuckDB drops dictionary encoding and nullability flags; the cast restores them.
                writer.write_table(pa.Table.from_batches([batch]).cast(schema))

    replace_atomically(target, write)


def split_dataset(
    dataset_dir: Path,
    *,
    spec: SplitSpec | None = None,
    val_frac: float | None = None,
    test_frac: float | None = None,
    by: str = "events",
    out: Path | None = None,
) -> SplitResult:
    """Split ``dataset_dir/events.parquet`` into train/val/test Parquet files + ``split.json``.

    Args:
        dataset_dir: a contract directory (``events.parquet``, ``dataset.json``).
        spec: explicit cut points; or give ``val_frac`` and ``test_frac`` instead.
        val_frac, test_frac: fractions for the validation and test windows, in (0, 1).
        by: ``"events"`` (quantiles of event timestamps) or ``"time"`` (fractions of the span).
        out: output folder, default ``dataset_dir / "split"``; re-running overwrites it with
            identical files.

    Returns:
        The cut points, per-window stats and the written paths.
    """
    dataset_dir = Path(dataset_dir)
    events_path = _events_path(dataset_dir)
    info = read_info(dataset_dir)
    spec, cut = _resolve_spec(events_path, spec, val_frac, test_frac, by)
    out = dataset_dir / "split" if out is None else Path(out)
    with duckdb.connect() as con:
        stats = _window_stats(con, events_path, spec)
        _check_not_empty(events_path, spec, stats)
        out.mkdir(parents=True, exist_ok=True)
        paths = {name: out / SPLIT_FILES[name] for name in WINDOWS}
        for i, name in enumerate(WINDOWS):
            _write_events(con, events_path, _window_sql(spec)[1][i], paths[name])
    manifest = {
        "protocol": PROTOCOL,
        "t1": spec.t1.isoformat(),
        "t2": spec.t2.isoformat(),
        "cut": cut,
        "dataset": {"name": info.name, "content_hash": info.content_hash},
        "files": SPLIT_FILES,
        "windows": stats,
    }
    paths["manifest"] = out / SPLIT_FILE
    text = json.dumps(manifest, indent=2) + "\n"
    replace_atomically(paths["manifest"], lambda tmp: tmp.write_text(text))
    return SplitResult(spec, stats, paths, out, info.content_hash, cut)


def dev_copy(
    dataset_dir: Path,
    out: Path,
    *,
    val_frac: float = 0.1,
    test_frac: float = 0.2,
    by: str = "events",
) -> DatasetInfo:
    """The dataset as it was when its test window began: the events before ``t2`` of the
    temporal protocol's cut (``val_frac``, ``test_frac``, ``by``, as in ``[retrieval]``), users
    and items as they are, validated into a contract directory ``out``.

    Settings (rankers, quotas, hyperparameters) compared on the copy, whose own test window is
    the last ``test_frac`` of what remains, are chosen without the real test window.

    Raises:
        ContractError: ``out`` is ``dataset_dir`` or inside it, or a cut is empty.
    """
    from mlsd.data.validate import validate_dir

    dataset_dir, out = Path(dataset_dir), Path(out)
    if out.resolve().is_relative_to(dataset_dir.resolve()):
        raise ContractError(f"{out}: the dev copy must be outside {dataset_dir}; choose another")
    events_path = _events_path(dataset_dir)
    info = read_info(dataset_dir)
    spec, _ = _resolve_spec(events_path, None, val_frac, test_frac, by)
    before = f"ts < {_ts_sql(spec.t2)}"
    with duckdb.connect() as con:
        query = f"SELECT count(*) FROM read_parquet($path) WHERE {before}"
        ((n,),) = con.execute(query, {"path": str(events_path)}).fetchall()
        if n == 0:
            raise ContractError(f"{events_path}: no event before the test window ({spec.t2})")
        out.mkdir(parents=True, exist_ok=True)
        _write_events(con, events_path, before, out / EVENTS_FILE)
    for name in (USERS_FILE, ITEMS_FILE):
        if (dataset_dir / name).is_file():
            shutil.copyfile(dataset_dir / name, out / name)
    extra = {**info.extra, "dev_copy": {"of": info.content_hash, "before": spec.t2.isoformat()}}
    write_info(out, dataclasses.replace(info, name=f"{info.name}-dev", extra=extra))
    validate_dir(out)
    return read_info(out)
