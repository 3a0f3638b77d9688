"""Candidate merge: the union of several sources' lists, with per-source quotas and dedupe.

Each source gets a quota of the ``k`` slots: a fraction of ``k`` (a float in [0, 1]) or a count
(an int). Sources are taken in priority order (the order of the mapping): each claims its best
items not already claimed by an earlier source, up to its quota. Slots a source leaves unused
(its list ran out, or it has no quota) are filled from the sources' next best items, again in
priority order, so the list reaches ``k`` whenever the sources hold ``k`` distinct items.

Every candidate keeps the source that claimed it and the set of all sources that proposed it:
the ranker can use both as features, and an explanation can say "also liked by ...".

The merged order fuses the sources' ranks, weighted by their quotas: an item sits at the best
``(rank - 0.5) / quota`` over the sources (with a quota) that listed it, so sources interleave
in proportion to their quotas and an item several sources rank high comes early; ties go to
the earlier claim. The ranker re-orders candidates anyway; this order makes a merged list's
NDCG meaningful on its own (and keeps a single source's order when the lists agree).

With ``Fusion("rrf")`` the quotas are instead the sources' weights in a weighted reciprocal-rank
fusion: an item scores ``sum(weight / (rank_constant + rank))`` over the sources listing it (rank
from 1), and the ``k`` best scores are the list, in that order. An item several sources rank
high wins a slot that a quota would give to one source's next item; items listed only by
sources of weight 0 fill the free slots in priority order, as with quotas.

:func:`merge_by_segment` gives cold users (no event before the cutoff) quotas of their own;
:func:`merged_entries` is the merge's set without its order, for fast quota searches.

A request merges one user's lists, where numpy's per-call overhead is most of the cost: row-wise
gathers index with a column of row numbers instead of ``np.take_along_axis`` (the same values,
~10 µs less a call), and the slot counts of a set of quotas are computed once.

    merged = merge_candidates({"als": als_items, "popularity": pop_items},
                              {"als": 0.7, "popularity": 0.3}, k=200)
    merged.item_ids       # (n_users, 200)
    merged.sources_of(0, 0)  # ("als", "popularity"): both proposed user 0's first candidate
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Self, TypeAlias

import numpy as np
import numpy.typing as npt

from mlsd.models.retrieval.base import PAD_ITEM, FloatArray, IntArray, RetrievalData, Retriever

Quota: TypeAlias = int | float
"""A source's share of the ``k`` slots: a fraction of ``k`` (float in [0, 1]) or a count (int);
so ``1.0`` is every slot and ``1`` is one."""

NO_SOURCE = -1
"""``MergedCandidates.source`` at padding."""

_MAX_CHUNK_CELLS = 1 << 22

FusionMethod: TypeAlias = Literal["quotas", "rrf"]


@dataclass(frozen=True)
class Fusion:
    """How the merge picks and orders its ``k`` candidates (module docstring).

    Attributes:
        method: ``"quotas"`` (each source claims its share of the slots) or ``"rrf"`` (weighted
            reciprocal-rank fusion, the quotas as weights).
        rank_constant: ``"rrf"``'s ``c`` in ``weight / (c + rank)``: the larger, the more a
            source's 100th item counts next to its first.
    """

    method: FusionMethod = "quotas"
    rank_constant: float = 60.0

    def __post_init__(self) -> None:
        if self.method not in ("quotas", "rrf"):
            raise ValueError(f"merge method {self.method!r}: use 'quotas' or 'rrf'")
        if not self.rank_constant > 0:
            raise ValueError(f"rank_constant must be > 0, got {self.rank_constant}")


QUOTAS = Fusion()
"""The default merge: per-source quotas."""


@dataclass(frozen=True)
class MergedCandidates:
    """A merged candidate list per user, with where each candidate came from.

    Attributes:
        item_ids: ``(n_users, k)`` int64, padded with :data:`PAD_ITEM`.
        source: ``(n_users, k)`` int8 index into ``source_names`` of the source that claimed
            the candidate, :data:`NO_SOURCE` at padding.
        proposers: ``(n_users, k)`` int64 bit mask: bit ``s`` is set when source ``s`` listed
            the candidate (the claiming source included); 0 at padding.
        source_names: the sources in priority order.
    """

    item_ids: IntArray
    source: npt.NDArray[np.int8]
    proposers: IntArray
    source_names: tuple[str, ...]

    def source_of(self, row: int, col: int) -> str | None:
        """Name of the source that claimed candidate ``col`` of user row ``row``."""
        index = int(self.source[row, col])
        return None if index == NO_SOURCE else self.source_names[index]

    def sources_of(self, row: int, col: int) -> tuple[str, ...]:
        """Names of every source that proposed candidate ``col`` of user row ``row``."""
        mask = int(self.proposers[row, col])
        return tuple(name for s, name in enumerate(self.source_names) if mask >> s & 1)

    def share_by_source(self) -> dict[str, float]:
        """Fraction of the non-padding candidates each source claimed."""
        real = self.source[self.source != NO_SOURCE]
        counts = np.bincount(real, minlength=len(self.source_names))
        total = max(int(counts.sum()), 1)
        return {name: float(counts[s] / total) for s, name in enumerate(self.source_names)}


def quota_counts(quotas: Sequence[Quota], k: int) -> IntArray:
    """Slots per source for a list of ``k``, in priority order.

    Fractions become counts by largest remainder, so fractions summing to 1 give exactly ``k``;
    counts are kept as given; the running total is capped at ``k`` (later sources lose first).

    Example:
        >>> quota_counts([0.5, 0.3, 0.2], 7).tolist()
        [4, 2, 1]
        >>> quota_counts([150, 0.5], 200).tolist()
        [150, 50]
    """
    for q in quotas:
        if isinstance(q, bool) or not isinstance(q, int | float):
            raise ValueError(f"a quota is a fraction of k (float) or a count (int), got {q!r}")
        if isinstance(q, float) and not 0.0 <= q <= 1.0:
            raise ValueError(f"a fractional quota must be in [0, 1], got {q}")
        if q < 0:
            raise ValueError(f"a quota count must be >= 0, got {q}")
    fractions = np.array([q if isinstance(q, float) else 0.0 for q in quotas], dtype=np.float64)
    if fractions.sum() > 1.0 + 1e-9:
        raise ValueError(f"fractional quotas sum to {fractions.sum():.3f} > 1 of k")
    raw = fractions * k
    counts = np.floor(raw + 1e-9).astype(np.int64)
    left = round(float(raw.sum())) - int(counts.sum())
    if left > 0:
        counts[np.argsort(-(raw - counts), kind="stable")[:left]] += 1
    counts = np.where([isinstance(q, float) for q in quotas], counts, np.asarray(quotas, dtype=int))
    capped = np.minimum(np.cumsum(counts), k)
    return np.diff(capped, prepend=0).astype(np.int64)


def merge_candidates(
    candidates: Mapping[str, npt.ArrayLike],
    quotas: Mapping[str, Quota],
    k: int,
    *,
    fusion: Fusion = QUOTAS,
) -> MergedCandidates:
    """Merge per-source candidate lists into one list of ``k`` per user.

    Args:
        candidates: source name → ``(n_users, L)`` item ids, best first, padded with -1; the
            mapping's order is the sources' priority. Each row must not repeat an item.
        quotas: source name → :data:`Quota`; a source without a quota only fills. With
            ``Fusion("rrf")``, the sources' weights.
        k: candidates per user.
        fusion: quotas (default) or reciprocal-rank fusion.

    Returns:
        :class:`MergedCandidates` of shape ``(n_users, k)``.
    """
    names, lists, counts = _checked(candidates, quotas, k)
    n_users = lists[0].shape[0]
    out = MergedCandidates(
        item_ids=np.full((n_users, k), PAD_ITEM, dtype=np.int64),
        source=np.full((n_users, k), NO_SOURCE, dtype=np.int8),
        proposers=np.zeros((n_users, k), dtype=np.int64),
        source_names=names,
    )
    width = sum(lst.shape[1] for lst in lists)
    chunk = chunk_rows(width, fusion)
    weights = _weights(quotas, names) if fusion.method == "rrf" else None
    for start in range(0, n_users, chunk):
        rows = slice(start, min(start + chunk, n_users))
        block = [lst[rows] for lst in lists]
        if weights is not None:
            _fuse_chunk(block, weights, fusion.rank_constant, k, out, rows)
        else:
            _merge_chunk(block, counts, k, out, rows)
    return out


def merged_entries(
    candidates: Mapping[str, npt.ArrayLike],
    quotas: Mapping[str, Quota],
    k: int,
    *,
    fusion: Fusion = QUOTAS,
) -> dict[str, npt.NDArray[np.bool_]]:
    """Which entries of each source's lists the merge claims: its set, without its order.

    The same claims as :func:`merge_candidates` (so ``mask.sum()`` over the sources is the merged
    list's length), several times faster: a quota search scores thousands of merges by recall,
    and recall does not depend on the order.

    Returns:
        source name → ``(n_users, L)`` bool, true where the merged list holds that entry and
        this source claimed it.
    """
    names, lists, counts = _checked(candidates, quotas, k)
    masks = {name: np.zeros(lst.shape, dtype=bool) for name, lst in zip(names, lists, strict=True)}
    width = sum(lst.shape[1] for lst in lists)
    chunk = chunk_rows(width, fusion)
    weights = _weights(quotas, names) if fusion.method == "rrf" else None
    for start in range(0, lists[0].shape[0], chunk):
        rows = slice(start, start + chunk)
        block = [lst[rows] for lst in lists]
        if weights is not None:
            table = FusedTable(block)
            chosen = table.chosen(table.scores(weights, fusion.rank_constant), k)
            owner = table.owners(weights, fusion.rank_constant)
            user = np.arange(chosen.shape[0])[:, None]
            for s, (lst, col) in enumerate(zip(block, table.cols, strict=True)):
                masks[names[s]][rows] = (
                    (lst != PAD_ITEM) & chosen[user, col] & (owner[user, col] == s)
                )
            continue
        cols, n_cols = _item_columns(block)
        for s, take, _ in _claims(block, cols, n_cols, counts, k):
            masks[names[s]][rows] |= take
    return masks


def _checked(
    candidates: Mapping[str, npt.ArrayLike], quotas: Mapping[str, Quota], k: int
) -> tuple[tuple[str, ...], list[IntArray], IntArray]:
    """The source names, their lists as int64 arrays and the slot counts, after the checks."""
    names = tuple(candidates)
    unknown = set(quotas) - set(names)
    if unknown:
        raise ValueError(f"quotas name unknown source(s) {sorted(unknown)}; sources: {names}")
    if not names:
        raise ValueError("merge_candidates needs at least one source")
    if len(names) > 63:
        raise ValueError(f"at most 63 sources can be merged, got {len(names)}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    lists = [np.asarray(candidates[name], dtype=np.int64) for name in names]
    n_users = lists[0].shape[0]
    for name, lst in zip(names, lists, strict=True):
        if lst.ndim != 2 or lst.shape[0] != n_users:
            raise ValueError(
                f"candidates[{name!r}] has shape {lst.shape}; expected ({n_users}, L) like "
                f"candidates[{names[0]!r}]"
            )
    given = tuple(quotas.get(name, 0) for name in names)
    try:
        counts = np.array(_quota_counts(k, *given), dtype=np.int64)
    except TypeError:  # an unhashable quota: quota_counts says what is wrong with it
        counts = quota_counts(given, k)
    return names, lists, counts


@functools.lru_cache(maxsize=64, typed=True)  # typed: a count 1 is not a fraction 1.0 or True
def _quota_counts(k: int, *quotas: Quota) -> tuple[int, ...]:
    """:func:`quota_counts`, once per quotas and ``k``: a request merges with the same ones,
    and the checks and rounding cost more than the merge of one user's lists."""
    return tuple(quota_counts(quotas, k).tolist())


def merge_by_segment(
    candidates: Mapping[str, npt.ArrayLike],
    quotas: Mapping[str, Quota],
    k: int,
    *,
    cold: npt.ArrayLike | None = None,
    cold_quotas: Mapping[str, Quota] | None = None,
    fusion: Fusion = QUOTAS,
) -> MergedCandidates:
    """:func:`merge_candidates` with other quotas for the ``cold`` rows.

    A cold user (no event before the cutoff) gets every source's fallback, often the same
    popularity list, so the quotas that serve warm users waste slots on duplicates there.

    Args:
        candidates, quotas, k: as :func:`merge_candidates`; ``quotas`` serve the warm rows.
        cold: ``(n_users,)`` bool, the rows of cold users; ``None`` = none.
        cold_quotas: the quotas of the cold rows; ``None`` = ``quotas`` for everyone.
        fusion: as :func:`merge_candidates`, for both.
    """
    if cold is None or cold_quotas is None:
        return merge_candidates(candidates, quotas, k, fusion=fusion)
    is_cold = np.asarray(cold, dtype=bool)
    lists = {name: np.asarray(lst, dtype=np.int64) for name, lst in candidates.items()}
    parts = [
        (
            rows,
            merge_candidates(
                {n: lst[rows] for n, lst in lists.items()}, part_quotas, k, fusion=fusion
            ),
        )
        for rows, part_quotas in ((~is_cold, quotas), (is_cold, cold_quotas))
    ]
    first = parts[1][1]
    out = MergedCandidates(
        item_ids=np.empty((len(is_cold), k), dtype=np.int64),
        source=np.empty((len(is_cold), k), dtype=np.int8),
        proposers=np.empty((len(is_cold), k), dtype=np.int64),
        source_names=first.source_names,
    )
    for rows, merged in parts:
        out.item_ids[rows], out.source[rows] = merged.item_ids, merged.source
        out.proposers[rows] = merged.proposers
    return out


def _item_columns(lists: list[IntArray]) -> tuple[list[IntArray], int]:
    """A column per distinct item of each row, shared by the sources; and the table width.

    Small ids (e.g. catalog positions) index a dense table directly; otherwise each row's items
    are numbered by sorting the row, so the table is at most the lists' total width (memory
    stays ``n_users × width`` however large the id space).
    """
    both = np.concatenate(lists, axis=1)
    width = both.shape[1]
    top = int(both.max(initial=PAD_ITEM))
    if top + 2 <= 4 * width:
        local = both - PAD_ITEM
        n_cols = top + 2
    else:
        user = np.arange(both.shape[0])[:, None]  # indexing: take_along_axis costs 10 µs more
        order = np.argsort(both, axis=1, kind="stable")
        ordered = both[user, order]
        first = np.ones(ordered.shape, dtype=bool)
        first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        local = np.empty_like(both)
        local[user, order] = np.cumsum(first, axis=1) - 1
        n_cols = width
    bounds = np.cumsum([lst.shape[1] for lst in lists])[:-1]
    return list(np.split(local, bounds, axis=1)), n_cols


Claim = tuple[int, npt.NDArray[np.bool_], npt.NDArray[np.float64]]
"""One claiming pass: (source, ``(n, L)`` entries taken, their claim-order key)."""


def _claims(
    lists: list[IntArray], cols: list[IntArray], n_cols: int, counts: IntArray, k: int
) -> list[Claim]:
    """Every source claims its quota, then the free slots are filled: the claiming passes.

    The claim-order key of the j-th (1-based) of ``q`` quota claims is ``(j - 0.5) / q`` in
    (0, 1); fill claims come after every quota claim (key >= 2), in the order they were made.
    """
    n = lists[0].shape[0]
    user = np.arange(n)[:, None]
    taken = np.zeros((n, n_cols), dtype=bool)

    def claim(s: int, limit: IntArray) -> tuple[npt.NDArray[np.bool_], IntArray]:
        """Source ``s`` takes its best unclaimed items, up to ``limit`` per user."""
        free = (lists[s] != PAD_ITEM) & ~taken[user, cols[s]]
        rank = np.cumsum(free, axis=1)
        take = free & (rank <= limit[:, None])
        taken[np.nonzero(take)[0], cols[s][take]] = True
        return take, rank

    passes: list[Claim] = []
    for s, q in enumerate(counts):
        if q > 0:
            take, rank = claim(s, np.full(n, q, dtype=np.int64))
            passes.append((s, take, (rank - 0.5) / q))
    for s in range(len(lists)):
        left = k - taken.sum(axis=1)
        if not left.any():
            break
        filled = (k - left)[:, None]
        take, rank = claim(s, left)
        passes.append((s, take, 2.0 + filled + rank))
    return passes


def _merge_chunk(
    lists: list[IntArray], counts: IntArray, k: int, out: MergedCandidates, rows: slice
) -> None:
    """Merge one block of users into ``out[rows]``, vectorised over the block."""
    n = lists[0].shape[0]
    cols, n_cols = _item_columns(lists)
    user = np.arange(n)[:, None]
    proposed = np.zeros((n, n_cols), dtype=np.int64)
    fused = np.full((n, n_cols), np.inf)  # best (rank - 0.5) / quota over the proposers
    for s, (lst, col) in enumerate(zip(lists, cols, strict=True)):
        real = lst != PAD_ITEM
        row, entry = np.nonzero(real)  # row-major, as a boolean mask selects
        where = (row, col[real])
        proposed[where] |= np.int64(1) << s
        if counts[s] > 0:
            rank = (entry + 0.5) / counts[s]
            np.minimum.at(fused, where, rank)

    picks = [
        (s, np.where(take, key, np.inf)) for s, take, key in _claims(lists, cols, n_cols, counts, k)
    ]
    if not picks:
        return
    key = np.concatenate([key for _, key in picks], axis=1)
    every_col = np.concatenate([cols[s] for s, _ in picks], axis=1)
    # Order: by the fused rank, then the claim order; lexsort is stable, so ties go to the
    # earlier source. Unchosen entries (key inf) sort last whatever their fused rank.
    fused_key = np.where(np.isfinite(key), fused[user, every_col], np.inf)
    order = np.lexsort((key, fused_key, ~np.isfinite(key)), axis=1)[:, :k]
    chosen = np.isfinite(key[user, order])

    def pick(arrays: list[npt.NDArray[np.int64]]) -> npt.NDArray[np.int64]:
        picked: npt.NDArray[np.int64] = np.concatenate(arrays, axis=1)[user, order]
        return picked

    width = order.shape[1]
    out.item_ids[rows, :width] = np.where(chosen, pick([lists[s] for s, _ in picks]), PAD_ITEM)
    source = pick([np.full(lists[s].shape, s, dtype=np.int64) for s, _ in picks])
    out.source[rows, :width] = np.where(chosen, source, NO_SOURCE)
    col = pick([cols[s] for s, _ in picks])
    out.proposers[rows, :width] = np.where(chosen, proposed[user, col], 0)


def chunk_rows(width: int, fusion: Fusion) -> int:
    """Users merged at once, for lists ``width`` entries wide in all: a block's tables stay
    within a few ``_MAX_CHUNK_CELLS`` cells (the fusion keeps six ``n × width``-ish tables, the
    quotas two)."""
    per_row = (8 if fusion.method == "rrf" else 2) * width
    return max(1, _MAX_CHUNK_CELLS // max(per_row, 1))


def _weights(quotas: Mapping[str, Quota], names: tuple[str, ...]) -> npt.NDArray[np.float64]:
    """Each source's quota as its fusion weight (0 without one)."""
    return np.array([float(quotas.get(name, 0)) for name in names], dtype=np.float64)


class FusedTable:
    """One block of users' lists laid out for reciprocal-rank fusion: a column per distinct
    item of each row (as :func:`_item_columns`), and what does not depend on the weights, so
    a weight search (:func:`mlsd.evaluation.quotas.climb_quotas`) builds it once.

    Attributes:
        cols: per source, ``(n, L)`` the column of each entry.
        first: ``(n, n_cols)`` the earliest claim, ``source * width + entry``: the order of
            ties and of the items only weight-0 sources list.
        proposed, item: ``(n, n_cols)`` the proposers' bit mask and the column's item id.
        listed: ``(n, n_cols)`` whether any source lists the column's item.
    """

    def __init__(self, lists: list[IntArray]) -> None:
        self.cols, self.n_cols = _item_columns(lists)
        self.n = lists[0].shape[0]
        self.width = max(lst.shape[1] for lst in lists)
        size = self.n * self.n_cols
        first = np.full(size, np.iinfo(np.int64).max, dtype=np.int64)
        proposed = np.zeros(size, dtype=np.int64)
        item = np.full(size, PAD_ITEM, dtype=np.int64)
        self._entries: list[tuple[IntArray, IntArray]] = []
        for s, (lst, col) in enumerate(zip(lists, self.cols, strict=True)):
            real = lst != PAD_ITEM
            row, entry = np.nonzero(real)
            flat = row * self.n_cols + col[real]  # a row lists an item once: no repeats in s
            self._entries.append((flat, entry))
            proposed[flat] |= np.int64(1) << s
            item[flat] = lst[real]
            first[flat] = np.minimum(first[flat], s * self.width + entry)
        shape = (self.n, self.n_cols)
        self.first, self.proposed, self.item = (a.reshape(shape) for a in (first, proposed, item))
        self.listed = self.proposed != 0

    def scores(
        self, weights: npt.NDArray[np.float64], rank_constant: float
    ) -> npt.NDArray[np.float64]:
        """``(n, n_cols)`` the summed ``weight / (c + rank)``; -inf where nothing is listed."""
        score = np.zeros(self.n * self.n_cols)
        for s, (flat, entry) in enumerate(self._entries):
            if weights[s] > 0:
                score[flat] += weights[s] / (rank_constant + entry + 1.0)
        out = score.reshape(self.n, self.n_cols)
        out[~self.listed] = -np.inf
        return out

    def owners(self, weights: npt.NDArray[np.float64], rank_constant: float) -> IntArray:
        """``(n, n_cols)`` the source contributing most to each score (the earliest claim when
        none contributes): the source a chosen candidate is credited to."""
        best = np.zeros(self.n * self.n_cols)
        owner = np.full(self.n * self.n_cols, NO_SOURCE, dtype=np.int64)
        for s, (flat, entry) in enumerate(self._entries):
            if weights[s] > 0:
                part = weights[s] / (rank_constant + entry + 1.0)
                more = part > best[flat]
                owner[flat[more]] = s
                best[flat[more]] = part[more]
        owned = owner.reshape(self.n, self.n_cols)
        unowned = self.listed & (owned == NO_SOURCE)
        owned[unowned] = self.first[unowned] // self.width
        return owned

    def order(self, score: npt.NDArray[np.float64], k: int) -> IntArray:
        """``(n, min(k, n_cols))`` columns best first: score, then the earliest claim."""
        order: IntArray = np.lexsort((self.first, -score), axis=1)[:, :k]
        return order

    def chosen(self, score: npt.NDArray[np.float64], k: int) -> npt.NDArray[np.bool_]:
        """``(n, n_cols)`` whether the column's item is among the row's ``k``."""
        order = self.order(score, k)
        user = np.arange(order.shape[0])[:, None]
        out = np.zeros(score.shape, dtype=bool)
        out[user, order] = np.isfinite(score[user, order])
        return out


def _fuse_chunk(
    lists: list[IntArray],
    weights: npt.NDArray[np.float64],
    rank_constant: float,
    k: int,
    out: MergedCandidates,
    rows: slice,
) -> None:
    """Reciprocal-rank fusion of one block of users into ``out[rows]``."""
    table = FusedTable(lists)
    score, owner = table.scores(weights, rank_constant), table.owners(weights, rank_constant)
    order = table.order(score, k)
    user = np.arange(order.shape[0])[:, None]
    chosen = np.isfinite(score[user, order])
    width = order.shape[1]
    out.item_ids[rows, :width] = np.where(chosen, table.item[user, order], PAD_ITEM)
    out.source[rows, :width] = np.where(chosen, owner[user, order], NO_SOURCE)
    out.proposers[rows, :width] = np.where(chosen, table.proposed[user, order], 0)


class MergedRetriever(Retriever):
    """Several retrievers as one: each answers ``k`` items, :func:`merge_candidates` merges them.

    ``fit`` fits every source in place, in priority order (the mapping's order).

    Args:
        sources: name → retriever, in priority order.
        quotas: name → :data:`Quota` (fraction of ``k`` or a count); missing names only fill.
        cold_quotas: the quotas of users without an event before the cutoff (see
            :func:`merge_by_segment`); ``None`` = ``quotas`` for everyone.
        fusion: quotas (default) or reciprocal-rank fusion (:class:`Fusion`).

    Attributes:
        fit_seconds_: name → wall seconds of that source's ``fit``.
        warm_user_ids_: ``(n_warm,)`` sorted ids of the users with training events.
    """

    name = "merged"

    fit_seconds_: dict[str, float]
    warm_user_ids_: IntArray

    def __init__(
        self,
        sources: Mapping[str, Retriever],
        quotas: Mapping[str, Quota],
        *,
        cold_quotas: Mapping[str, Quota] | None = None,
        fusion: Fusion = QUOTAS,
    ) -> None:
        if not sources:
            raise ValueError("MergedRetriever needs at least one source")
        for given in (quotas, cold_quotas or {}):
            unknown = set(given) - set(sources)
            if unknown:
                raise ValueError(f"quotas name unknown source(s) {sorted(unknown)}")
            quota_counts(list(given.values()), 1)  # validates the values early
        self.sources = dict(sources)
        self.quotas = dict(quotas)
        self.cold_quotas = None if cold_quotas is None else dict(cold_quotas)
        self.fusion = fusion

    def fit(self, train: RetrievalData) -> Self:
        fit_seconds: dict[str, float] = {}
        for name, source in self.sources.items():
            start = time.perf_counter()
            source.fit(train)
            fit_seconds[name] = time.perf_counter() - start
        self.fit_seconds_ = fit_seconds
        self.warm_user_ids_ = np.unique(train.events["user_id"].to_numpy(dtype=np.int64))
        return self

    def recommend_candidates(
        self, user_ids: npt.ArrayLike, k: int, *, exclude_seen: bool = True
    ) -> MergedCandidates:
        """The merged ``(n_users, k)`` candidates with their sources (for the ranker)."""
        if not hasattr(self, "fit_seconds_"):
            raise RuntimeError("MergedRetriever is not fitted yet; call fit(train) first")
        lists = {
            name: source.recommend(user_ids, k, exclude_seen=exclude_seen)[0]
            for name, source in self.sources.items()
        }
        cold = ~np.isin(np.asarray(user_ids, dtype=np.int64).reshape(-1), self.warm_user_ids_)
        return merge_by_segment(
            lists, self.quotas, k, cold=cold, cold_quotas=self.cold_quotas, fusion=self.fusion
        )

    def recommend(
        self, user_ids: npt.ArrayLike, k: int, *, exclude_seen: bool = True
    ) -> tuple[IntArray, FloatArray]:
        merged = self.recommend_candidates(user_ids, k, exclude_seen=exclude_seen)
        # Scores encode the merged order only: k, k - 1, ..., -inf at padding.
        scores = np.broadcast_to(np.arange(k, 0, -1, dtype=np.float32), merged.item_ids.shape)
        scores = np.where(merged.item_ids == PAD_ITEM, -np.inf, scores).astype(np.float32)
        return merged.item_ids, scores
