"""Precomputed predictions: top-K lists per user written by a batch job, read by the service.

The offline path of the request flow (DESIGN.md, "request path"). A batch job scores every
user with the champion model and writes one Redis key per user; the service serves that list
when it is fresh and was computed by the current champion, and computes online otherwise::

    store = PrecomputedStore(redis.Redis(host="127.0.0.1", port=6379))
    store.write(user_ids, item_ids, scores, model_version="ranker:7", k=50)  # the batch job
    found = store.lookup(42, model_version="ranker:7", max_age_s=6 * 3600)   # the service
    if found.reason == "hit":
        serve(found.result.item_ids, found.result.scores)
    else:
        count_fallback(found.reason)  # "missing", "too_old", "future", "corrupt", ...

Keys: one Redis string per model version and user, ``<prefix>:<model_version>:<user_id>``,
with a TTL of ``ttl_s``. Each version keeps its own lists: a challenger's batch (an experiment
arm, or the next champion precomputed before its promotion) does not overwrite the
champion's, a rollback finds its lists, and a retired version's expire with their TTL.

What the user consumed after the batch: the service appends each event's item to the user's
``<prefix>/consumed:<user_id>`` (int64 ids, the same TTL, :meth:`PrecomputedStore.note_consumed`)
and a lookup reads it in the same MGET as the list (:attr:`Precomputed.consumed`), so an item
the user just clicked is not served again from a list computed before the click.

Value format, all little-endian, no pickle:

    ======  =========  ===============================================
    bytes   type       field
    ======  =========  ===============================================
    4       bytes      magic ``b"MLPK"``
    1       uint8      format version (3; 2 had no sources, 1 had ``k`` reserved as 0)
    2       uint16     k, the list length the batch asked for (n < k: it ran out of items)
    1       -          reserved (zero)
    4       uint32     n, the number of items (padding already dropped)
    4       uint32     length of the model version in bytes
    8       float64    computed_at, UNIX seconds: the time the list was computed as of
    v       utf-8      model version
    8 * n   int64      item ids, best first
    4 * n   float32    scores
    1       uint8      m, the number of source names (format 3)
    m * ..  uint8+utf8 each source name: its length in bytes, then the name
    n       uint8      each item's source: an index into the names, 255 = unknown
    ======  =========  ===============================================

The sources are the candidate sources that proposed each item (what the online path's answer
says of its items), so the service log's ``source`` column means the same on both paths and
per-source analysis covers the precomputed answers. A top-100 list takes 25 + len(version) +
1,300 bytes plus its source names (the default feed's seven: 66). The model version is in the
value too, and a value whose version is not its key's is refused (``stale_version``).

Errors: a value that does not decode is reported as ``corrupt`` and never raises. Redis
failures (connection refused, timeouts) do raise, as ``redis.exceptions.RedisError``
subclasses: whether to fall back to the online path is the service's decision, not this
store's.

**A failing Redis is not asked again at once.** After a lookup's connection error or timeout,
lookups raise :class:`StoreUnavailableError` (a ``ConnectionError``) without a round trip for
``retry_after_s`` (1 s); then one lookup, the first to come, tries Redis again (the others
keep being refused while it does), and its success ends the outage. A stalled Redis would
otherwise cost every request its socket timeout, and a request twice over (the event loop's
lookup, then the thread path's). Writes (the batch job, :meth:`PrecomputedStore.note_consumed`)
always try.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple, cast

import numpy as np
import numpy.typing as npt
import redis
import redis.asyncio as aioredis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

IntArray = npt.NDArray[np.int64]
ScoreArray = npt.NDArray[np.float32]

PAD_ID = -1
"""Item id padding a row of ``item_ids`` that has fewer than K items; dropped on write."""

MAGIC = b"MLPK"
FORMAT_VERSION = 3
NO_SOURCE = 255
"""An item's source code when its source is not known (a list written without sources)."""
UNKNOWN_SOURCE = "precomputed"
"""The source an item of a list without sources (format 1 or 2) is served under."""
_HEADER = struct.Struct("<4sBHxIId")  # magic, format, k, reserved, n_items, version bytes, ts
_ID = np.dtype("<i8")
_SCORE = np.dtype("<f4")
MAX_K = 2**16 - 1
"""The longest list a value records (``k`` is a uint16)."""
FUTURE_TOLERANCE_S = 60.0
"""A list computed later than this after the request's time is not served (``future``): it
used data the request's moment had not seen (a request replayed at a past ``now``), or the
batch host's clock runs ahead."""

MAX_CONSUMED = 1_000
"""The most recent consumed items kept per user (8 KB): a user who keeps acting renews the
key's TTL, so without a cap it would grow as long as they do."""
_APPEND_CAPPED = """
redis.call('APPEND', KEYS[1], ARGV[1])
local n = redis.call('STRLEN', KEYS[1])
local cap = tonumber(ARGV[2])
if n > cap then
  redis.call('SET', KEYS[1], redis.call('GETRANGE', KEYS[1], n - cap, n - 1))
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
"""
"""Append item ids to a user's consumed record, keep its last ``cap`` bytes, renew its TTL."""

Reason = Literal["hit", "missing", "stale_version", "too_old", "future", "corrupt"]
"""Why a lookup did (``hit``) or did not return a list; the label of a fallback counter."""
_NO_ITEMS = np.zeros(0, dtype=np.int64)
_NO_SOURCES = np.zeros(0, dtype=np.uint8)

logger = logging.getLogger(__name__)


class CorruptValueError(ValueError):
    """A stored value is not a precomputed list in the expected format."""


class StoreUnavailableError(redis.exceptions.ConnectionError):
    """Redis failed less than ``retry_after_s`` ago: the lookup did not try it again."""


@dataclass(frozen=True)
class Precomputed:
    """One user's precomputed list.

    Attributes:
        item_ids: (n,) int64, best first, padding dropped (n may be 0).
        scores: (n,) float32, the model's scores of ``item_ids``.
        model_version: the model version that computed the list.
        computed_at: the time the list was computed as of, UNIX seconds.
        k: the list length the batch asked for; ``n < k`` when it ran out of items, so a
            request for up to ``k`` items can take the list whole. 0: not recorded (format 1).
        consumed: items the user consumed since (:meth:`PrecomputedStore.note_consumed`), as
            read with the list; not part of the stored value.
        sources: (n,) uint8 index of each item's candidate source in ``source_names``
            (:data:`NO_SOURCE` unknown); empty for a list written without them.
        source_names: the names ``sources`` indexes.
    """

    item_ids: IntArray
    scores: ScoreArray
    model_version: str
    computed_at: float
    k: int = 0
    consumed: IntArray = field(default_factory=lambda: _NO_ITEMS)
    sources: npt.NDArray[np.uint8] = field(default_factory=lambda: _NO_SOURCES)
    source_names: tuple[str, ...] = ()

    def source_list(self) -> list[str]:
        """Each item's source name (:data:`UNKNOWN_SOURCE` where it is not known)."""
        if len(self.sources) != len(self.item_ids):
            return [UNKNOWN_SOURCE] * len(self.item_ids)
        names = [*self.source_names, UNKNOWN_SOURCE]
        unknown = len(self.source_names)
        return [names[min(int(c), unknown)] for c in self.sources.tolist()]

    def serves(self, k: int, exclude: IntArray) -> tuple[IntArray, ScoreArray, list[str]] | None:
        """The first ``k`` items less ``exclude`` with their scores and sources, or ``None``
        when the list cannot answer for ``k`` as the model would: cut at fewer items than the
        batch could have listed (a request for more than the batch's ``k``, or items excluded
        since), since more items existed than it kept. A list shorter than its ``k`` (the
        model ran out) is served as it is."""
        ids, scores, sources = self.item_ids, self.scores, self.source_list()
        if len(exclude):
            keep = ~np.isin(ids, exclude)
            ids, scores = ids[keep], scores[keep]
            sources = [name for name, kept in zip(sources, keep.tolist(), strict=True) if kept]
        complete = 0 < len(self.item_ids) < self.k  # the model had no more items to give
        if len(ids) < k and not complete:
            return None
        return ids[:k], scores[:k], sources[:k]


class Lookup(NamedTuple):
    """A lookup's answer: the list (None unless ``reason == "hit"``) and the reason."""

    result: Precomputed | None
    reason: Reason


@dataclass(frozen=True)
class WriteStats:
    """What a batch write did: users written, wall-clock seconds, throughput, bytes of values."""

    n_users: int
    seconds: float
    users_per_s: float
    n_bytes: int


def encode(
    item_ids: IntArray,
    scores: ScoreArray,
    *,
    model_version: str,
    computed_at: float,
    k: int | None = None,
    sources: npt.ArrayLike | None = None,
    source_names: tuple[str, ...] = (),
) -> bytes:
    """One user's value: header, model version, the raw item ids and scores, the sources.

    Args:
        item_ids: (n,) int64 without padding.
        scores: (n,) float32.
        k: the list length the batch asked for (default n), at least n and at most
            :data:`MAX_K`.
        sources: (n,) each item's index in ``source_names`` (negative or
            :data:`NO_SOURCE`: unknown); ``None``: none known.
        source_names: at most 255 names of at most 255 UTF-8 bytes each (code 255 is
            "unknown").
    """
    k = len(item_ids) if k is None else int(k)
    if not len(item_ids) <= k <= MAX_K:
        raise ValueError(f"k={k}: must be at least the {len(item_ids)} items and <= {MAX_K}")
    version = model_version.encode()
    names = [name.encode() for name in source_names]
    if len(names) > NO_SOURCE or any(len(name) > 255 for name in names):
        raise ValueError(f"source_names: at most 255 names of <= 255 bytes, got {source_names}")
    if sources is None:
        codes = np.full(len(item_ids), NO_SOURCE, dtype=np.uint8)
    else:
        raw = np.asarray(sources, dtype=np.int64).reshape(-1)
        known = (raw >= 0) & (raw != NO_SOURCE)
        if len(raw) != len(item_ids) or (raw[known] >= len(names)).any():
            raise ValueError(
                f"sources: need one code per item ({len(item_ids)}), each below the "
                f"{len(names)} names or unknown (< 0); got {raw.tolist()[:10]}"
            )
        codes = np.where(known, raw, NO_SOURCE).astype(np.uint8)
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, k, len(item_ids), len(version), computed_at)
    ids = item_ids.astype(_ID, copy=False).tobytes()
    table = b"".join([bytes([len(names)]), *(bytes([len(n)]) + n for n in names)])
    return b"".join(
        (header, version, ids, scores.astype(_SCORE, copy=False).tobytes(), table, codes.tobytes())
    )


def decode(value: bytes) -> Precomputed:
    """The inverse of :func:`encode`; raises :class:`CorruptValueError` on a malformed value."""
    if len(value) < _HEADER.size:
        raise CorruptValueError(f"{len(value)} bytes, shorter than the {_HEADER.size}-byte header")
    magic, fmt, k, n_items, n_version, computed_at = _HEADER.unpack_from(value)
    if magic != MAGIC or fmt not in (1, 2, FORMAT_VERSION):
        raise CorruptValueError(
            f"header {magic!r} format {fmt}, expected {MAGIC!r} format 1 to {FORMAT_VERSION}"
        )
    expected = _HEADER.size + n_version + n_items * (_ID.itemsize + _SCORE.itemsize)
    names: tuple[str, ...] = ()
    sources = _NO_SOURCES
    if fmt == FORMAT_VERSION:
        names, sources, expected = _decode_sources(value, expected, n_items)
    if len(value) != expected or not math.isfinite(computed_at):
        raise CorruptValueError(f"{len(value)} bytes, the header implies {expected}")
    start = _HEADER.size + n_version
    try:
        model_version = value[_HEADER.size : start].decode()
    except UnicodeDecodeError as err:
        raise CorruptValueError(f"model version is not UTF-8: {err}") from err
    # astype copies into aligned, writable, native-order arrays (frombuffer views are read-only).
    ids = np.frombuffer(value, dtype=_ID, count=n_items, offset=start).astype(np.int64)
    scores_at = start + n_items * _ID.itemsize
    scores = np.frombuffer(value, dtype=_SCORE, count=n_items, offset=scores_at)
    return Precomputed(
        ids, scores.astype(np.float32), model_version, computed_at, k,
        sources=sources, source_names=names,
    )  # fmt: skip


def _decode_sources(
    value: bytes, at: int, n_items: int
) -> tuple[tuple[str, ...], npt.NDArray[np.uint8], int]:
    """Format 3's source table and codes after the scores, which end at ``at``: (names,
    codes, the value's expected length)."""
    if len(value) <= at:
        raise CorruptValueError(f"{len(value)} bytes: no source table after {at}")
    names = []
    pos = at + 1
    for _ in range(value[at]):
        if pos >= len(value):
            raise CorruptValueError(f"{len(value)} bytes: the source table runs past the end")
        end = pos + 1 + value[pos]
        try:
            names.append(value[pos + 1 : end].decode())
        except UnicodeDecodeError as err:
            raise CorruptValueError(f"a source name is not UTF-8: {err}") from err
        pos = end
    if len(value) != pos + n_items:
        raise CorruptValueError(f"{len(value)} bytes, the header implies {pos + n_items}")
    codes = np.frombuffer(value, dtype=np.uint8, count=n_items, offset=pos).copy()
    return tuple(names), codes, pos + n_items


class PrecomputedStore:
    """Top-K lists per user in Redis, one key per user, tagged with the model version.

    Args:
        client: a ``redis.Redis`` with ``decode_responses=False`` (values are binary).
        prefix: key prefix; keys are ``<prefix>:<model_version>:<user_id>``. Use one per
            system/environment.
        ttl_s: whole seconds each key lives after its write (>= 1). A batch that stops
            running lets its lists expire rather than be served forever.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "mlsd:feed:top",
        ttl_s: int = 86_400,
        async_url: str | None = None,
        socket_timeout: float | None = None,
        retry_after_s: float = 1.0,
    ) -> None:
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError(
                "PrecomputedStore needs a redis client with decode_responses=False: "
                "its values are binary"
            )
        if not prefix:
            raise ValueError("prefix must be a non-empty string, e.g. 'mlsd:feed:top'")
        if not ttl_s >= 1:  # Redis expiries are whole seconds: 0.5 would be 0, refused
            raise ValueError(f"ttl_s must be at least 1 second, got {ttl_s}")
        if not retry_after_s >= 0:
            raise ValueError(f"retry_after_s must be >= 0, got {retry_after_s}")
        self.client = client
        self._append_capped = client.register_script(_APPEND_CAPPED)  # no round trip yet
        self.prefix = prefix
        self.ttl_s = int(ttl_s)
        self.async_url = async_url
        self.socket_timeout = socket_timeout
        self.retry_after_s = float(retry_after_s)
        self._down_until = -math.inf  # time.monotonic() before which lookups do not try
        self._health = threading.Lock()  # _down_until, from the event loop and the threads
        self._async: tuple[asyncio.AbstractEventLoop, aioredis.Redis] | None = None

    @classmethod
    def from_url(
        cls, url: str, *, socket_timeout: float | None = None, **options: Any
    ) -> PrecomputedStore:
        """A store on ``url`` (``redis://host:port/db``) that can also be read from an event
        loop (:meth:`lookup_async`); ``options``: ``prefix``, ``ttl_s``."""
        client = redis.Redis.from_url(url, socket_timeout=socket_timeout)
        return cls(client, async_url=url, socket_timeout=socket_timeout, **options)

    @property
    def can_await(self) -> bool:
        """Whether :meth:`lookup_async` works (the store knows its URL)."""
        return self.async_url is not None

    def key(self, user_id: int, model_version: str) -> str:
        """The Redis key of one user's list by one model version."""
        return f"{self.prefix}:{model_version}:{int(user_id)}"

    def consumed_key(self, user_id: int) -> str:
        """The Redis key of the items one user consumed (any version's lists skip them)."""
        return f"{self.prefix}/consumed:{int(user_id)}"

    def note_consumed(self, user_ids: npt.ArrayLike, item_ids: npt.ArrayLike) -> None:
        """Record that each user consumed each item (one pair per event, in one pipelined
        round trip): a precomputed list read later skips them, as the online path skips the
        user's history. The record lives ``ttl_s`` after the user's last event, as long as
        a list computed before the event could, and keeps the user's last
        :data:`MAX_CONSUMED` items. Anonymous visitors (negative ids) are not recorded.

        Raises:
            redis.exceptions.RedisError: Redis failed.
        """
        users = np.asarray(user_ids, dtype=np.int64).reshape(-1)
        items = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        if len(users) != len(items):
            raise ValueError(f"{len(users)} user ids for {len(items)} item ids")
        known = users >= 0  # anonymous visitors have no precomputed list
        users, items = users[known], items[known]
        if len(users) == 0:
            return
        order = np.argsort(users, kind="stable")
        users, items = users[order], items[order]
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
        cap = MAX_CONSUMED * _ID.itemsize
        append = self._append_capped
        with self.client.pipeline(transaction=False) as pipe:
            for user, chunk in zip(
                users[starts].tolist(), np.split(items, starts[1:]), strict=True
            ):
                value = chunk.astype(_ID, copy=False).tobytes()
                append(keys=[self.consumed_key(user)], args=[value, cap, self.ttl_s], client=pipe)
            pipe.execute()

    def write(
        self,
        user_ids: npt.ArrayLike,
        item_ids: npt.ArrayLike,
        scores: npt.ArrayLike,
        *,
        model_version: str,
        computed_at: float | None = None,
        k: int | None = None,
        sources: npt.ArrayLike | None = None,
        source_names: tuple[str, ...] = (),
        chunk: int = 10_000,
        progress: bool = False,
    ) -> WriteStats:
        """Write one list per user, ``chunk`` users per pipelined round trip.

        The pipeline is not transactional: a failure mid-way leaves earlier chunks written
        (re-running the job is idempotent). A user id given twice keeps its last row.

        Args:
            user_ids: (n,) int64.
            item_ids: (n, K) int64, best first, rows padded with -1 (``PAD_ID``).
            scores: (n, K) float32 scores of ``item_ids`` (padding scores are ignored).
            model_version: the concrete version that computed the lists (not an alias).
            computed_at: UNIX seconds the lists were computed as of; default now.
            k: the list length the batch asked for (default K, the width of ``item_ids``):
                a row with fewer items ran out of them.
            sources: (n, K) each item's index in ``source_names`` (negative: unknown), the
                candidate source that proposed it; ``None``: not known.
            source_names: the sources' names.
            chunk: users per pipeline round trip.
            progress: show a rich progress bar over chunks (on stderr).

        Raises:
            ValueError: shapes or arguments do not fit.
            redis.exceptions.RedisError: Redis failed.
        """
        if chunk <= 0:
            raise ValueError(f"chunk must be a positive number of users, got {chunk}")
        start = time.perf_counter()
        users, ids, vals = _check_batch(user_ids, item_ids, scores)
        computed_at = time.time() if computed_at is None else float(computed_at)
        k = ids.shape[1] if k is None else int(k)
        if not ids.shape[1] <= k <= MAX_K:
            raise ValueError(f"k={k}: must be at least the {ids.shape[1]} columns and <= {MAX_K}")
        codes = np.full(ids.shape, -1, dtype=np.int64)
        if sources is not None:
            codes = np.asarray(sources, dtype=np.int64)
            if codes.shape != ids.shape:
                raise ValueError(f"sources: shape {codes.shape}, the item ids' is {ids.shape}")
        n_bytes = 0
        with _bar(progress, total=len(users)) as advance:
            for lo in range(0, len(users), chunk):
                rows = slice(lo, lo + chunk)
                n_bytes += self._write_chunk(
                    users[rows], ids[rows], vals[rows], codes[rows], source_names,
                    model_version, computed_at, k,
                )  # fmt: skip
                advance(len(users[rows]))
        seconds = time.perf_counter() - start
        rate = len(users) / seconds if seconds > 0 else math.inf
        return WriteStats(len(users), seconds, rate, n_bytes)

    def _write_chunk(
        self,
        users: IntArray,
        ids: IntArray,
        vals: ScoreArray,
        codes: IntArray,
        source_names: tuple[str, ...],
        model_version: str,
        computed_at: float,
        k: int,
    ) -> int:
        """One pipelined round trip of SET ... EX; returns the bytes of values written."""
        keep = ids != PAD_ID
        n_bytes = 0
        with self.client.pipeline(transaction=False) as pipe:
            for user, row_ids, row_scores, row_codes, mask in zip(
                users.tolist(), ids, vals, codes, keep, strict=True
            ):
                value = encode(
                    row_ids[mask],
                    row_scores[mask],
                    model_version=model_version,
                    computed_at=computed_at,
                    k=k,
                    sources=row_codes[mask],
                    source_names=source_names,
                )
                n_bytes += len(value)
                pipe.set(self.key(user, model_version), value, ex=self.ttl_s)
            pipe.execute()
        return n_bytes

    def lookup(
        self,
        user_id: int,
        *,
        model_version: str,
        max_age_s: float | None = None,
        now: float | None = None,
    ) -> Lookup:
        """One user's list by ``model_version`` if it is there and at most ``max_age_s``
        old, with the items the user consumed since (one MGET).

        Args:
            user_id: the user.
            model_version: the version the service serves.
            max_age_s: oldest acceptable list, in seconds (None: any age within the TTL).
            now: UNIX seconds of the request, to measure age against; default now. A list
                computed more than :data:`FUTURE_TOLERANCE_S` after it is not served.

        Returns:
            ``(list, "hit")``, or ``(None, reason)`` with reason ``missing``, ``too_old``,
            ``future``, ``corrupt`` or ``stale_version`` (a value of another version under
            this version's key).

        Raises:
            redis.exceptions.RedisError: Redis failed (the caller picks the fallback).
        """
        keys = [self.key(user_id, model_version), self.consumed_key(user_id)]
        with self._guarded():
            value, consumed = cast(list[bytes | None], self.client.mget(keys))
        now = time.time() if now is None else now
        return self._judge(user_id, value, consumed, model_version, max_age_s, now)

    async def lookup_async(
        self,
        user_id: int,
        *,
        model_version: str,
        max_age_s: float | None = None,
        now: float | None = None,
    ) -> Lookup:
        """:meth:`lookup` through an asyncio client, for a caller on an event loop.

        The client is made on the first call from each event loop (its connections belong to
        that loop). Raises ``RuntimeError`` when the store has no URL (see :meth:`from_url`)."""
        keys = [self.key(user_id, model_version), self.consumed_key(user_id)]
        with self._guarded():
            value, consumed = await self._async_client().mget(keys)
        now = time.time() if now is None else now
        return self._judge(user_id, value, consumed, model_version, max_age_s, now)

    @contextmanager
    def _guarded(self) -> Iterator[None]:
        """Around one lookup's round trip: refuse it while Redis is held to be down, and hold
        it down for ``retry_after_s`` after a connection error or a timeout."""
        with self._health:
            now = time.monotonic()
            if now < self._down_until:
                raise StoreUnavailableError(
                    f"Redis failed less than {self.retry_after_s:g} s ago; next try in "
                    f"{self._down_until - now:.2f} s"
                )
            if self._down_until != -math.inf:  # down: this lookup is the one probe
                self._down_until = now + self.retry_after_s
        try:
            yield
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as err:
            with self._health:
                if self._down_until == -math.inf:  # was up: say so once per outage
                    logger.warning(
                        "precomputed lists: Redis failed (%s); lookups skip it for %g s at a "
                        "time until it answers", err, self.retry_after_s,
                    )  # fmt: skip
                self._down_until = time.monotonic() + self.retry_after_s
            raise
        if self._down_until == -math.inf:  # up, as almost always: no lock on the way out
            return
        with self._health:
            if self._down_until != -math.inf:
                logger.warning("precomputed lists: Redis answers again")
                self._down_until = -math.inf

    def _async_client(self) -> aioredis.Redis:
        if self.async_url is None:
            raise RuntimeError("this PrecomputedStore has no URL: build it with from_url()")
        loop = asyncio.get_running_loop()
        if self._async is None or self._async[0] is not loop:
            client = aioredis.Redis.from_url(self.async_url, socket_timeout=self.socket_timeout)
            self._async = (loop, client)
        return self._async[1]

    def read(
        self,
        user_id: int,
        *,
        model_version: str,
        max_age_s: float | None = None,
        now: float | None = None,
    ) -> Precomputed | None:
        """:meth:`lookup` without the reason: the list, or None."""
        return self.lookup(user_id, model_version=model_version, max_age_s=max_age_s, now=now)[0]

    def lookup_many(
        self,
        user_ids: npt.ArrayLike,
        *,
        model_version: str,
        max_age_s: float | None = None,
        now: float | None = None,
    ) -> list[Lookup]:
        """:meth:`lookup` for many users with one MGET, in the order of ``user_ids``.

        One MGET blocks Redis while it runs: pass thousands of users at a time, not millions.
        """
        users = np.asarray(user_ids, dtype=np.int64).reshape(-1)
        if len(users) == 0:
            return []
        keys = [
            key
            for u in users.tolist()
            for key in (self.key(u, model_version), self.consumed_key(u))
        ]
        with self._guarded():
            values = cast(list[bytes | None], self.client.mget(keys))  # sync client: a list
        now = time.time() if now is None else now
        return [
            self._judge(int(u), values[2 * i], values[2 * i + 1], model_version, max_age_s, now)
            for i, u in enumerate(users.tolist())
        ]

    def read_many(
        self,
        user_ids: npt.ArrayLike,
        *,
        model_version: str,
        max_age_s: float | None = None,
        now: float | None = None,
    ) -> list[Precomputed | None]:
        """:meth:`lookup_many` without the reasons: one list or None per user."""
        found = self.lookup_many(
            user_ids, model_version=model_version, max_age_s=max_age_s, now=now
        )
        return [f.result for f in found]

    def _judge(
        self,
        user_id: int,
        value: object,
        consumed: object,
        model_version: str,
        max_age_s: float | None,
        now: float,
    ) -> Lookup:
        if value is None:
            return Lookup(None, "missing")
        key = self.key(user_id, model_version)
        if not isinstance(value, bytes):
            logger.warning("precomputed %s: not a bytes value", key)
            return Lookup(None, "corrupt")
        try:
            found = decode(value)
        except CorruptValueError as err:
            logger.warning("precomputed %s is corrupt: %s", key, err)
            return Lookup(None, "corrupt")
        if found.model_version != model_version:
            return Lookup(None, "stale_version")
        if max_age_s is not None and now - found.computed_at > max_age_s:
            return Lookup(None, "too_old")
        if found.computed_at > now + FUTURE_TOLERANCE_S:
            return Lookup(None, "future")
        if isinstance(consumed, bytes) and len(consumed) >= _ID.itemsize:
            whole = len(consumed) // _ID.itemsize * _ID.itemsize  # a torn append: its head
            items = np.frombuffer(consumed[:whole], dtype=_ID).astype(np.int64)
            found = replace(found, consumed=items)
        return Lookup(found, "hit")


def _check_batch(
    user_ids: npt.ArrayLike, item_ids: npt.ArrayLike, scores: npt.ArrayLike
) -> tuple[IntArray, IntArray, ScoreArray]:
    """The batch as (n,) int64, (n, K) int64, (n, K) float32; ValueError naming what is off."""
    users = np.asarray(user_ids)
    ids = np.asarray(item_ids)
    vals = np.asarray(scores)
    if users.ndim != 1 or ids.ndim != 2 or vals.shape != ids.shape or len(users) != len(ids):
        raise ValueError(
            f"expected user_ids (n,), item_ids (n, K) and scores (n, K); got user_ids "
            f"{users.shape}, item_ids {ids.shape}, scores {vals.shape}"
        )
    for name, arr in (("user_ids", users), ("item_ids", ids)):
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return users.astype(np.int64), ids.astype(np.int64), vals.astype(np.float32)


@contextmanager
def _bar(enabled: bool, *, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over users written (on stderr); yields ``advance(n_users)``."""
    columns = (TextColumn("[bold]precomputed"), BarColumn(), MofNCompleteColumn())
    with Progress(
        *columns, TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled
    ) as bar:
        task = bar.add_task("write", total=total)
        yield lambda n: bar.advance(task, n)


__all__ = [
    "PAD_ID",
    "CorruptValueError",
    "Lookup",
    "Precomputed",
    "PrecomputedStore",
    "Reason",
    "WriteStats",
    "decode",
    "encode",
]
