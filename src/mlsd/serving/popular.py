"""The last-resort recommender: the most popular items the user has not seen yet.

Popularity is the number of distinct users who interacted with an item, optionally only in the
last ``days`` days of the data (counted back from the newest event, not from the wall clock,
so a historical dataset still has a window). Items with no event in the window rank after
those with one, by their all-time count. An item's score is its count of users in the window.

It needs no feature store, index or ranker, so it is always ``ready()``: the service answers
with it when the model fails (DESIGN.md, "request path"), and the tests of the HTTP layer run
against it::

    model = PopularRecommender.from_dataset(Path("data/synthetic"), days=7)
    result = model.recommend(RecommendRequest(user_id=42, k=10, explain=True))
    result.path  # "fallback:popular"

Feedback (``record_events``) goes to a bounded in-memory recent history, so ``history`` shows
it and the next answer excludes those items; popularity itself stays the dataset's snapshot.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import duckdb
import numpy as np
import numpy.typing as npt

from mlsd.data.schema import EVENTS_FILE, ContractError, read_info
from mlsd.serving.recommender import (
    BadRequestError,
    Recommendation,
    RecommendRequest,
    RecommendResult,
)

IntArray = npt.NDArray[np.int64]

_US_PER_DAY = 86_400 * 1_000_000


@dataclass(frozen=True)
class UserHistory:
    """Each user's distinct items, newest first, as CSR arrays.

    Attributes:
        user_ids: (n_users,) sorted user ids.
        offsets: (n_users + 1,) user ``user_ids[i]`` owns ``item_ids[offsets[i]:offsets[i + 1]]``.
        item_ids: (n_pairs,) item ids, each user's newest first.
    """

    user_ids: IntArray
    offsets: IntArray
    item_ids: IntArray

    def items_of(self, user_id: int) -> IntArray:
        """The user's distinct items, newest first; empty for an unknown user."""
        pos = int(np.searchsorted(self.user_ids, user_id))
        if pos == len(self.user_ids) or int(self.user_ids[pos]) != user_id:
            return np.empty(0, dtype=np.int64)
        return self.item_ids[self.offsets[pos] : self.offsets[pos + 1]]

    @classmethod
    def from_sorted_pairs(cls, user_ids: IntArray, item_ids: IntArray) -> UserHistory:
        """Build from (user, item) pairs sorted by user, then newest first."""
        users, starts = np.unique(user_ids, return_index=True)
        offsets = np.append(starts, len(user_ids)).astype(np.int64)
        return cls(users.astype(np.int64), offsets, item_ids.astype(np.int64))


class RecentItems:
    """Items users interacted with since the process started, newest first, bounded in memory.

    Keeps at most ``max_items`` items per user and ``max_users`` users (least recently active
    users are forgotten first). Thread-safe.
    """

    def __init__(self, *, max_users: int = 100_000, max_items: int = 200) -> None:
        self.max_users = max_users
        self.max_items = max_items
        self._items: OrderedDict[int, deque[int]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, user_id: int, item_id: int) -> None:
        with self._lock:
            items = self._items.pop(user_id, None) or deque(maxlen=self.max_items)
            items.append(item_id)
            self._items[user_id] = items
            while len(self._items) > self.max_users:
                self._items.popitem(last=False)

    def get(self, user_id: int) -> list[int]:
        """The user's recent items, newest first (may repeat)."""
        with self._lock:
            items = self._items.get(user_id)
            return list(reversed(items)) if items else []


class PopularRecommender:
    """Most popular unseen items; a complete :class:`~mlsd.serving.recommender.Recommender`.

    Args:
        item_ids: (n_items,) item ids, most popular first.
        user_counts: (n_items,) distinct users per item in the window, aligned with ``item_ids``;
            an item's score.
        history: each user's items from the data (seen items are never recommended).
        version: the version the service reports, e.g. ``"popular:sha256:ab12..."``.
        window_days: the popularity window in days, ``None`` for all the data (for ``reasons``).
        recent: where ``record_events`` keeps feedback; a fresh bounded buffer by default.
        blocklist: item ids never shown (the feed's ``[ranking.rerank] blocklist``: a legal
            takedown holds for the fallback too, which answers exactly when the model fails).
    """

    def __init__(
        self,
        item_ids: Sequence[int] | IntArray,
        user_counts: Sequence[int] | IntArray,
        history: UserHistory,
        *,
        version: str = "popular",
        window_days: float | None = None,
        recent: RecentItems | None = None,
        blocklist: Iterable[int] = (),
    ) -> None:
        if len(item_ids) != len(user_counts):
            raise ValueError(
                f"item_ids ({len(item_ids)}) and user_counts ({len(user_counts)}) differ in length"
            )
        self.version = version
        self.window_days = window_days
        self.history_ = history
        self._items: list[int] = [int(i) for i in item_ids]
        self._counts: list[int] = [int(c) for c in user_counts]
        self._recent = recent or RecentItems()
        self.blocklist = frozenset(int(item) for item in blocklist)

    @classmethod
    def from_dataset(
        cls,
        directory: Path,
        *,
        days: float | None = None,
        event_types: Sequence[str] | None = None,
        version: str | None = None,
        blocklist: Iterable[int] = (),
    ) -> PopularRecommender:
        """Count popularity and histories from a contract directory's ``events.parquet``.

        Args:
            directory: a dataset contract directory.
            days: only count users of the last ``days`` days of the data; ``None``: all of it.
            event_types: only these event types (e.g. ``["click"]``); ``None``: every event.
            version: the reported version; default ``"popular:<content hash prefix>"`` from
                ``dataset.json`` (or ``"popular:<directory name>"`` without one).
            blocklist: item ids never shown.
        """
        path = Path(directory) / EVENTS_FILE
        if not path.is_file():
            raise ContractError(f"{path}: not found; is {directory} a dataset contract directory?")
        if days is not None and days <= 0:
            raise ValueError(f"days must be positive or None, got {days}")
        where = "list_contains($types, event)" if event_types is not None else "true"
        params: dict[str, object] = {"path": str(path)}
        if event_types is not None:
            params["types"] = list(event_types)
        selected = f"sel AS (SELECT * FROM read_parquet($path) WHERE {where})"
        in_window = (
            "true"
            if days is None
            else f"epoch_us(ts) >= (SELECT max(epoch_us(ts)) FROM sel) - {int(days * _US_PER_DAY)}"
        )
        with duckdb.connect() as con:
            popular = con.execute(
                f"""
                WITH {selected}
                SELECT item_id,
                       count(DISTINCT user_id) FILTER (WHERE {in_window}) AS window_users,
                       count(DISTINCT user_id) AS all_users
                FROM sel GROUP BY item_id
                ORDER BY window_users DESC, all_users DESC, item_id
                """,
                params,
            ).fetchnumpy()
            pairs = con.execute(
                f"""
                WITH {selected}
                SELECT user_id, item_id, max(ts) AS last_ts FROM sel
                GROUP BY user_id, item_id ORDER BY user_id, last_ts DESC, item_id
                """,
                params,
            ).fetchnumpy()
        history = UserHistory.from_sorted_pairs(
            np.asarray(pairs["user_id"], dtype=np.int64),
            np.asarray(pairs["item_id"], dtype=np.int64),
        )
        if version is None:
            version = f"popular:{_dataset_tag(Path(directory))}"
        return cls(
            np.asarray(popular["item_id"], dtype=np.int64),
            np.asarray(popular["window_users"], dtype=np.int64),
            history,
            version=version,
            window_days=days,
            blocklist=blocklist,
        )

    def recommend(self, request: RecommendRequest) -> RecommendResult:
        """The ``k`` most popular items the user has not interacted with, best first.

        An unknown or anonymous user gets the overall most popular items minus
        ``request.recent_items``. Raises :class:`BadRequestError` when ``k < 1``.
        """
        if request.k < 1:
            raise BadRequestError(f"k must be at least 1, got {request.k}")
        start = time.perf_counter()
        seen = set(request.recent_items) | self.blocklist
        if request.user_id is not None:
            seen.update(self.history_.items_of(request.user_id).tolist())
            seen.update(self._recent.get(request.user_id))
        picked: list[Recommendation] = []
        for item_id, count in zip(self._items, self._counts, strict=True):
            if item_id in seen:
                continue
            reasons = (self._reason(count),) if request.explain else ()
            picked.append(Recommendation(item_id, float(count), "popular", reasons))
            if len(picked) == request.k:
                break
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        return RecommendResult(
            items=picked,
            path="fallback:popular",
            model_version=self.version,
            stage_ms={"popular": elapsed_ms},
        )

    async def recommend_fast(self, request: RecommendRequest) -> RecommendResult:
        """:meth:`recommend` on the event loop: every answer is in memory (microseconds)."""
        return self.recommend(request)

    def record_events(self, events: Sequence[Mapping[str, object]]) -> int:
        """Remember each event's item as the user's newest; returns the events with integer ids.

        Events are applied in ``ts`` order when they carry one (numeric, epoch seconds).
        """
        valid: list[tuple[float, int, int]] = []
        for event in events:
            user_id, item_id = event.get("user_id"), event.get("item_id")
            if _is_id(user_id) and _is_id(item_id):
                valid.append((_event_time(event), int(user_id), int(item_id)))
        valid.sort(key=lambda row: row[0])  # stable: events without ts keep arrival order, last
        for _, user_id, item_id in valid:
            self._recent.add(user_id, item_id)
        return len(valid)

    def history(self, user_id: int, n: int = 20) -> list[int]:
        """The user's most recent distinct items, newest first: feedback first, then the data."""
        out: dict[int, None] = {}  # ordered set
        for item_id in (*self._recent.get(user_id), *self.history_.items_of(user_id).tolist()):
            if len(out) >= n:
                break
            out[item_id] = None
        return list(out)

    def ready(self) -> bool:
        """Always ready: the popular list and histories are in memory."""
        return True

    def sample_users(self, n: int = 5) -> list[int]:
        """Up to ``n`` user ids with history, spread evenly over the id range (for the UI)."""
        users = self.history_.user_ids
        if n < 1 or len(users) == 0:
            return []
        picks = np.unique(np.linspace(0, len(users) - 1, num=min(n, len(users))).astype(np.int64))
        return [int(u) for u in users[picks]]

    def _reason(self, count: int) -> str:
        window = f"in the last {self.window_days:g} days" if self.window_days else "in the data"
        return f"popular: {count} users interacted with it {window}"


def _is_id(value: object) -> TypeGuard[int | np.integer[Any]]:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _event_time(event: Mapping[str, object]) -> float:
    ts = event.get("ts")
    return float(ts) if isinstance(ts, int | float) and not isinstance(ts, bool) else float("inf")


def _dataset_tag(directory: Path) -> str:
    try:
        info = read_info(directory)
    except ContractError:
        return directory.name
    if info.content_hash:
        return info.content_hash.removeprefix("sha256:")[:12]
    return info.name or directory.name
