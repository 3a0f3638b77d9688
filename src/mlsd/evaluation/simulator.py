"""The user simulator: simulated users whose true preferences are known drive the real service.

``simulate(base_url, preferences, ...)`` sends real HTTP requests (``GET
/v1/recommendations/{user_id}?k=``), decides which shown items each user clicks, and reports the
feedback to ``POST /v1/events`` in batches, as a client of the service would::

    prefs = WorldPreferences.from_dataset(Path("data/synthetic"))
    result = simulate("http://127.0.0.1:8000", prefs, n_users=1000, n_requests=5000,
                      start_ts="2024-03-01", seconds_per_request=1.0, seed=0)
    result.ctr, result.by_model_version["popular:ab12"].ctr

**Who asks.** A panel of ``n_users`` distinct users is drawn (without replacement, uniformly)
among the users active at ``start_ts``; request ``i`` happens at simulated time ``start_ts + i *
seconds_per_request`` and is made by a panel member drawn by activity *at that time*, so an
activity drift shows. Each user's share of the requests is then proportional to their activity,
as real users' visits are (a world's sessions are). Drawing the panel by activity too would
weight a heavy user twice (more likely in the panel, then more requests): measured on the
closed-loop world (3,000 users, a panel of 1,000), the median requester had 250 past events
against 160 for the world's own sessions, and the feature-drift monitor saw that as drift.

**Who clicks** (the position-based model). The user examines position ``p`` (0-based) with
probability ``examination(p)``, by default ``1 / log2(p + 2)`` (1, 0.63, 0.5, ... the DCG
discount), and clicks an examined item with its true preference probability; the two draws are
independent, so ``P(click) = examination(p) * preference``. ``expected_clicks`` sums those
probabilities over every exposure: observed clicks must agree with it within binomial noise.

**Whose preferences** (:class:`Preferences`):

- :class:`WorldPreferences`, the simulated world's ground truth (:meth:`World.click_probability`
  at the simulated time), read from ``world.json`` + ``world.npz`` beside the dataset. A world
  with ``drift_at`` changes tastes (or who is active) when the simulated clock passes it; to
  simulate one regime whatever the clock, pass ``force_regime="before"`` or ``"after"``.
- :class:`OraclePreferences` for a real dataset: EASE fitted on *all* its events, test period
  included, plays the users (see the class for the score → probability mapping).

Events sent: a ``view`` per item the user examined (``views="examined"``, the default;
``"shown"``: one per shown item) and a ``click`` per click, with the request's simulated time as
``ts`` and the answer's ``request_id`` (so the service log attributes each click to its exposure
exactly). A view is what a world's event log calls one: an item the user went through in a
session (a synthetic world's sessions hold ~6), so the service's online features (events per
window, session sizes) count the same thing live as in the training data; a view per *shown*
item (10 per request, examined or not) made the live users look about twice as active. What the
service showed, it logs itself (``exposures``). Failures (non-2xx answers, timeouts, refused
connections) are counted in the result, never raised.

**Seeds.** The run is a function of ``(seed, start_ts)`` and of what the service answers. Use a
fresh seed for each run against the same service: a service that learned from a run's clicks
answers a rerun of the same draws with lists correlated with them, and the clicks come out
biased (3 to 6 sigmas below ``expected_clicks`` in a measured second same-seed run).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, Self

import httpx
import numpy as np
import numpy.typing as npt
import pandas as pd
import scipy.sparse as sp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mlsd.data.schema import EVENTS_FILE, ContractError
from mlsd.data.sources.world import World, as_us

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
Regime = Literal["before", "after"]

_US_PER_SECOND = 1_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def log_examination(position: int) -> float:
    """P(the user looks at 0-based ``position``) = ``1 / log2(position + 2)``."""
    return 1.0 / math.log2(position + 2)


class Preferences(Protocol):
    """What users want: who is active when, and the true click probability of an exposure."""

    name: str

    def population(self, ts_us: int) -> tuple[IntArray, FloatArray]:
        """All user ids and their relative activity at ``ts_us`` (µs since the epoch).

        The ids (and their order) must not depend on the time; only the weights may.
        """
        ...

    def click_probability(
        self, user_ids: npt.ArrayLike, item_ids: npt.ArrayLike, ts_us: npt.ArrayLike
    ) -> FloatArray:
        """(n,) P(click | the user examines the item) at ``ts_us``; unknown ids give 0."""
        ...


# ---------------------------------------------------------------- the simulated world


class WorldPreferences:
    """The simulated world's ground truth.

    Args:
        world: the world, e.g. ``World.load(dataset_dir)``.
        force_regime: ``None`` follows the clock (a world with ``drift_at`` switches when the
            simulated time passes it); ``"before"`` / ``"after"`` use that regime's tastes and
            activity at every time (``"after"`` needs a world with ``drift_at``). The time of
            day, weekday and item freshness still follow the clock.
    """

    def __init__(self, world: World, *, force_regime: Regime | None = None) -> None:
        if force_regime not in (None, "before", "after"):
            raise ValueError(f"force_regime={force_regime!r}: expected None, 'before' or 'after'")
        if force_regime == "after" and world.config.drift_at is None:
            raise ValueError(
                "force_regime='after': this world has no drift_at; synthesize one with "
                "WorldConfig(drift_at=...) (mlsd data synth --drift-at ...)"
            )
        self.force_regime = force_regime
        self.world = world if force_regime is None else _fixed_regime(world, force_regime)
        self.name = "world" if force_regime is None else f"world ({force_regime} drift)"
        self._user_ids = np.arange(1, world.config.n_users + 1, dtype=np.int64)

    @classmethod
    def from_dataset(cls, directory: Path, *, force_regime: Regime | None = None) -> Self:
        """Load the world saved beside a synthetic dataset (``world.json`` + ``world.npz``)."""
        return cls(World.load(Path(directory)), force_regime=force_regime)

    def population(self, ts_us: int) -> tuple[IntArray, FloatArray]:
        world = self.world
        drift = world.config.drift_us
        after = drift is not None and ts_us >= drift
        return self._user_ids, world.user_activity_after if after else world.user_activity

    def click_probability(
        self, user_ids: npt.ArrayLike, item_ids: npt.ArrayLike, ts_us: npt.ArrayLike
    ) -> FloatArray:
        users, items = np.asarray(user_ids, np.int64), np.asarray(item_ids, np.int64)
        ts = np.broadcast_to(as_us(ts_us), users.shape)
        cfg = self.world.config
        known = (users >= 1) & (users <= cfg.n_users) & (items >= 1) & (items <= cfg.n_items)
        probs = np.zeros(len(users))
        probs[known] = self.world.click_probability(users[known], items[known], ts[known])
        return probs


def _fixed_regime(world: World, regime: Regime) -> World:
    """A copy of ``world`` without drift whose tastes and activity are those of ``regime``."""
    taste = world.user_taste_after if regime == "after" else world.user_taste
    activity = world.user_activity_after if regime == "after" else world.user_activity
    # The click bias stays: World.create calibrates it on the pre-drift regime for both.
    return dataclasses.replace(
        world,
        config=dataclasses.replace(world.config, drift_at=None),
        user_taste=taste,
        user_taste_after=taste,
        user_activity=activity,
        user_activity_after=activity,
    )


# ---------------------------------------------------------------- an oracle for real data


@dataclass(frozen=True)
class OracleConfig:
    """How the oracle scores and calibrates.

    Attributes:
        l2: EASE's ridge weight λ.
        sharpness: slope of the logistic on the user-standardised score; larger means users
            tell good from bad items more sharply.
        target_ctr: mean P(click | examined) over the oracle's own top-``calibration_k`` lists.
        calibration_k: the list length of that mean.
        calibration_users: users (drawn uniformly, weighted by activity) the bias is fitted on.
        max_items: refuse catalogs above this (EASE inverts an items × items matrix).
        event_types: only these events are interactions (e.g. ``("click",)``); ``None``: all.
        seed: for the calibration sample.
    """

    l2: float = 200.0
    sharpness: float = 0.5
    target_ctr: float = 0.05
    calibration_k: int = 10
    calibration_users: int = 1_000
    max_items: int = 20_000
    event_types: tuple[str, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.target_ctr < 1.0:
            raise ValueError(f"OracleConfig.target_ctr={self.target_ctr}: must lie in (0, 1)")
        if self.sharpness <= 0 or self.l2 <= 0:
            raise ValueError("OracleConfig.sharpness and OracleConfig.l2 must be > 0")
        if self.calibration_k < 1 or self.calibration_users < 1:
            raise ValueError("OracleConfig.calibration_k and calibration_users must be >= 1")


class OraclePreferences:
    """A model fitted on *all* of a dataset's events plays its users' preferences.

    The model is EASE (:func:`mlsd.models.retrieval.ease.ease_weights`) on the binary users ×
    items matrix of every event, test period included; a user's raw score of item ``i`` is
    ``s = x_u · B[:, i]``. Raw scores grow with the user's history, so each is standardised
    over the catalog for its user, ``z = (s - mean_u) / std_u``, and mapped to a probability
    with one monotone logistic::

        P(click | examined) = sigmoid(bias_ + sharpness * z)

    ``bias_`` is found by bisection so that the mean probability over the oracle's own top-10
    (``calibration_k``) lists, averaged over users weighted by their event counts, equals
    ``target_ctr`` — a perfect recommender gets that CTR at examined positions, any real list
    less. ``sharpness`` sets how much worse: on ML-100K with the defaults (fit in about 0.5 s)
    the mean P(click | examined) is 0.05 on the oracle's top-10, 0.033 on the ten most popular
    items a user had not rated before the last 20% of time, 0.023 on the user's items rated in
    that last 20%, and 0.005 on random items.

    Users are drawn in proportion to their event counts; the activity does not change in time.
    Ids the oracle never saw (users or items without events) have probability 0.
    """

    name = "oracle (EASE on all events)"

    user_ids_: IntArray  # (n_users,) sorted
    item_ids_: IntArray  # (n_items,) sorted, items with events
    user_events_: FloatArray  # (n_users,) events per user: the activity
    user_items_: sp.csr_matrix  # (n_users, n_items) binary float32
    weights_: npt.NDArray[np.float32]  # (n_items, n_items) EASE B
    score_mean_: FloatArray  # (n_users,) mean raw score over the catalog
    score_std_: FloatArray  # (n_users,)
    bias_: float

    def __init__(self, config: OracleConfig | None = None) -> None:
        self.config = config or OracleConfig()

    @classmethod
    def from_dataset(cls, directory: Path, config: OracleConfig | None = None) -> Self:
        """Fit on ``events.parquet`` of a contract directory."""
        path = Path(directory) / EVENTS_FILE
        if not path.is_file():
            raise ContractError(f"{path}: not found; is {directory} a dataset contract directory?")
        events = pd.read_parquet(path, columns=["user_id", "item_id", "event"])
        return cls(config).fit(events)

    def fit(self, events: pd.DataFrame) -> Self:
        """Fit on ``events`` (``user_id``, ``item_id``; ``event`` when filtering by type)."""
        from threadpoolctl import threadpool_limits

        from mlsd.models.retrieval.ease import ease_weights

        cfg = self.config
        if cfg.event_types is not None:
            events = events[events["event"].isin(cfg.event_types)]
        if events.empty:
            raise ValueError("OraclePreferences.fit: no events (of the chosen event_types)")
        users, user_rows = np.unique(events["user_id"].to_numpy(np.int64), return_inverse=True)
        items, item_cols = np.unique(events["item_id"].to_numpy(np.int64), return_inverse=True)
        if len(items) > cfg.max_items:
            raise ValueError(
                f"OraclePreferences: {len(items):,} items have events, above max_items="
                f"{cfg.max_items:,}; EASE needs {len(items) ** 2 * 4 / 1e9:.1f} GB. Raise "
                "OracleConfig.max_items if the memory is there, or use a smaller dataset."
            )
        counts = sp.csr_matrix(
            (np.ones(len(events), np.float32), (user_rows, item_cols)),
            shape=(len(users), len(items)),
        )
        self.user_events_ = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
        counts.data[:] = 1.0  # binary: repeated events of a pair count once
        self.user_ids_, self.item_ids_, self.user_items_ = users, items, counts
        with threadpool_limits(limits=1, user_api="blas"):  # see EASERetriever.num_threads
            self.weights_ = ease_weights(counts, cfg.l2)
            self._fit_standardisation()
            self.bias_ = self._calibrated_bias()
        return self

    def _score_rows(self, rows: IntArray) -> npt.NDArray[np.float32]:
        return np.asarray(self.user_items_[rows] @ self.weights_)

    def _fit_standardisation(self, chunk: int = 1024) -> None:
        mean, std = np.empty(len(self.user_ids_)), np.empty(len(self.user_ids_))
        for start in range(0, len(self.user_ids_), chunk):
            scores = self._score_rows(np.arange(start, min(start + chunk, len(mean))))
            mean[start : start + len(scores)] = scores.mean(axis=1)
            std[start : start + len(scores)] = scores.std(axis=1)
        self.score_mean_, self.score_std_ = mean, np.maximum(std, 1e-12)

    def _calibrated_bias(self) -> float:
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        n = min(cfg.calibration_users, len(self.user_ids_))
        rows = np.sort(rng.choice(len(self.user_ids_), n, replace=False))
        k = min(cfg.calibration_k, len(self.item_ids_))
        z = self._standardised(rows[:, None], self._score_rows(rows))
        top = -np.partition(-z, k - 1, axis=1)[:, :k]
        weights = self.user_events_[rows] / self.user_events_[rows].sum()
        lo, hi = -50.0, 50.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            mean = float(weights @ _sigmoid(mid + cfg.sharpness * top).mean(axis=1))
            lo, hi = (mid, hi) if mean < cfg.target_ctr else (lo, mid)
        return 0.5 * (lo + hi)

    def _standardised(self, rows: IntArray, scores: npt.ArrayLike) -> FloatArray:
        out: FloatArray = (np.asarray(scores, np.float64) - self.score_mean_[rows]) / (
            self.score_std_[rows]
        )
        return out

    def scores(
        self, user_ids: npt.ArrayLike, item_ids: npt.ArrayLike, *, chunk: int = 2048
    ) -> FloatArray:
        """(n,) user-standardised scores z of known (user, item) pairs; NaN for unknown ids."""
        users, items = np.asarray(user_ids, np.int64), np.asarray(item_ids, np.int64)
        rows, cols = _lookup(self.user_ids_, users), _lookup(self.item_ids_, items)
        known = (rows >= 0) & (cols >= 0)
        out = np.full(len(users), np.nan)
        where = np.flatnonzero(known)
        for start in range(0, len(where), chunk):  # a chunk gathers chunk x n_items weights
            pairs = where[start : start + chunk]
            r, c = rows[pairs], cols[pairs]
            raw = self.user_items_[r].multiply(self.weights_[:, c].T).sum(axis=1)
            out[pairs] = self._standardised(r, np.asarray(raw).ravel())
        return out

    def top_items(self, user_ids: npt.ArrayLike, k: int) -> IntArray:
        """(n, k) the oracle's best items per (known) user, best first; seen items included."""
        rows = _lookup(self.user_ids_, np.asarray(user_ids, np.int64))
        if (rows < 0).any():
            raise ValueError("OraclePreferences.top_items: unknown user ids")
        scores = self._score_rows(rows)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        out: IntArray = self.item_ids_[top]
        return out

    def population(self, ts_us: int) -> tuple[IntArray, FloatArray]:
        return self.user_ids_, self.user_events_

    def click_probability(
        self, user_ids: npt.ArrayLike, item_ids: npt.ArrayLike, ts_us: npt.ArrayLike
    ) -> FloatArray:
        z = self.scores(user_ids, item_ids)
        probs = _sigmoid(self.bias_ + self.config.sharpness * np.nan_to_num(z))
        out: FloatArray = np.where(np.isnan(z), 0.0, probs)
        return out


def _lookup(sorted_ids: IntArray, ids: IntArray) -> IntArray:
    """Position of each id in ``sorted_ids``, -1 when absent."""
    pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return np.where(sorted_ids[pos] == ids, pos, -1).astype(np.int64)


def _sigmoid(x: npt.ArrayLike) -> FloatArray:
    out: FloatArray = 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))
    return out


# ---------------------------------------------------------------- the result


@dataclass(frozen=True)
class GroupStats:
    """Exposures and clicks of one group of answered requests (an arm, a version, a path)."""

    requests: int = 0
    exposures: int = 0
    clicks: int = 0
    expected_clicks: float = 0.0

    @property
    def ctr(self) -> float:
        """Clicks per exposure (0 without exposures)."""
        return self.clicks / self.exposures if self.exposures else 0.0

    @property
    def expected_ctr(self) -> float:
        """True click probability per exposure of what was served: the CTR without the noise
        of the click draws (a sharper comparison of arms or of before/after drift)."""
        return self.expected_clicks / self.exposures if self.exposures else 0.0

    def plus(self, exposures: int, clicks: int, expected: float) -> GroupStats:
        """These counts plus one answered request."""
        return GroupStats(
            self.requests + 1,
            self.exposures + exposures,
            self.clicks + clicks,
            self.expected_clicks + expected,
        )

    def to_dict(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "ctr": self.ctr, "expected_ctr": self.expected_ctr}


NO_ARM = "-"
"""The arm of a response that names none."""


@dataclass(frozen=True)
class SimulationResult:
    """What the simulated users saw and did, and what the client measured.

    Attributes:
        requests: recommendation requests sent; ``answered`` of them got a 2xx.
        errors: requests that failed, ``errors_by_kind`` e.g. ``{"http 503": 3, "timeout": 1}``.
        total: exposures (items shown), clicks and expected clicks over answered requests.
        by_arm, by_model_version, by_path: the same per group (``"-"``: no arm in the answer).
        clicks_by_position, exposures_by_position, expected_clicks_by_position: (k,) lists.
        latency_ms: client-side latency of answered requests: p50, p90, p99, max, mean.
        events_sent, events_accepted, event_errors: feedback events posted, the service's
            ``accepted`` counts, and failed batches.
        start, end: the simulated clock (ISO, UTC) at the first and after the last request.
        wall_seconds: how long the simulation took.
    """

    preferences: str
    experiment: str | None
    requests: int
    answered: int
    errors: int
    errors_by_kind: dict[str, int]
    total: GroupStats
    by_arm: dict[str, GroupStats]
    by_model_version: dict[str, GroupStats]
    by_path: dict[str, GroupStats]
    clicks_by_position: list[int]
    exposures_by_position: list[int]
    expected_clicks_by_position: list[float]
    latency_ms: dict[str, float]
    events_sent: int
    events_accepted: int
    event_errors: int
    start: str
    end: str
    wall_seconds: float

    @property
    def exposures(self) -> int:
        return self.total.exposures

    @property
    def clicks(self) -> int:
        return self.total.clicks

    @property
    def expected_clicks(self) -> float:
        """Sum of the true click probabilities of every exposure (position bias included)."""
        return self.total.expected_clicks

    @property
    def ctr(self) -> float:
        return self.total.ctr

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; every :class:`GroupStats` carries its ``ctr`` and ``expected_ctr``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, GroupStats):
                value = value.to_dict()
            elif f.name.startswith("by_"):
                value = {key: stats.to_dict() for key, stats in value.items()}
            out[f.name] = value
        return out


class _Tally:
    """The running counts, shared by the worker threads (under a lock)."""

    def __init__(self, k: int) -> None:
        self.lock = threading.Lock()
        self.total = GroupStats()
        self.groups: dict[str, dict[str, GroupStats]] = {"arm": {}, "version": {}, "path": {}}
        self.clicks = np.zeros(k, np.int64)
        self.exposures = np.zeros(k, np.int64)
        self.expected = np.zeros(k)
        self.errors: dict[str, int] = {}
        self.latency_ms: list[float] = []

    def error(self, kind: str) -> None:
        with self.lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def add(
        self,
        keys: dict[str, str],
        clicked: npt.NDArray[np.bool_],
        expected: FloatArray,
        latency_ms: float,
    ) -> None:
        n, c, e = len(clicked), int(clicked.sum()), float(expected.sum())
        with self.lock:
            self.total = self.total.plus(n, c, e)
            for group, key in keys.items():
                self.groups[group][key] = self.groups[group].get(key, GroupStats()).plus(n, c, e)
            self.clicks[:n] += clicked
            self.exposures[:n] += 1
            self.expected[:n] += expected
            self.latency_ms.append(latency_ms)


class _EventSender:
    """Buffers feedback events and posts them to ``/v1/events`` in batches."""

    def __init__(self, client: httpx.Client, batch_size: int) -> None:
        self.client, self.batch_size = client, batch_size
        self.lock = threading.Lock()
        self.buffer: list[dict[str, Any]] = []
        self.sent = self.accepted = self.errors = 0

    def add(self, events: Iterable[dict[str, Any]]) -> None:
        with self.lock:
            self.buffer.extend(events)
            if len(self.buffer) < self.batch_size:
                return
            batch, self.buffer = self.buffer, []
        self._post(batch)

    def flush(self) -> None:
        with self.lock:
            batch, self.buffer = self.buffer, []
        for start in range(0, len(batch), self.batch_size):
            self._post(batch[start : start + self.batch_size])

    def _post(self, batch: list[dict[str, Any]]) -> None:
        accepted, failed = 0, 0
        try:
            response = self.client.post("/v1/events", json=batch)
            if response.is_success:
                accepted = int(response.json().get("accepted", 0))
            else:
                failed = 1
        except (httpx.HTTPError, ValueError):
            failed = 1
        with self.lock:
            self.sent += len(batch)
            self.accepted += accepted
            self.errors += failed


# ---------------------------------------------------------------- the simulation


def simulate(
    base_url: str,
    preferences: Preferences,
    *,
    n_users: int,
    n_requests: int,
    k: int = 10,
    start_ts: datetime | str | int,
    seconds_per_request: float = 1.0,
    seed: int = 0,
    concurrency: int = 1,
    experiment: str | None = None,
    progress: bool = True,
    examination: Callable[[int], float] = log_examination,
    send_views: bool = True,
    views: Literal["examined", "shown"] = "examined",
    event_batch_size: int = 500,
    timeout_s: float = 10.0,
) -> SimulationResult:
    """Drive the service at ``base_url`` with simulated users; see the module docstring.

    Args:
        start_ts: the simulated time of the first request: ISO string, datetime (naive is
            UTC) or int µs since the epoch.
        seconds_per_request: simulated seconds between consecutive requests.
        seed: the panel, the user of each request and the click draws follow from it and
            ``start_ts``. Give each run against the same service its own seed (or start): a
            service that learned from one run's clicks (e.g. stopped showing clicked items)
            serves lists correlated with a rerun of the same draws, which biases the clicks
            (measured: 3 to 6 sigmas below ``expected_clicks`` on a second same-seed run).
        concurrency: requests in flight at once (threads sharing one HTTP client).
        experiment: sent as the ``experiment`` query parameter and kept in the result.
        examination: P(examine 0-based position); ``1 / log2(p + 2)`` by default.
        send_views: also post ``view`` events (clicks are always posted).
        views: which items get a ``view``: those the user examined (the position-bias draw
            that precedes the click draw), or every shown item.
    """
    if views not in ("examined", "shown"):
        raise ValueError(f"views={views!r}: expected 'examined' or 'shown'")
    if n_users < 1 or n_requests < 1 or k < 1 or concurrency < 1 or event_batch_size < 1:
        raise ValueError("n_users, n_requests, k, concurrency and event_batch_size must be >= 1")
    if seconds_per_request < 0:
        raise ValueError(f"seconds_per_request={seconds_per_request}: must be >= 0")
    start_us = _to_us(start_ts)
    rng = np.random.default_rng([seed, start_us & (2**64 - 1)])  # see the Args on seed
    step_us = np.arange(n_requests) * seconds_per_request * _US_PER_SECOND
    ts = start_us + step_us.astype(np.int64)
    users = _schedule_users(preferences, n_users, ts, rng)
    exam = np.array([examination(p) for p in range(k)], dtype=np.float64)
    params: dict[str, str | int] = {"k": k}
    if experiment is not None:
        params["experiment"] = experiment
    tally = _Tally(k)
    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency)
    started = time.perf_counter()
    with httpx.Client(base_url=base_url, timeout=timeout_s, limits=limits) as client:
        sender = _EventSender(client, event_batch_size)

        def one(request: _Request) -> None:
            posted: Literal["examined", "shown", "none"] = views if send_views else "none"
            _one_request(client, sender, tally, preferences, request, exam, params, posted)

        requests = (
            # (examine, click) draws per position, drawn in request order whatever the threads do
            _Request(int(user), int(t), rng.random((k, 2)))
            for user, t in zip(users, ts, strict=True)
        )
        _run_bounded(one, requests, n_requests, concurrency=concurrency, progress=progress)
        sender.flush()
    wall = time.perf_counter() - started
    latency = np.asarray(tally.latency_ms)
    return SimulationResult(
        preferences=preferences.name,
        experiment=experiment,
        requests=n_requests,
        answered=tally.total.requests,
        errors=sum(tally.errors.values()),
        errors_by_kind=dict(sorted(tally.errors.items())),
        total=tally.total,
        by_arm=dict(sorted(tally.groups["arm"].items())),
        by_model_version=dict(sorted(tally.groups["version"].items())),
        by_path=dict(sorted(tally.groups["path"].items())),
        clicks_by_position=tally.clicks.tolist(),
        exposures_by_position=tally.exposures.tolist(),
        expected_clicks_by_position=tally.expected.tolist(),
        latency_ms=_latency_summary(latency),
        events_sent=sender.sent,
        events_accepted=sender.accepted,
        event_errors=sender.errors,
        start=_iso(start_us),
        end=_iso(start_us + int(n_requests * seconds_per_request * _US_PER_SECOND)),
        wall_seconds=wall,
    )


def _run_bounded(
    fn: Callable[[_Request], None],
    requests: Iterable[_Request],
    total: int,
    *,
    concurrency: int,
    progress: bool,
) -> None:
    """``fn`` on every request with ``concurrency`` threads, a bounded number queued at once."""
    columns = (TextColumn("[bold]simulate"), BarColumn(), MofNCompleteColumn())
    with (
        Progress(
            *columns, TimeRemainingColumn(), console=Console(stderr=True), disable=not progress
        ) as bar,
        ThreadPoolExecutor(max_workers=concurrency) as pool,
    ):
        task = bar.add_task("requests", total=total)
        pending: set[Future[None]] = set()
        for request in requests:
            if len(pending) >= 4 * concurrency:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()  # _one_request tallies failures; anything else is a bug
                bar.advance(task, len(done))
            pending.add(pool.submit(fn, request))
        for future in pending:
            future.result()
        bar.advance(task, len(pending))


class _Request(NamedTuple):
    user_id: int
    ts_us: int
    uniforms: FloatArray  # (k, 2): the examine and click draws per position


def _one_request(
    client: httpx.Client,
    sender: _EventSender,
    tally: _Tally,
    preferences: Preferences,
    request: _Request,
    exam: FloatArray,
    params: dict[str, str | int],
    views: Literal["examined", "shown", "none"],
) -> None:
    """One request: ask, decide clicks, tally, queue the events. Failures are tallied."""
    user_id, ts_us, uniforms = request
    began = time.perf_counter()
    try:
        # ``now``: the service computes time features (ages, recency) at the simulated clock.
        at = {**params, "now": ts_us / _US_PER_SECOND}
        response = client.get(f"/v1/recommendations/{user_id}", params=at)
    except httpx.TimeoutException:
        tally.error("timeout")
        return
    except httpx.HTTPError as exc:
        tally.error(type(exc).__name__)
        return
    latency_ms = (time.perf_counter() - began) * 1000.0
    if not response.is_success:
        tally.error(f"http {response.status_code}")
        return
    try:
        body = response.json()
        items = np.array([int(item["item_id"]) for item in body["items"]], dtype=np.int64)
        keys = {"arm": _arm(body), "version": str(body["model_version"]), "path": str(body["path"])}
    except (ValueError, KeyError, TypeError):
        tally.error("malformed answer")
        return
    items = items[: len(exam)]
    n = len(items)
    probs = preferences.click_probability(np.full(n, user_id), items, np.full(n, ts_us))
    examined = uniforms[:n, 0] < exam[:n]
    clicked = examined & (uniforms[:n, 1] < probs)
    tally.add(keys, clicked, exam[:n] * probs, latency_ms)
    rid = body.get("request_id")
    common = {"user_id": user_id, "value": 1.0, "ts": _iso(ts_us)}
    if isinstance(rid, str) and rid:
        common["request_id"] = rid  # attributes the event to this exposure exactly
    seen = {"examined": items[examined], "shown": items, "none": items[:0]}[views]
    events = [{**common, "item_id": int(item), "event": "view"} for item in seen]
    events += [{**common, "item_id": int(item), "event": "click"} for item in items[clicked]]
    if events:
        sender.add(events)


def _arm(body: dict[str, Any]) -> str:
    """The experiment arm an answer names (``arm``, ``experiment_arm`` or ``experiment.arm``)."""
    experiment = body.get("experiment")
    arm = body.get("arm") or body.get("experiment_arm")
    if arm is None and isinstance(experiment, dict):
        arm = experiment.get("arm")
    return NO_ARM if arm is None else str(arm)


def _schedule_users(
    preferences: Preferences, n_users: int, ts: IntArray, rng: np.random.Generator
) -> IntArray:
    """The user of each request: a panel drawn uniformly among the users active at ``ts[0]``,
    members drawn by activity at ts (so requests per user are proportional to activity)."""
    ids, weights = preferences.population(int(ts[0]))
    active = np.flatnonzero(weights > 0)
    if len(active) == 0:
        raise ValueError(f"{preferences.name}: no user has positive activity at the start")
    panel = np.sort(rng.choice(active, min(n_users, len(active)), replace=False))
    # population() returns the same arrays while the regime holds: one CDF per regime.
    regimes: dict[int, tuple[FloatArray, list[int]]] = {}
    for i, t in enumerate(ts.tolist()):
        _, w = preferences.population(t)
        regimes.setdefault(id(w), (w, []))[1].append(i)
    users = np.empty(len(ts), np.int64)
    for w, requests in regimes.values():
        cdf = np.cumsum(w[panel])
        if cdf[-1] <= 0:
            raise ValueError(f"{preferences.name}: no panel member is active at some request")
        draws = np.searchsorted(cdf, rng.random(len(requests)) * cdf[-1], side="right")
        users[requests] = ids[panel[np.minimum(draws, len(panel) - 1)]]
    return users


def _latency_summary(latency: FloatArray) -> dict[str, float]:
    if len(latency) == 0:
        return {}
    p50, p90, p99 = (float(p) for p in np.percentile(latency, [50, 90, 99]))
    return {
        "p50": p50,
        "p90": p90,
        "p99": p99,
        "max": float(latency.max()),
        "mean": float(latency.mean()),
    }


def _to_us(value: datetime | str | int) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    from mlsd.data.split import parse_timestamp

    return int(parse_timestamp(value).value) // 1_000  # .value is always ns


def _iso(us: int) -> str:
    return (_EPOCH + timedelta(microseconds=us)).isoformat().replace("+00:00", "Z")
