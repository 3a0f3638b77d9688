"""The synthetic dataset: sessions of views and clicks from a simulated world, streamed to Parquet.

``synthesize(config, out)`` writes a contract directory (see :mod:`mlsd.data.schema`) plus the
world's ground truth (``world.json`` + ``world.npz``, see :mod:`mlsd.data.sources.world`)::

    from mlsd.data.sources.synthetic import WorldConfig, synthesize
    info = synthesize(WorldConfig(n_events=1_000_000, drift_at="2024-02-15"), Path("world"))

``events.parquet`` holds exactly ``n_events`` rows, views and clicks together, in time order:

- ``event="view"``: the world exposed ``item_id`` to ``user_id`` (``value`` 1.0);
- ``event="click"``: the user clicked that exposure, a few seconds later (``value`` 1.0);
- ``session_id`` (int64, increasing with the session's start) and ``position`` (int32, the
  view's 0-based place in its session; a click shares its view's), so the label of a view is
  "a click row with the same ``session_id`` and ``position`` exists".

Clicks follow the world's true probability, :meth:`World.click_probability`. The log is cut
at the span's end and at each block's share of rows, so a handful of views (those whose click
would land after the cut) have no click row.

How it stays fast and bounded: the span is cut into ``ceil(n_events / block_events)`` blocks of
equal expected activity. Each block draws its sessions with vectorised numpy from its own random
stream (so blocks are independent of the write batching), keeps exactly its share of rows,
sorts them by time and holds back the rows that spill past the block's end (long sessions) to
merge them with the next block. Finished rows go to a ``ParquetWriter`` in row groups of
``chunk_events`` rows. Memory is a few blocks plus one row group, whatever ``n_events``.
"""

from __future__ import annotations

import dataclasses
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mlsd.data.schema import (
    EVENTS_FILE,
    EVENTS_SCHEMA,
    INFO_FILE,
    ITEMS_FILE,
    QUARANTINE_FILE,
    TS_TYPE,
    USERS_FILE,
    DatasetInfo,
    content_hash,
    write_info,
)
from mlsd.data.sources.world import (
    AGE_BUCKETS,
    FEATURE_NAMES,
    GENDERS,
    OCCUPATIONS,
    REGIONS,
    US_PER_SECOND,
    WORLD_JSON,
    WORLD_NPZ,
    IntArray,
    World,
    WorldConfig,
    category_names,
)

__all__ = ["EVENTS_FILE_SCHEMA", "World", "WorldConfig", "synthesize"]

EVENTS_FILE_SCHEMA = pa.schema(
    [
        *EVENTS_SCHEMA,
        pa.field("session_id", pa.int64(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
    ]
)
"""The contract's required event columns, then the session context."""

MAX_SESSION_VIEWS = 200
MEAN_CLICK_DELAY_S = 8.0
COMPRESSION = "zstd"
_MAX_WORKERS = 2
_EVENT_NAMES = pa.array(["view", "click"], type=pa.string())


@dataclass
class _Rows:
    """Event rows under construction, one array per column (all of length n)."""

    user: IntArray
    item: IntArray
    ts: IntArray  # µs since the epoch
    click: npt.NDArray[np.bool_]
    session: IntArray
    position: npt.NDArray[np.int32]

    def __len__(self) -> int:
        return len(self.ts)

    def take(self, index: npt.NDArray[np.integer] | npt.NDArray[np.bool_] | slice) -> _Rows:
        return _Rows(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))

    @staticmethod
    def concat(parts: list[_Rows]) -> _Rows:
        names = [f.name for f in dataclasses.fields(_Rows)]
        return _Rows(*(np.concatenate([getattr(p, name) for p in parts]) for name in names))

    def to_arrow(self) -> pa.Table:
        n = len(self)
        ts = pa.Array.from_buffers(TS_TYPE, n, [None, pa.py_buffer(np.ascontiguousarray(self.ts))])
        columns = [
            pa.array(self.user),
            pa.array(self.item),
            ts,
            # A take from a two-string array builds the string column in C++, no Python strings.
            pc.take(_EVENT_NAMES, pa.array(self.click.view(np.int8))),
            pa.array(np.ones(n, dtype=np.float32)),
            pa.array(self.session),
            pa.array(self.position),
        ]
        return pa.Table.from_arrays(columns, schema=EVENTS_FILE_SCHEMA)


def synthesize(config: WorldConfig, out: Path, *, progress: bool = True) -> DatasetInfo:
    """Write the contract directory for ``config`` and the world's ground truth into ``out``.

    Returns:
        The ``dataset.json`` contents; ``extra`` holds the config and the view/click counts.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # dataset.json is written last, so a directory with one is complete; a quarantine left by
    # validating an earlier dataset here would describe rows that no longer exist.
    for stale in (INFO_FILE, QUARANTINE_FILE):
        (out / stale).unlink(missing_ok=True)
    world = World.create(config)
    world.save(out)
    pq.write_table(users_table(world), out / USERS_FILE, compression=COMPRESSION)
    pq.write_table(items_table(world), out / ITEMS_FILE, compression=COMPRESSION)
    n_clicks, ts_min, ts_max = _write_events(world, out / EVENTS_FILE, progress=progress)
    info = DatasetInfo(
        name="synthetic",
        source=f"mlsd simulated world (seed {config.seed})",
        licence="generated; no restrictions",
        n_events=config.n_events,
        n_users=config.n_users,
        n_items=config.n_items,
        ts_min=_iso(ts_min),
        ts_max=_iso(ts_max),
        extra={
            "config": dataclasses.asdict(config),
            "events": {"view": config.n_events - n_clicks, "click": n_clicks},
            "ground_truth": {"files": [WORLD_JSON, WORLD_NPZ], "features": list(FEATURE_NAMES)},
        },
    )
    info.content_hash = content_hash(out)
    write_info(out, info)
    return info


def users_table(world: World) -> pa.Table:
    """``users.parquet``: user_id and demographics as strings."""

    def labels(codes: npt.NDArray[np.int8], names: tuple[str, ...]) -> pa.Array:
        return pa.DictionaryArray.from_arrays(codes, pa.array(names)).cast(pa.string())

    return pa.table(
        {
            "user_id": pa.array(np.arange(1, world.config.n_users + 1, dtype=np.int64)),
            "age_bucket": labels(world.user_age, AGE_BUCKETS),
            "gender": labels(world.user_gender, GENDERS),
            "occupation": labels(world.user_occupation, OCCUPATIONS),
            "region": labels(world.user_region, REGIONS),
        }
    )


def items_table(world: World) -> pa.Table:
    """``items.parquet``: item_id, title, category, genres (``|``-joined), created_ts."""
    ids = pa.array(np.arange(1, world.config.n_items + 1, dtype=np.int64))
    names = pa.array(category_names(world.config.n_categories))
    category = pc.take(names, pa.array(world.item_category))
    second_codes = world.item_second_category
    second = pc.take(names, pa.array(np.maximum(second_codes, 0), mask=second_codes < 0))
    created = np.ascontiguousarray(world.item_created_us)
    return pa.table(
        {
            "item_id": ids,
            "title": pc.binary_join_element_wise("item", ids.cast(pa.string()), " "),
            "category": category,
            "genres": pc.binary_join_element_wise(category, second, "|", null_handling="skip"),
            "created_ts": pa.Array.from_buffers(
                TS_TYPE, len(created), [None, pa.py_buffer(created)]
            ),
        }
    )


def _write_events(world: World, path: Path, *, progress: bool) -> tuple[int, int, int]:
    """Stream the events of ``world`` to ``path``; returns (n_clicks, ts_min, ts_max)."""
    chunk = world.config.chunk_events
    tmp = path.with_name(path.name + ".tmp")  # a crash never leaves a half file under the name
    buffer: list[_Rows] = []
    n_buffered = n_clicks = 0
    ts_min = ts_max = None
    columns = (TextColumn("[bold]events"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with (
            pq.ParquetWriter(
                tmp, EVENTS_FILE_SCHEMA, compression=COMPRESSION, use_dictionary=["event", "value"]
            ) as writer,
            Progress(*columns, disable=not progress) as bar,
        ):
            task = bar.add_task("events", total=world.config.n_events)
            for rows in _time_ordered_rows(world):
                if len(rows):
                    ts_min = int(rows.ts[0]) if ts_min is None else ts_min
                    ts_max = int(rows.ts[-1])
                n_clicks += int(rows.click.sum())
                buffer.append(rows)
                n_buffered += len(rows)
                if n_buffered >= chunk:  # write whole row groups, keep the remainder
                    merged = _Rows.concat(buffer)
                    n_write = n_buffered // chunk * chunk
                    writer.write_table(merged.take(slice(0, n_write)).to_arrow(), chunk)
                    buffer, n_buffered = [merged.take(slice(n_write, None))], n_buffered - n_write
                    bar.advance(task, n_write)
            if n_buffered:
                writer.write_table(_Rows.concat(buffer).to_arrow(), chunk)
                bar.advance(task, n_buffered)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return n_clicks, ts_min or 0, ts_max or 0


def _time_ordered_rows(world: World) -> Iterator[_Rows]:
    """All event rows in time order, one batch per block; blocks are simulated on threads.

    numpy and the random generators release the GIL in their array loops, so the blocks ahead
    are simulated on all cores while this thread merges, sorts and hands rows to the writer.
    """
    cfg = world.config
    n_blocks = -(-cfg.n_events // cfg.block_events)
    workers = max(1, min(_MAX_WORKERS, os.cpu_count() or 1))
    lookahead = 2 * workers
    pending: _Rows | None = None  # rows past the previous block's end, waiting for this one
    next_session = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = deque(
            pool.submit(_simulate_block, world, b, n_blocks)
            for b in range(min(lookahead, n_blocks))
        )
        for block in range(n_blocks):
            rows, n_sessions = futures.popleft().result()
            if block + lookahead < n_blocks:
                futures.append(pool.submit(_simulate_block, world, block + lookahead, n_blocks))
            rows.session += next_session  # sessions are numbered in start order across blocks
            next_session += n_sessions
            rows = rows if pending is None else _Rows.concat([pending, rows])
            # Each session's rows are already in time order: the stable sort (timsort) uses
            # those runs and is faster here than quicksort.
            rows = rows.take(np.argsort(rows.ts, kind="stable"))
            # Later blocks start at or after this block's end: everything before it is final.
            end = world.time_at_quantile((block + 1) / n_blocks)
            cut = len(rows) if block == n_blocks - 1 else int(np.searchsorted(rows.ts, end))
            pending = rows.take(slice(cut, None))
            yield rows.take(slice(0, cut))


def _simulate_block(world: World, block: int, n_blocks: int) -> tuple[_Rows, int]:
    """The rows of sessions that start in ``block``: exactly its share of ``n_events``.

    Returns the rows (unsorted; ``session`` numbered from 0 by start) and the sessions kept.
    """
    cfg = world.config
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(2, block)))
    per_block, extra = divmod(cfg.n_events, n_blocks)
    k = per_block + (block < extra)
    q0, q1 = block / n_blocks, (block + 1) / n_blocks
    rows_per_session = cfg.mean_session_views * (1.0 + cfg.target_ctr)
    parts: list[_Rows] = []
    starts: list[IntArray] = []
    n_rows = n_sessions = 0
    while n_rows < k:
        m = int((k - n_rows) / rows_per_session * 1.03) + 16
        rows, session_starts = _simulate_sessions(world, rng, m, q0, q1)
        rows.session += n_sessions
        parts.append(rows)
        starts.append(session_starts)
        n_rows += len(rows)
        n_sessions += m
    return _keep_exactly(_Rows.concat(parts), np.concatenate(starts), k, rng)


def _keep_exactly(
    rows: _Rows, start: IntArray, k: int, rng: np.random.Generator
) -> tuple[_Rows, int]:
    """``k`` of the rows: whole sessions taken in a random order, the last one cut short.

    A random order (not the latest sessions) so that the dropped sessions leave no gap at the
    end of the block. Sessions kept are renumbered 0, 1, ... by start time.
    """
    n_sessions = len(start)
    counts = np.bincount(rows.session, minlength=n_sessions)
    order = rng.permutation(n_sessions)
    cum = np.cumsum(counts[order])
    n_whole = int(np.searchsorted(cum, k, side="right"))
    keep = np.zeros(n_sessions, dtype=np.int64)
    keep[order[:n_whole]] = counts[order[:n_whole]]
    if n_whole < n_sessions:
        keep[order[n_whole]] = k - (cum[n_whole - 1] if n_whole else 0)
    # Rows are session-major and in sequence order, so a session's first keep[s] rows are kept.
    first_row = np.cumsum(counts) - counts
    rank = np.arange(len(rows)) - np.repeat(first_row, counts)
    rows = rows.take(rank < keep[rows.session])
    kept = np.flatnonzero(keep > 0)
    kept = kept[np.argsort(start[kept], kind="stable")]
    session_id = np.full(n_sessions, -1, dtype=np.int64)
    session_id[kept] = np.arange(len(kept))
    rows.session = session_id[rows.session]
    return rows, len(kept)


def _simulate_sessions(
    world: World, rng: np.random.Generator, m: int, q0: float, q1: float
) -> tuple[_Rows, IntArray]:
    """``m`` sessions: rows session-major (view, then its click if any) and start times."""
    cfg = world.config
    start = world.sample_times(rng, m, q0, q1)
    user = world.sample_users(start, rng)
    length = np.minimum(rng.geometric(1.0 / cfg.mean_session_views, size=m), MAX_SESSION_VIEWS)
    session = np.repeat(np.arange(m), length)
    first = np.cumsum(length) - length
    # At least a second between views, so one session never shows an item twice in one µs.
    gap_s = 1.0 + rng.exponential(cfg.mean_view_gap_s - 1.0, size=len(session))
    gap_s[first] = 0.0
    elapsed_s = np.cumsum(gap_s)
    elapsed_s -= np.repeat(elapsed_s[first], length)
    view_ts = np.repeat(start, length) + (elapsed_s * US_PER_SECOND).astype(np.int64)
    view_user = user[session]
    # A session has an intent: each view stays in the session's category with some probability,
    # else draws afresh. Both draws follow the user's taste, so the marginal is unchanged.
    own = world.sample_categories(view_user, view_ts, rng)
    intent = world.sample_categories(user, start, rng)[session]
    category = np.where(rng.random(len(session)) < cfg.session_stickiness, intent, own)
    item = world.sample_items(category, view_ts, rng)
    clicked = rng.random(len(session)) < world.click_probability(view_user, item, view_ts)
    view = np.repeat(np.arange(len(session)), 1 + clicked)
    is_click = np.zeros(len(view), dtype=bool)
    is_click[np.cumsum(1 + clicked)[clicked] - 1] = True
    ts = view_ts[view]
    delay_s = 1.0 + rng.exponential(MEAN_CLICK_DELAY_S, size=int(clicked.sum()))
    ts[is_click] += (delay_s * US_PER_SECOND).astype(np.int64)
    position = (np.arange(len(session)) - first[session]).astype(np.int32)
    rows = _Rows(view_user[view], item[view], ts, is_click, session[view], position[view])
    if ts.max(initial=0) >= cfg.end_us:  # the log ends at the span's end: censor what follows
        rows = rows.take(ts < cfg.end_us)
    return rows, start


def _iso(us: int) -> str:
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)).isoformat()
