"""The merge quota search: every split of the ``k`` slots on a grid, scored by recall.

Recall@k of the merged lists is what the search maximises; it runs on the validation window
only (:mod:`mlsd.evaluation.retrieval`), for all users at once or for warm and cold users apart
(``[retrieval.merge]``: :class:`MergeConfig`).

    grid = quota_grid(["ease", "popularity"], 0.5)   # [{ease: 0, pop: 1}, {.5, .5}, {1, 0}]
    quotas, recall = best_quotas(lists, relevant, grid, k=200)

Reciprocal-rank fusion (``method = "rrf"``: the quotas are the sources' weights) sorts every
user's items for each weight vector, too slow for the whole grid (8,008 points for 7 sources in
tenths), so :func:`climb_quotas` walks the same grid instead: from the best of the even split
and each source alone, it moves weight between two sources while recall improves.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt
from rich.console import Console
from rich.progress import Progress

from mlsd.models.retrieval.base import IntArray
from mlsd.models.retrieval.merge import (
    QUOTAS,
    FusedTable,
    Fusion,
    FusionMethod,
    Quota,
    chunk_rows,
    merged_entries,
    quota_counts,
)


class Ranked(Protocol):
    """Anything holding ``(n_users, L)`` ranked lists (e.g. a ``SourceRun``)."""

    @property
    def items(self) -> IntArray: ...


@contextmanager
def progress_bar(enabled: bool) -> Iterator[Progress]:
    """A transient rich progress on stderr (disabled: shows nothing)."""
    with Progress(console=Console(stderr=True), disable=not enabled, transient=True) as bar:
        yield bar


@dataclass(frozen=True)
class MergeConfig:
    """How the sources are merged (``[retrieval.merge]``).

    Attributes:
        tune: grid-search the quotas on the validation window; otherwise use ``quotas``.
        tune_k: the list length whose validation recall the search maximises.
        quota_step: grid step of the fractions (0.1: every split of 10 tenths over the sources).
        max_tune_users: validation users sampled for the search (bounds its time).
        by_segment: search warm users' and cold users' quotas apart.
        min_segment_users: a segment with fewer sampled validation users gets the quotas
            searched over all users instead (too few to tune on).
        quotas: fixed quotas (fractions of k or counts) when ``tune`` is off; default equal.
        cold_quotas: fixed quotas of cold users when ``tune`` is off; default ``quotas``.
        method: ``"quotas"`` or ``"rrf"`` (reciprocal-rank fusion, the quotas as weights).
        rank_constant: ``"rrf"``'s ``c`` in ``weight / (c + rank)``.
    """

    tune: bool = True
    tune_k: int = 200
    quota_step: float = 0.1
    max_tune_users: int = 5000
    by_segment: bool = True
    min_segment_users: int = 10
    quotas: Mapping[str, Quota] = field(default_factory=dict)
    cold_quotas: Mapping[str, Quota] = field(default_factory=dict)
    method: FusionMethod = "quotas"
    rank_constant: float = 60.0

    def __post_init__(self) -> None:
        if self.tune_k < 1 or self.max_tune_users < 1 or self.min_segment_users < 1:
            raise ValueError("tune_k, max_tune_users and min_segment_users must be >= 1")
        Fusion(self.method, self.rank_constant)  # checks the method and the rank constant
        quota_grid(["a"], self.quota_step)  # checks that the step divides 1
        quota_counts(list(self.quotas.values()), 1)  # checks the quota values
        quota_counts(list(self.cold_quotas.values()), 1)

    @property
    def fusion(self) -> Fusion:
        """The merge these settings describe."""
        return Fusion(self.method, self.rank_constant)

    def fixed(self, sources: Sequence[str]) -> tuple[dict[str, Quota], dict[str, Quota] | None]:
        """The configured quotas of warm (or all) users, equal over ``sources`` when none are
        given, and of cold users (``None``: the same), for ``tune = false``."""
        quotas = dict(self.quotas) or {name: 1.0 / len(sources) for name in sources}
        return quotas, dict(self.cold_quotas) or None

    def describe(self) -> str:
        """How the lists are merged, in words, for the reports' protocol text (tuned on the
        validation window [t1, t2), or fixed)."""
        how, shares = "merged", "quotas"
        if self.method == "rrf":
            how = f"fused by reciprocal rank (rank constant {self.rank_constant:g})"
            shares = "weights"
        if not self.tune:
            given = dict(self.quotas) or "equal"
            cold = f", cold users {dict(self.cold_quotas)}" if self.cold_quotas else ""
            return f"the sources' lists {how} with fixed {shares} ({given}{cold}; not tuned)"
        apart = ", warm and cold users apart" if self.by_segment else ""
        return (
            f"the sources' lists {how} with {shares} tuned on validation [t1, t2) with sources "
            f"fit on ts < t1 (recall@{self.tune_k}, grid step {self.quota_step:g}{apart})"
        )


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
    runs: Mapping[str, Ranked],
    relevant: list[IntArray],
    config: MergeConfig,
    *,
    progress: bool = False,
) -> tuple[dict[str, float], float, int]:
    """Quotas maximising the mean recall@``tune_k`` of the merged lists over all users.

    Returns:
        (quotas, their recall, quota vectors tried).
    """
    lists = {name: run.items for name, run in runs.items()}
    with progress_bar(progress) as bar:
        return search_quotas(lists, relevant, config, progress=bar, label="validation: quotas")


def search_quotas(
    lists: Mapping[str, IntArray],
    relevant: list[IntArray],
    config: MergeConfig,
    *,
    progress: Progress | None = None,
    label: str = "quota search",
) -> tuple[dict[str, float], float, int]:
    """The quotas of ``config``'s merge with the best recall@``tune_k``: the whole grid for
    quotas, :func:`climb_quotas` for reciprocal-rank fusion; (quotas, recall, points tried)."""
    if config.method == "rrf":
        return climb_quotas(
            lists,
            relevant,
            config.quota_step,
            k=config.tune_k,
            fusion=config.fusion,
            progress=progress,
            label=label,
        )
    grid = quota_grid(list(lists), config.quota_step)
    quotas, recall = best_quotas(
        lists, relevant, grid, k=config.tune_k, progress=progress, label=label
    )
    return quotas, recall, len(grid)


def tune_segment_quotas(
    lists: Mapping[str, IntArray],
    relevant: list[IntArray],
    warm: npt.NDArray[np.bool_],
    config: MergeConfig,
    *,
    progress: bool = False,
) -> tuple[dict[str, float], dict[str, float] | None, int]:
    """Warm users' and cold users' quotas, each maximising recall@``tune_k`` on its users.

    Without ``config.by_segment``, one search over all users (cold quotas ``None``); a segment
    with fewer than ``config.min_segment_users`` users takes the all-users quotas.

    Args:
        lists: source name → ``(n_users, >= tune_k)`` ranked item ids, in priority order.
        relevant: n_users arrays of relevant item ids.
        warm: ``(n_users,)`` whether each user had an event before the cutoff.
        config: the search settings.

    Returns:
        (warm quotas, cold quotas or ``None``, quota vectors tried per search, the most of
        the searches).
    """
    masks = {"warm": warm, "cold": ~warm} if config.by_segment else {}
    tuned: dict[str, dict[str, float]] = {}
    tried = [0]
    with progress_bar(progress) as bar:

        def search(mask: npt.NDArray[np.bool_], label: str) -> dict[str, float]:
            rows = np.flatnonzero(mask)
            subset = {name: lst[rows] for name, lst in lists.items()}
            label = f"validation: {label} quotas"
            chosen, _, n_tried = search_quotas(
                subset, [relevant[i] for i in rows], config, progress=bar, label=label
            )
            tried[0] = max(tried[0], n_tried)
            return chosen

        for segment, mask in masks.items():
            if mask.sum() >= config.min_segment_users:
                tuned[segment] = search(mask, segment)
        if len(tuned) < 2:  # not by segment, or a segment too small to tune on
            tuned["all"] = search(np.ones(len(relevant), dtype=bool), "all users'")
    if not config.by_segment:
        return tuned["all"], None, tried[0]
    return tuned.get("warm", tuned.get("all", {})), tuned.get("cold", tuned.get("all")), tried[0]


def best_quotas(
    lists: Mapping[str, IntArray],
    relevant: list[IntArray],
    grid: list[dict[str, float]],
    *,
    k: int,
    progress: Progress | None = None,
    label: str = "quota search",
) -> tuple[dict[str, float], float]:
    """The grid point whose merged top-``k`` has the best mean recall; (quotas, recall).

    Args:
        lists: source name → ``(n_users, >= k)`` ranked item ids, in merge priority order.
        relevant: n_users arrays of relevant item ids.
        grid: candidate quotas, as :func:`quota_grid`.
        k: the merged list length.
        progress: a rich progress to show the search in.
    """
    recall_of = _merged_recall(lists, relevant, k, QUOTAS)
    recalls = np.empty(len(grid))
    points = grid if progress is None else progress.track(grid, description=label)
    for i, quotas in enumerate(points):
        recalls[i] = recall_of(quotas)
    # Ties (e.g. a catalog shorter than k, or identical lists) go to the most even split.
    tied = np.flatnonzero(recalls >= recalls.max() - 1e-12)
    unevenness = [sum(f * f for f in grid[i].values()) for i in tied]
    best = int(tied[int(np.argmin(unevenness))])
    return grid[best], float(recalls[best])


def climb_quotas(
    lists: Mapping[str, IntArray],
    relevant: list[IntArray],
    step: float,
    *,
    k: int,
    fusion: Fusion,
    progress: Progress | None = None,
    label: str = "quota search",
) -> tuple[dict[str, float], float, int]:
    """A local search of the quota grid (module docstring); (quotas, recall, points tried).

    Starts from the best of the even split and each source alone; then, while some move of
    weight from one source to another raises recall, takes the best such move. Moves are of 1,
    2 and a quarter of the grid's steps: from one source alone, a small weight for a second
    source changes nothing (its first item scores below the first source's last), so single
    steps would stall there. Ties go to the earlier point tried.
    """
    names = list(lists)
    quota_grid(["a"], step)  # checks that the step divides 1
    units = round(1.0 / step)
    recall_of = _merged_recall(lists, relevant, k, fusion)
    seen: dict[tuple[int, ...], float] = {}
    job = None if progress is None else progress.add_task(label, total=None)

    def score(parts: tuple[int, ...]) -> float:
        if parts not in seen:
            seen[parts] = recall_of({n: p / units for n, p in zip(names, parts, strict=True)})
            if progress is not None and job is not None:
                progress.advance(job)
        return seen[parts]

    even = tuple(units // len(names) + (i < units % len(names)) for i in range(len(names)))
    alone = [tuple(units * (i == j) for j in range(len(names))) for i in range(len(names))]
    best = max([even, *alone], key=score)
    sizes = sorted({1, 2, max(1, units // 4)})
    while True:
        moves = [
            tuple(p - size * (n == i) + size * (n == j) for n, p in enumerate(best))
            for size in sizes
            for i in range(len(names))
            for j in range(len(names))
            if i != j and best[i] >= size
        ]
        better = max(moves, key=score, default=best)
        if score(better) <= score(best) + 1e-12:
            break
        best = better
    quotas = {n: p / units for n, p in zip(names, best, strict=True)}
    return quotas, score(best), len(seen)


def _merged_recall(
    lists: Mapping[str, IntArray], relevant: list[IntArray], k: int, fusion: Fusion
) -> Callable[[Mapping[str, float]], float]:
    """``quotas → mean recall@k`` of the merged lists, with what does not depend on the
    quotas (ids, which entries are relevant, the fusion's item table) computed once."""
    top = {name: lst[:, :k] for name, lst in lists.items()}
    dense, dense_relevant = dense_ids(top, relevant)
    # Recall counts the relevant entries the merge claims; which entries are relevant does not
    # depend on the quotas, so it is found once (each item is claimed once, never twice).
    weight = np.array([1.0 / max(len(r), 1) for r in relevant])
    hits = {name: _is_relevant(lst, dense_relevant) for name, lst in dense.items()}
    names = list(dense)
    if not len(relevant):
        return lambda quotas: 0.0
    if fusion.method == "rrf":
        return _fused_recall(dense, hits, weight, k, fusion)

    def recall(quotas: Mapping[str, float]) -> float:
        claimed = merged_entries(dense, quotas, k, fusion=fusion)
        n_hits = sum((claimed[name] & hits[name]).sum(axis=1) for name in names)
        return float(np.mean(n_hits * weight))

    return recall


def _fused_recall(
    dense: Mapping[str, IntArray],
    hits: Mapping[str, npt.NDArray[np.bool_]],
    weight: npt.NDArray[np.float64],
    k: int,
    fusion: Fusion,
) -> Callable[[Mapping[str, float]], float]:
    """:func:`_merged_recall` for reciprocal-rank fusion: the item tables are laid out once
    per block of users, and each weight vector only sums and sorts the scores."""
    names = list(dense)
    lists = [dense[name] for name in names]
    rows = chunk_rows(sum(lst.shape[1] for lst in lists), fusion)
    blocks = []
    for start in range(0, len(weight), rows):
        block = slice(start, start + rows)
        table = FusedTable([lst[block] for lst in lists])
        wanted = np.zeros((table.n, table.n_cols), dtype=bool)
        for name, col in zip(names, table.cols, strict=True):
            row, entry = np.nonzero(hits[name][block])
            wanted[row, col[row, entry]] = True
        blocks.append((table, wanted, weight[block]))

    def recall(quotas: Mapping[str, float]) -> float:
        weights = np.array([float(quotas.get(name, 0)) for name in names])
        total = 0.0
        for table, wanted, share in blocks:
            chosen = table.chosen(table.scores(weights, fusion.rank_constant), k)
            total += float(((chosen & wanted).sum(axis=1) * share).sum())
        return total / len(weight)

    return recall


def _is_relevant(lists: IntArray, relevant: list[IntArray]) -> npt.NDArray[np.bool_]:
    """``(n_users, L)``: whether each listed item is among its user's relevant items."""
    n_users, length = lists.shape
    span = int(max(lists.max(initial=0), max((r.max(initial=0) for r in relevant), default=0)))
    span += 2  # ids and the -1 padding, offset by 1, stay below span
    listed = (np.arange(n_users)[:, None] * span + lists + 1).ravel()
    wanted = np.concatenate(
        [u * span + r + 1 for u, r in enumerate(relevant)] or [np.zeros(0, np.int64)]
    )
    return np.isin(listed, wanted).reshape(n_users, length) & (lists >= 0)


def dense_ids(
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
