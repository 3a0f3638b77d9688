"""The user simulator: simulated users whose true preferences are known drive the real service.

``simulate(base_url, preferences, ...)`` sends real HTTP requests (``GET
/v1/recommendations/{user_id}?k=``), decides which shown items each user clicks, and reports the
feedback to ``POST /v1/events`` in batches, as a client of the service would::

    from mlsd.evaluation.preferences import WorldPreferences

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
The examination model and the preferences (:class:`~mlsd.evaluation.preferences.Preferences`:
the simulated world's ground truth, or an oracle fitted on a real dataset) are in
:mod:`mlsd.evaluation.preferences`.

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
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NamedTuple

import httpx
import numpy as np
import numpy.typing as npt
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mlsd.evaluation.preferences import Preferences, log_examination

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

_US_PER_SECOND = 1_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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
        experiment: a label kept in the result: the service runs the experiment its own
            configuration makes active, whatever a client asks, and the answers' arms are
            counted in ``by_arm``.
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
