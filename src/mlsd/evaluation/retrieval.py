"""Offline evaluation of candidate sources and of their merge, under DESIGN.md's protocol.

Global temporal split at ``t1 < t2`` (the cut points of :mod:`mlsd.data.split`):

1. Validation: every source is fit on events before ``t1`` and recommends for the users active
   in ``[t1, t2)``; the merge quotas are grid-searched there on recall@``tune_k``.
2. Test: every source is refit on everything before ``t2`` and scored on the users active at or
   after ``t2``, the merged set with the quotas from step 1. The test window picks nothing.

Each user's list ranks **all** catalog items they had not interacted with before the cutoff
(full ranking, ``exclude_seen=True``); the relevant items are their test-window items they had
not interacted with before it (an already-seen item is excluded from ranking, so it cannot be
relevant). Users without such an item are left out and counted. Users with no event before the
cutoff are cold and get each method's fallback; warm, cold and all users are reported
separately, each mean with a 95% bootstrap interval over users.

    report = evaluate_retrieval(Path("data/ml-100k"), {"popularity": PopularityRetriever})
    print(report.to_json())
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
from rich.console import Console
from rich.progress import Progress

from mlsd.data.schema import EVENTS_FILE, ITEMS_FILE, USERS_FILE, read_info
from mlsd.data.split import SplitSpec, cut_points
from mlsd.evaluation.metrics import bootstrap_mean_ci, ndcg_at_k_score, recall_at_k_score
from mlsd.models.retrieval.base import IntArray, RetrievalData, Retriever
from mlsd.models.retrieval.merge import Quota, merge_candidates, quota_counts

SourceFactory = Callable[[], Retriever]
"""Makes a fresh, unfitted retriever (each window fits its own)."""

MERGED = "merged"
SEGMENTS = ("all", "warm", "cold")
"""The user groups every metric is reported on."""


@dataclass(frozen=True)
class ProtocolConfig:
    """Cut points, cutoffs and statistics of the evaluation (``[retrieval]`` in the config).

    Attributes:
        val_frac, test_frac: the windows' shares, cut as :func:`mlsd.data.split.cut_points`.
        split_by: ``"events"`` (quantiles of event times) or ``"time"`` (fractions of the span).
        ks: recall cutoffs; the lists are ``max(ks)`` long.
        ndcg_k: the NDCG cutoff.
        min_value: relevant test events need ``value >= min_value`` (e.g. 4 stars: the "liked"
            variant); ``None`` counts every event.
        n_bootstrap: bootstrap resamples of the users.
        confidence: coverage of the intervals.
        seed: seeds the bootstrap and the sample of tuning users.
    """

    val_frac: float = 0.1
    test_frac: float = 0.2
    split_by: Literal["events", "time"] = "events"
    ks: tuple[int, ...] = (50, 100, 200, 500)
    ndcg_k: int = 10
    min_value: float | None = None
    n_bootstrap: int = 1000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.ks or min(self.ks) < 1 or self.ndcg_k < 1:
            raise ValueError(f"ks and ndcg_k must be >= 1, got ks={self.ks}, ndcg_k={self.ndcg_k}")
        if self.n_bootstrap < 1 or not 0.0 < self.confidence < 1.0:
            raise ValueError(
                f"n_bootstrap must be >= 1 and confidence in (0, 1), got {self.n_bootstrap}, "
                f"{self.confidence}"
            )


@dataclass(frozen=True)
class MergeConfig:
    """How the sources are merged (``[retrieval.merge]``).

    Attributes:
        tune: grid-search the quotas on the validation window; otherwise use ``quotas``.
        tune_k: the list length whose validation recall the search maximises.
        quota_step: grid step of the fractions (0.1: every split of 10 tenths over the sources).
        max_tune_users: validation users sampled for the search (bounds its time).
        quotas: fixed quotas (fractions of k or counts) when ``tune`` is off; default equal.
    """

    tune: bool = True
    tune_k: int = 200
    quota_step: float = 0.1
    max_tune_users: int = 5000
    quotas: Mapping[str, Quota] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tune_k < 1 or self.max_tune_users < 1:
            raise ValueError("tune_k and max_tune_users must be >= 1")
        quota_grid(["a"], self.quota_step)  # checks that the step divides 1
        quota_counts(list(self.quotas.values()), 1)  # checks the quota values


@dataclass(frozen=True)
class Estimate:
    """A mean over users with its bootstrap interval."""

    mean: float
    low: float
    high: float


@dataclass(frozen=True)
class MethodResult:
    """One source (or the merged set) on the test window.

    Attributes:
        name: the source name, or ``"merged"``.
        fit_seconds: wall seconds of the fit on everything before ``t2`` (merged: the sum).
        recommend_seconds: wall seconds to recommend for every test user.
        metrics: segment (``all``, ``warm``, ``cold``) → metric (``recall@50``, ``ndcg@10``)
            → estimate; ``None`` for an empty segment.
    """

    name: str
    fit_seconds: float
    recommend_seconds: float
    metrics: dict[str, dict[str, Estimate | None]]


@dataclass(frozen=True)
class ValidationResult:
    """The quota search on the validation window (sources fit before ``t1``).

    Attributes:
        n_users: validation users with a relevant item (``n_tune_users`` of them searched).
        recall: name → mean validation recall@``tune_k`` (sources and the tuned merge).
        quotas: the chosen fractions of k.
        n_candidates: quota vectors tried.
    """

    n_users: int
    n_tune_users: int
    tune_k: int
    recall: dict[str, float]
    quotas: dict[str, float]
    n_candidates: int


@dataclass(frozen=True)
class RetrievalReport:
    """Everything :func:`evaluate_retrieval` measured; ``to_json`` for the record."""

    protocol: str
    dataset: str
    t1: str
    t2: str
    counts: dict[str, int]
    ks: tuple[int, ...]
    ndcg_k: int
    methods: list[MethodResult]
    quotas: dict[str, Quota]
    validation: ValidationResult | None

    def method(self, name: str) -> MethodResult:
        """The result of one source, or of ``"merged"``."""
        for result in self.methods:
            if result.name == name:
                return result
        raise KeyError(f"no method {name!r}; have {[m.name for m in self.methods]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready nested dicts; NaN becomes None."""
        raw: dict[str, Any] = _finite(dataclasses.asdict(self))
        return raw

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _finite(value: Any) -> Any:
    """NaN/inf → None, so the JSON is standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def protocol_text(protocol: ProtocolConfig) -> str:
    """The protocol in one paragraph, for every report."""
    liked = "" if protocol.min_value is None else f" with value >= {protocol.min_value}"
    return (
        f"global temporal split by {protocol.split_by} (val_frac={protocol.val_frac}, "
        f"test_frac={protocol.test_frac}): quotas tuned on validation [t1, t2) with sources fit "
        "on ts < t1; final numbers from sources refit on ts < t2 and scored on the test window "
        "ts >= t2. Full ranking over every catalog item the user had not interacted with before "
        f"t2; relevant = the user's test-window items{liked} not interacted with before t2 "
        "(already-seen items are excluded from ranking, so they cannot be relevant); users "
        "without a relevant item are left out. Cold users (no event before t2) get each "
        f"method's fallback. Means over users with {protocol.confidence:.0%} bootstrap "
        f"intervals ({protocol.n_bootstrap} resamples, seed {protocol.seed})."
    )


@dataclass(frozen=True)
class EvalTask:
    """One window to score: the training data and each target user's relevant items.

    Attributes:
        train: events strictly before the cutoff and the catalog as of then.
        user_ids: ``(n_users,)`` users with at least one relevant item in the window.
        relevant: n_users arrays of relevant item ids.
        warm: ``(n_users,)`` whether the user has an event before the cutoff.
        n_active_users: users with any event in the window (before dropping those without
            a relevant item).
    """

    train: RetrievalData
    user_ids: IntArray
    relevant: list[IntArray]
    warm: npt.NDArray[np.bool_]
    n_active_users: int


def catalog_as_of(items: pd.DataFrame, before: pd.DataFrame, cutoff: pd.Timestamp) -> pd.DataFrame:
    """Items that exist at ``cutoff``: created before it, undated, or already interacted with."""
    if "created_ts" not in items.columns:
        return items
    created = pd.to_datetime(items["created_ts"], utc=True)
    exists = created.isna() | (created < cutoff) | items["item_id"].isin(before["item_id"])
    return items[exists.to_numpy()].reset_index(drop=True)


def make_task(
    events: pd.DataFrame,
    users: pd.DataFrame,
    items: pd.DataFrame,
    *,
    cutoff: pd.Timestamp,
    end: pd.Timestamp | None,
    min_value: float | None = None,
) -> EvalTask:
    """Train on ``ts < cutoff``; targets are the events in ``[cutoff, end)`` (``end=None``: all)."""
    before = events[events["ts"] < cutoff]
    in_window = events["ts"] >= cutoff
    if end is not None:
        in_window &= events["ts"] < end
    window = events[in_window]
    n_active = int(window["user_id"].nunique())
    if min_value is not None:
        window = window[window["value"] >= min_value]
    pairs = window[["user_id", "item_id"]].drop_duplicates()
    seen = before[["user_id", "item_id"]].drop_duplicates()
    pairs = pairs.merge(seen, how="left", on=["user_id", "item_id"], indicator=True)
    pairs = pairs[pairs["_merge"] == "left_only"].sort_values(["user_id", "item_id"])
    user_ids = pairs["user_id"].drop_duplicates().to_numpy(dtype=np.int64)
    starts = np.searchsorted(pairs["user_id"].to_numpy(np.int64), user_ids)
    relevant = np.split(pairs["item_id"].to_numpy(np.int64), starts[1:])
    return EvalTask(
        train=RetrievalData(
            before.reset_index(drop=True), users, catalog_as_of(items, before, cutoff), cutoff
        ),
        user_ids=user_ids,
        relevant=relevant if len(user_ids) else [],
        warm=np.isin(user_ids, before["user_id"].to_numpy(np.int64)),
        n_active_users=n_active,
    )


@dataclass(frozen=True)
class SourceRun:
    """One source fit on a window: its ``(n_users, L)`` lists and timings (seconds)."""

    items: IntArray
    fit_seconds: float
    recommend_seconds: float


@contextmanager
def _progress(enabled: bool) -> Iterator[Progress]:
    with Progress(console=Console(stderr=True), disable=not enabled, transient=True) as bar:
        yield bar


def run_sources(
    task: EvalTask,
    sources: Mapping[str, SourceFactory],
    k: int,
    *,
    progress: bool = False,
    label: str = "",
) -> dict[str, SourceRun]:
    """Fit each source on ``task.train`` and recommend ``k`` unseen items to every target user."""
    runs: dict[str, SourceRun] = {}
    with _progress(progress) as bar:
        job = bar.add_task(label or "sources", total=len(sources))
        for name, make in sources.items():
            bar.update(job, description=f"{label} {name}: fit")
            start = time.perf_counter()
            retriever = make().fit(task.train)
            fitted = time.perf_counter()
            bar.update(job, description=f"{label} {name}: recommend")
            items, _ = retriever.recommend(task.user_ids, k, exclude_seen=True)
            runs[name] = SourceRun(items, fitted - start, time.perf_counter() - fitted)
            bar.advance(job)
    return runs


def quota_grid(names: Sequence[str], step: float) -> list[dict[str, float]]:
    """Every split of ``1`` into fractions that are multiples of ``step``, over ``names``."""
    units = round(1.0 / step)
    if units < 1 or not math.isclose(units * step, 1.0, abs_tol=1e-9):
        raise ValueError(f"quota_step must divide 1 (e.g. 0.1, 0.25), got {step}")
    grid = []
    # Stars and bars: choose where the len(names) - 1 bars go among units + len(names) - 1 slots.
    for bars in itertools.combinations(range(units + len(names) - 1), len(names) - 1):
        edges = [-1, *bars, units + len(names) - 1]
        parts = [edges[i + 1] - edges[i] - 1 for i in range(len(names))]
        grid.append({name: p / units for name, p in zip(names, parts, strict=True)})
    return grid


def tune_quotas(
    runs: Mapping[str, SourceRun],
    relevant: list[IntArray],
    config: MergeConfig,
    *,
    progress: bool = False,
) -> tuple[dict[str, float], float, int]:
    """Quotas maximising the mean recall@``tune_k`` of the merged lists; (quotas, recall, tried)."""
    k = config.tune_k
    lists, relevant = _dense_ids({n: r.items[:, :k] for n, r in runs.items()}, relevant)
    grid = quota_grid(list(runs), config.quota_step)
    recalls = np.empty(len(grid))
    with _progress(progress) as bar:
        for i, quotas in enumerate(bar.track(grid, description="validation: quota search")):
            merged = merge_candidates(lists, quotas, k).item_ids
            recalls[i] = recall_at_k_score(merged, relevant, k=k).mean()
    # Ties (e.g. a catalog shorter than tune_k) go to the most even split.
    tied = np.flatnonzero(recalls >= recalls.max() - 1e-12)
    unevenness = [sum(f * f for f in grid[i].values()) for i in tied]
    best = int(tied[int(np.argmin(unevenness))])
    return grid[best], float(recalls[best]), len(grid)


def _dense_ids(
    lists: Mapping[str, IntArray], relevant: list[IntArray]
) -> tuple[dict[str, IntArray], list[IntArray]]:
    """Listed items renumbered 0..n-1, so the merge indexes a small table instead of sorting.

    Padding stays -1; relevant items no source listed get ids above n (still counted).
    """
    listed = np.unique(np.concatenate([lst.ravel() for lst in lists.values()]))
    listed = listed[listed >= 0]

    def encode(ids: IntArray, unlisted: IntArray | None = None) -> IntArray:
        pos = np.minimum(np.searchsorted(listed, ids), max(len(listed) - 1, 0))
        found = (listed[pos] == ids) if len(listed) else np.zeros(ids.shape, bool)
        fallback = np.full(ids.shape, -1, np.int64) if unlisted is None else unlisted
        return np.where(found, pos, fallback)

    dense = {name: encode(lst) for name, lst in lists.items()}
    top = len(listed)
    return dense, [encode(r, top + np.arange(len(r), dtype=np.int64)) for r in relevant]


def _subsample(task: EvalTask, n: int, seed: int) -> npt.NDArray[np.int64]:
    rows = np.arange(len(task.user_ids))
    if len(rows) <= n:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, size=n, replace=False))


def score_lists(
    lists_at: Callable[[int], IntArray], task: EvalTask, protocol: ProtocolConfig
) -> dict[str, dict[str, Estimate | None]]:
    """Recall@ks and NDCG@ndcg_k per segment; ``lists_at(k)`` gives the ``(n_users, k)`` lists."""
    per_user = {
        f"recall@{k}": recall_at_k_score(lists_at(k), task.relevant, k=k) for k in protocol.ks
    }
    k = protocol.ndcg_k
    per_user[f"ndcg@{k}"] = ndcg_at_k_score(lists_at(k), task.relevant, k=k)
    masks = dict(
        zip(SEGMENTS, (np.ones(len(task.user_ids), bool), task.warm, ~task.warm), strict=True)
    )
    out: dict[str, dict[str, Estimate | None]] = {}
    for segment, mask in masks.items():
        out[segment] = {
            metric: Estimate(
                *bootstrap_mean_ci(
                    values[mask],
                    n_resamples=protocol.n_bootstrap,
                    confidence=protocol.confidence,
                    seed=protocol.seed,
                )
            )
            if mask.any()
            else None
            for metric, values in per_user.items()
        }
    return out


def load_dataset(dataset_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``events``, ``users`` and ``items`` of a contract directory, events in time order."""
    dataset_dir = Path(dataset_dir)
    for name in (EVENTS_FILE, USERS_FILE, ITEMS_FILE):
        if not (dataset_dir / name).is_file():
            raise ValueError(
                f"{dataset_dir / name}: not found; --dataset must be a contract directory "
                "(create one with `mlsd data import ...` or `mlsd data synth ...`)"
            )
    events = pd.read_parquet(dataset_dir / EVENTS_FILE)
    events = events.sort_values("ts", kind="stable").reset_index(drop=True)
    return (
        events,
        pd.read_parquet(dataset_dir / USERS_FILE),
        pd.read_parquet(dataset_dir / ITEMS_FILE),
    )


def evaluate_retrieval(
    dataset_dir: Path,
    sources: Mapping[str, SourceFactory],
    *,
    protocol: ProtocolConfig | None = None,
    merge: MergeConfig | None = None,
    progress: bool = False,
) -> RetrievalReport:
    """Run the protocol (module docstring) for ``sources`` and, with ``merge``, their merge.

    Args:
        dataset_dir: a contract directory (``events.parquet``, ``users.parquet``, ...).
        sources: name → factory of an unfitted retriever, in merge priority order.
        protocol: cut points, ks and bootstrap settings.
        merge: how to merge the sources; ``None`` scores the sources alone.
        progress: rich progress bars (on stderr) over the sources.

    Returns:
        The :class:`RetrievalReport`.
    """
    protocol = protocol or ProtocolConfig()
    if not sources:
        raise ValueError("evaluate_retrieval needs at least one source")
    events, users, items = load_dataset(dataset_dir)
    spec = cut_points(
        Path(dataset_dir) / EVENTS_FILE,
        val_frac=protocol.val_frac,
        test_frac=protocol.test_frac,
        by=protocol.split_by,
    )
    k_max = max(*protocol.ks, protocol.ndcg_k)
    quotas: dict[str, Quota] = {}
    validation = None
    if merge is not None:
        quotas, validation = _merge_quotas(
            events, users, items, spec, sources, protocol, merge, progress=progress
        )
    test = make_task(events, users, items, cutoff=spec.t2, end=None, min_value=protocol.min_value)
    if len(test.user_ids) == 0:
        raise ValueError(
            f"{dataset_dir}: no test user has a relevant item at or after t2={spec.t2}"
        )
    runs = run_sources(test, sources, k_max, progress=progress, label="test")
    methods = [
        MethodResult(
            name,
            run.fit_seconds,
            run.recommend_seconds,
            score_lists(_prefixes(run.items), test, protocol),
        )
        for name, run in runs.items()
    ]
    if merge is not None:
        methods.append(_merged_result(runs, quotas, test, protocol))
    counts = {
        "n_train_events": len(test.train.events),
        "n_catalog_items": len(test.train.items),
        "n_test_active_users": test.n_active_users,
        "n_test_users": len(test.user_ids),
        "n_warm_users": int(test.warm.sum()),
        "n_cold_users": int((~test.warm).sum()),
        "n_relevant": int(sum(len(r) for r in test.relevant)),
    }
    return RetrievalReport(
        protocol=protocol_text(protocol),
        dataset=read_info(Path(dataset_dir)).name,
        t1=spec.t1.isoformat(),
        t2=spec.t2.isoformat(),
        counts=counts,
        ks=tuple(protocol.ks),
        ndcg_k=protocol.ndcg_k,
        methods=methods,
        quotas=quotas,
        validation=validation,
    )


def _prefixes(items: IntArray) -> Callable[[int], IntArray]:
    """``k → items[:, :k]``: a ranked list's top k is its prefix."""
    return lambda k: items[:, :k]


def _merge_quotas(
    events: pd.DataFrame,
    users: pd.DataFrame,
    items: pd.DataFrame,
    spec: SplitSpec,
    sources: Mapping[str, SourceFactory],
    protocol: ProtocolConfig,
    merge: MergeConfig,
    *,
    progress: bool,
) -> tuple[dict[str, Quota], ValidationResult | None]:
    """The merge quotas: tuned on validation (sources fit before t1), or the configured ones."""
    if not merge.tune:
        return dict(merge.quotas) or {name: 1.0 / len(sources) for name in sources}, None
    val = make_task(events, users, items, cutoff=spec.t1, end=spec.t2, min_value=protocol.min_value)
    if len(val.user_ids) == 0:
        raise ValueError(f"no validation user has a relevant item in [{spec.t1}, {spec.t2})")
    runs = run_sources(val, sources, merge.tune_k, progress=progress, label="validation")
    rows = _subsample(val, merge.max_tune_users, protocol.seed)
    sample = {name: SourceRun(run.items[rows], 0.0, 0.0) for name, run in runs.items()}
    relevant = [val.relevant[i] for i in rows]
    quotas, merged_recall, n_grid = tune_quotas(sample, relevant, merge, progress=progress)
    recall = {
        name: float(recall_at_k_score(run.items, relevant, k=merge.tune_k).mean())
        for name, run in sample.items()
    }
    recall[MERGED] = merged_recall
    return dict(quotas), ValidationResult(
        n_users=len(val.user_ids),
        n_tune_users=len(rows),
        tune_k=merge.tune_k,
        recall=recall,
        quotas=quotas,
        n_candidates=n_grid,
    )


def _merged_result(
    runs: Mapping[str, SourceRun],
    quotas: Mapping[str, Quota],
    task: EvalTask,
    protocol: ProtocolConfig,
) -> MethodResult:
    """The merged set at each k: every source's top-k merged into k with the quotas."""
    start = time.perf_counter()
    by_k = {
        k: merge_candidates({n: r.items[:, :k] for n, r in runs.items()}, quotas, k).item_ids
        for k in {*protocol.ks, protocol.ndcg_k}
    }
    merge_seconds = time.perf_counter() - start
    return MethodResult(
        MERGED,
        sum(run.fit_seconds for run in runs.values()),
        sum(run.recommend_seconds for run in runs.values()) + merge_seconds,
        score_lists(by_k.__getitem__, task, protocol),
    )
