"""Re-ranking: the last stage of the request path, which shapes the ranked list a user sees.

The ranker scores each candidate on its own; a list needs rules no pointwise score knows:
never show what the user already consumed or what policy blocks, do not fill the screen with
one category, give new items a chance while their engagement data is thin. This module applies
them, in numpy only (serving loads artifacts and never imports training code)::

    config = RerankConfig(mmr_lambda=0.7, max_per_category=3, blocklist=frozenset({13}))
    shown = rerank(item_ids, scores, k=20, config=config, item_categories=item_categories,
                   item_age_days=ages, seen=user_history)   # shown.item_ids, shown.scores

Per request, in order: drop padding, seen and blocked items; min-max normalise the ranker
scores to [0, 1] (so ``mmr_lambda`` and ``freshness_weight`` mean the same thing whatever the
ranker's score scale: logits, probabilities or inner products); add the freshness boost; pick
greedily by maximal marginal relevance (MMR) under the per-category cap.

:func:`rerank_lists` does the same for a batch of users (offline evaluation, batch
prediction); without list-level rules (``mmr_lambda`` 1, no category cap) it filters, normalises
and sorts all rows at once, with :func:`rows_isin` (one sort for every row's seen items, where
``np.isin`` needs a call per row), element for element what :func:`rerank` computes.

Similarity between two items is 1 if they share a category and 0 otherwise, with category -1
(unknown) one shared category, as in :func:`mlsd.evaluation.metrics.intra_list_diversity_score`,
so the offline diversity metric measures exactly what this stage optimises. The category cap
leaves unknown items out: it limits what is known to repeat.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, NamedTuple

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

PAD_ID = -1
"""Item id filling a list that has fewer than ``k`` items; its score is ``-inf``."""

SeenItems = AbstractSet[int] | npt.ArrayLike
"""Item ids a user already interacted with: a set or a 1-D array."""

FreshnessClock = Literal["created", "first_event"]
FRESHNESS_CLOCKS: tuple[FreshnessClock, ...] = ("created", "first_event")


@dataclass(frozen=True)
class RerankConfig:
    """How the final list trades relevance for diversity, freshness and policy.

    Attributes:
        mmr_lambda: in [0, 1]. Each pick maximises ``mmr_lambda * relevance - (1 - mmr_lambda)
            * max_similarity_to_picked``; 1 keeps the ranker's order, 0 takes the best item of
            every category before any second item of one.
        freshness_weight: >= 0, boost of a brand-new item, in units of the list's normalised
            score range (0.1 = a tenth of the gap between the best and the worst candidate).
        freshness_half_life_days: > 0, age at which the boost halves.
        freshness_clock: what an item's age counts from (:func:`boost_ages`): ``"created"``,
            its catalog creation time (``created_ts``, e.g. a release date) where the catalog
            has one, else its first event; ``"first_event"``, its first event only, so an item
            no one has touched yet has no age and gets no boost.
        max_per_category: at most this many items of one category in the list (None: no cap);
            items of unknown category (-1) are not capped, or a catalog without categories
            would get lists of this length.
        blocklist: item ids never shown (legal takedowns, out of stock).
    """

    mmr_lambda: float = 1.0
    freshness_weight: float = 0.0
    freshness_half_life_days: float = 30.0
    freshness_clock: FreshnessClock = "created"
    max_per_category: int | None = None
    blocklist: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        _check_float("mmr_lambda", self.mmr_lambda, low=0.0, high=1.0, hint="1 = pure relevance")
        _check_float("freshness_weight", self.freshness_weight, low=0.0)
        _check_float("freshness_half_life_days", self.freshness_half_life_days, low=0.0)
        if self.freshness_half_life_days == 0.0:
            raise ValueError("RerankConfig.freshness_half_life_days must be > 0 days, got 0")
        if self.freshness_clock not in FRESHNESS_CLOCKS:
            raise ValueError(
                f"RerankConfig.freshness_clock must be one of {', '.join(FRESHNESS_CLOCKS)}, "
                f"got {self.freshness_clock!r}"
            )
        cap = self.max_per_category
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(
                f"RerankConfig.max_per_category must be a positive integer or None, got {cap!r}"
            )
        try:
            blocked = frozenset(int(item) for item in self.blocklist)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"RerankConfig.blocklist must hold integer item ids, got {self.blocklist!r}"
            ) from error
        if any(item < 0 for item in blocked):
            raise ValueError(f"RerankConfig.blocklist holds negative id {min(blocked)}")
        # Accept any iterable (a TOML list), store the frozen set the type promises.
        object.__setattr__(self, "blocklist", blocked)

    @cached_property
    def blocked_ids(self) -> IntArray:
        """The blocklist as a sorted array, built once rather than on every request."""
        return np.sort(np.fromiter(self.blocklist, dtype=np.int64, count=len(self.blocklist)))


def _check_float(
    field: str, value: float, *, low: float, high: float = math.inf, hint: str = ""
) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not low <= value <= high:
        bound = f"in [{low}, {high}]" if math.isfinite(high) else f">= {low}"
        note = f" ({hint})" if hint else ""
        raise ValueError(
            f"RerankConfig.{field} must be a finite number {bound}{note}, got {value!r}"
        )


class Reranked(NamedTuple):
    """The list to show, best first.

    Attributes:
        item_ids: (m,) for one request, (n, k) padded with -1 for a batch.
        scores: the ranker's original scores of those items (not the MMR objective), so that
            downstream calibration or bidding still reads model outputs, or the ``shown``
            values of those items when one was given; -inf on padding.
    """

    item_ids: IntArray
    scores: FloatArray


def _check_request(
    item_ids: npt.ArrayLike, scores: npt.ArrayLike, item_age_days: npt.ArrayLike | None
) -> tuple[IntArray, FloatArray, FloatArray | None]:
    ids = np.asarray(item_ids)
    values = np.asarray(scores, dtype=np.float64)
    if ids.ndim != 1 or values.shape != ids.shape:
        raise ValueError(
            f"item_ids and scores must be 1-D of one length, got {ids.shape} and {values.shape}"
        )
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"item_ids must hold integer ids, got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    real = ids != PAD_ID
    if ids.size and ids.min() < PAD_ID:
        raise ValueError(f"item_ids holds {ids.min()}; ids are >= 0 and padding is {PAD_ID}")
    if not np.isfinite(values[real]).all():
        position = int(np.flatnonzero(real & ~np.isfinite(values))[0])
        raise ValueError(f"scores[{position}] is {values[position]}; real candidates need finite")
    ordered = np.sort(ids[real])
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if repeated.size:
        raise ValueError(f"item_ids lists item {repeated[0]} twice; deduplicate the candidates")
    ages = None
    if item_age_days is not None:
        ages = np.asarray(item_age_days, dtype=np.float64)
        if ages.shape != ids.shape:
            raise ValueError(f"item_age_days must have shape {ids.shape}, got {ages.shape}")
    return ids, values, ages


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _as_id_array(seen: SeenItems) -> IntArray:
    if isinstance(seen, AbstractSet):
        return np.fromiter(seen, dtype=np.int64, count=len(seen))
    return np.asarray(seen, dtype=np.int64).reshape(-1)


def _is_in(ids: IntArray, sorted_ids: IntArray) -> npt.NDArray[np.bool_]:
    """``np.isin`` by binary search: 5-10x faster for a few hundred ids spread over a large
    id range, where ``np.isin`` builds a lookup table as wide as the range."""
    if sorted_ids.size == 0:
        return np.zeros(ids.shape, dtype=bool)
    found = np.minimum(np.searchsorted(sorted_ids, ids), sorted_ids.size - 1)
    return np.asarray(sorted_ids[found] == ids)


def rows_isin(values: npt.NDArray[np.integer], sets: Sequence[SeenItems]) -> npt.NDArray[np.bool_]:
    """``np.isin(values[r], sets[r])`` for every row ``r`` of a ``(n, w)`` id matrix, with one
    sort for all rows (``np.isin`` per row is a few numpy calls per row, most of the work on
    a batch of short rows): each ``(row, id)`` pair becomes one int64 key, ids ranked among
    those present when ``n x id range`` would not fit in 62 bits."""
    n, width = values.shape
    if len(sets) != n:
        raise ValueError(f"rows_isin: {n} rows but {len(sets)} sets")
    members = [_as_id_array(s) for s in sets]
    lengths = np.fromiter((len(m) for m in members), dtype=np.int64, count=n)
    if values.size == 0 or not lengths.any():
        return np.zeros(values.shape, dtype=bool)
    flat, ids = np.concatenate(members), values.reshape(-1).astype(np.int64, copy=False)
    low = min(int(ids.min()), int(flat.min()))
    span = max(int(ids.max()), int(flat.max())) - low + 1
    if n * span < 1 << 62:
        codes, member_codes = ids - low, flat - low
    else:
        _, inverse = np.unique(np.concatenate([ids, flat]), return_inverse=True)
        codes, member_codes = inverse[: len(ids)], inverse[len(ids) :]
        span = int(inverse.max()) + 1
    keys = np.repeat(np.arange(n, dtype=np.int64), width) * span + codes
    owner = np.repeat(np.arange(n, dtype=np.int64), lengths)
    member_keys = np.sort(owner * span + member_codes)
    found = np.minimum(np.searchsorted(member_keys, keys), len(member_keys) - 1)
    return np.asarray(member_keys[found] == keys).reshape(values.shape)


def first_k(
    ids: IntArray, scores: npt.NDArray[np.floating], keep: npt.NDArray[np.bool_], k: int
) -> tuple[IntArray, npt.NDArray[np.float32]]:
    """The first ``k`` kept entries of each row, left-aligned in ``(n, k)`` rows padded with
    ``PAD_ID`` and ``-inf`` (float32 scores)."""
    n = ids.shape[0]
    out_ids = np.full((n, k), PAD_ID, dtype=np.int64)
    out_scores = np.full((n, k), -np.inf, dtype=np.float32)
    rank = np.cumsum(keep, axis=1) - 1
    row, col = np.nonzero(keep & (rank < k))
    out_ids[row, rank[row, col]] = ids[row, col]
    out_scores[row, rank[row, col]] = scores[row, col]
    return out_ids, out_scores


def _relevance(scores: FloatArray, ages: FloatArray | None, config: RerankConfig) -> FloatArray:
    """Min-max normalised scores plus the freshness boost; a constant list is all 1."""
    low, high = scores.min(), scores.max()
    relevance = (scores - low) / (high - low) if high > low else np.ones_like(scores)
    if config.freshness_weight > 0.0:
        relevance = relevance + _boost(ages, config)
    return relevance


def _boost(ages: FloatArray | None, config: RerankConfig) -> FloatArray:
    if ages is None:
        raise ValueError("RerankConfig.freshness_weight > 0 needs item_age_days")
    # Negative ages (clock skew) count as brand new; unknown ages (NaN) get no boost,
    # so missing metadata is never promoted.
    half_lives = np.maximum(ages, 0.0) / config.freshness_half_life_days
    boost: FloatArray = np.nan_to_num(config.freshness_weight * 0.5**half_lives, nan=0.0)
    return boost


def boost_ages(
    first_event_days: npt.ArrayLike, created_days: npt.ArrayLike, clock: FreshnessClock
) -> FloatArray:
    """The ages in days the freshness boost reads, NaN unknown.

    Args:
        first_event_days: days since each item's first event (the ``item_age_days`` feature;
            negative: none).
        created_days: days since each item's catalog creation time (``item_created_days``;
            negative: unknown, or not created yet).
        clock: ``"created"`` takes the creation age where known, else the first event's;
            ``"first_event"`` the first event's only.
    """
    first = np.asarray(first_event_days, dtype=np.float64)
    first = np.where(first >= 0, first, np.nan)
    if clock == "first_event":
        return first
    created = np.asarray(created_days, dtype=np.float64)
    out: FloatArray = np.where(created >= 0, created, first)
    return out


def _categories_of(ids: IntArray, item_categories: npt.ArrayLike) -> IntArray:
    table = np.asarray(item_categories)
    if table.ndim != 1 or not np.issubdtype(table.dtype, np.integer):
        raise ValueError("item_categories must be a 1-D integer array indexed by item id")
    if ids.size and ids.max() >= table.size:
        raise ValueError(
            f"item id {ids.max()} is outside item_categories ({table.size} entries); "
            "load the categories built with the same catalog as the index"
        )
    return table[ids].astype(np.int64, copy=False)


def _greedy_mmr(
    relevance: FloatArray, categories: IntArray, k: int, config: RerankConfig
) -> IntArray:
    """Positions of the picked candidates, in pick order (MMR under the category cap).

    Similarity is 1 within a category and 0 across, so all items of a category share one
    penalty and only each category's best remaining item can win a pick. Two streams hold
    those: categories not yet shown (objective ``lam * rel``, their best items in relevance
    order) and shown ones below the cap (``lam * rel - (1 - lam)``, a heap). Each pick
    compares the two heads: O(L log L + k log C) instead of recomputing L objectives k times.
    Ties go to the higher-relevance item, then to the earlier candidate.
    """
    order = np.argsort(-relevance, kind="stable")  # position p = p-th most relevant
    lam, cap = config.mmr_lambda, config.max_per_category
    ranked_categories = categories[order]
    by_category = np.argsort(ranked_categories, kind="stable")  # positions grouped, ascending
    same_next = ranked_categories[by_category[1:]] == ranked_categories[by_category[:-1]]
    next_pos = np.full(len(order), -1, dtype=np.int64)  # next position of the same category
    next_pos[by_category[:-1][same_next]] = by_category[1:][same_next]
    is_first = np.ones(len(order), dtype=bool)
    is_first[by_category[1:][same_next]] = False
    unshown = np.flatnonzero(is_first).tolist()  # best item of each category, ascending
    value = (lam * relevance[order]).tolist()
    uncapped = (ranked_categories < 0).tolist()  # unknown: one category to MMR, not to the cap
    follow, penalty = next_pos.tolist(), 1.0 - lam
    shown: list[tuple[float, int, int]] = []  # heap of (-objective, position, count so far)
    picks: list[int] = []
    cursor = 0
    while len(picks) < k:
        new = (-value[unshown[cursor]], unshown[cursor]) if cursor < len(unshown) else None
        old = shown[0][:2] if shown else None
        if new is None and old is None:
            break  # candidates ran out, or every category left is capped
        if old is None or (new is not None and new < old):
            position, count = unshown[cursor], 1
            cursor += 1
        else:
            _, position, count = heapq.heappop(shown)
            count += 1
        picks.append(position)
        after = follow[position]
        if after >= 0 and (cap is None or count < cap or uncapped[position]):
            heapq.heappush(shown, (-(value[after] - penalty), after, count))
    return order[np.asarray(picks, dtype=np.int64)]


def rerank(
    item_ids: npt.ArrayLike,
    scores: npt.ArrayLike,
    *,
    k: int,
    config: RerankConfig,
    item_categories: npt.ArrayLike,
    item_age_days: npt.ArrayLike | None = None,
    seen: SeenItems | None = None,
    shown: npt.ArrayLike | None = None,
) -> Reranked:
    """Shape one request's ranked candidates into the list to show.

    Args:
        item_ids: (L,) candidate ids, any order; -1 entries are padding and are dropped.
        scores: (L,) ranker scores of the candidates, higher is better, finite.
        k: length of the list to return.
        config: the :class:`RerankConfig`.
        item_categories: (n_items,) integer category code per item id, -1 unknown.
        item_age_days: (L,) age of each candidate in days, aligned with ``item_ids``; needed
            when ``config.freshness_weight > 0``. NaN means unknown and gets no boost.
        seen: ids the user already interacted with; never shown again.
        shown: (L,) values to report for the candidates in place of ``scores`` (e.g. their
            calibrated click probabilities, while the order follows the ranker's own
            scores, as offline evaluation orders them); the order does not read them.

    Returns:
        :class:`Reranked` of shape (m,) with ``m = min(k, candidates left)``: fewer than ``k``
        when filtering or the category cap leaves too few candidates. The batch helper
        :func:`rerank_lists` pads such rows; a single request returns what there is.
    """
    k = _check_k(k)
    ids, values, ages = _check_request(item_ids, scores, item_age_days)
    reported = _shown_values(shown, values)
    keep = ids != PAD_ID
    if config.blocklist:
        keep &= ~_is_in(ids, config.blocked_ids)
    if seen is not None:
        keep &= ~_is_in(ids, np.sort(_as_id_array(seen)))
    ids, values, reported = ids[keep], values[keep], reported[keep]
    if ids.size == 0:
        return Reranked(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64))
    relevance = _relevance(values, None if ages is None else ages[keep], config)
    if config.mmr_lambda == 1.0 and config.max_per_category is None:
        # Fast path: no list-level interaction, so the pick order is just a sort.
        picks = np.argsort(-relevance, kind="stable")[:k]
    else:
        picks = _greedy_mmr(relevance, _categories_of(ids, item_categories), k, config)
    return Reranked(ids[picks], reported[picks])


def _shown_values(shown: npt.ArrayLike | None, scores: FloatArray) -> FloatArray:
    """``shown`` as float64 of ``scores``' shape (``scores`` itself when ``None``)."""
    if shown is None:
        return scores
    values = np.asarray(shown, dtype=np.float64)
    if values.shape != scores.shape:
        raise ValueError(f"shown must have the scores' shape {scores.shape}, got {values.shape}")
    return values


def rerank_lists(
    item_ids: npt.ArrayLike,
    scores: npt.ArrayLike,
    *,
    k: int,
    config: RerankConfig,
    item_categories: npt.ArrayLike,
    item_age_days: npt.ArrayLike | None = None,
    seen: Sequence[SeenItems] | None = None,
    shown: npt.ArrayLike | None = None,
) -> Reranked:
    """:func:`rerank` for many users at once, for offline evaluation and batch prediction.

    Args:
        item_ids: (n_users, L) candidate ids per user, padded with -1.
        scores: (n_users, L) ranker scores; padded cells may hold anything (e.g. -inf).
        k: length of each returned list.
        config: the :class:`RerankConfig`.
        item_categories: (n_items,) integer category code per item id, -1 unknown.
        item_age_days: (n_users, L) candidate ages in days, aligned with ``item_ids``.
        seen: n_users sets or arrays of already-seen ids (for a CSR ``user_items``:
            ``np.split(user_items.indices, user_items.indptr[1:-1])``).
        shown: (n_users, L) values reported in place of ``scores``, as :func:`rerank`'s.

    Returns:
        :class:`Reranked` of shape (n_users, k), rows padded with -1 ids and -inf scores.
    """
    ids = np.asarray(item_ids)
    values = np.asarray(scores, dtype=np.float64)
    if ids.ndim != 2 or values.shape != ids.shape:
        raise ValueError(
            f"item_ids and scores must be 2-D (n_users, L) of one shape, "
            f"got {ids.shape} and {values.shape}"
        )
    ages = None if item_age_days is None else np.asarray(item_age_days, dtype=np.float64)
    if ages is not None and ages.shape != ids.shape:
        raise ValueError(f"item_age_days must have shape {ids.shape}, got {ages.shape}")
    if seen is not None and len(seen) != ids.shape[0]:
        raise ValueError(f"seen has {len(seen)} users, item_ids has {ids.shape[0]}")
    k = _check_k(k)
    reported = _shown_values(shown, values)
    if config.mmr_lambda == 1.0 and config.max_per_category is None:
        return _sorted_lists(ids, values, k, config, ages, seen, reported)
    out_ids = np.full((ids.shape[0], k), PAD_ID, dtype=np.int64)
    out_scores = np.full((ids.shape[0], k), -np.inf, dtype=np.float64)
    for row in range(ids.shape[0]):  # rerank drops the padding, whatever its scores
        picked = rerank(
            ids[row],
            values[row],
            k=k,
            config=config,
            item_categories=item_categories,
            item_age_days=None if ages is None else ages[row],
            seen=None if seen is None else seen[row],
            shown=reported[row],
        )
        out_ids[row, : len(picked.item_ids)] = picked.item_ids
        out_scores[row, : len(picked.scores)] = picked.scores
    return Reranked(out_ids, out_scores)


def _sorted_lists(
    item_ids: npt.NDArray[np.integer],
    values: FloatArray,
    k: int,
    config: RerankConfig,
    ages: FloatArray | None,
    seen: Sequence[SeenItems] | None,
    reported: FloatArray,
) -> Reranked:
    """:func:`rerank_lists` without list-level interaction (``mmr_lambda`` 1, no category
    cap), all rows at once: the checks, filters, normalisation and stable sort of
    :func:`rerank`'s fast path, element for element, on the whole matrix (the dropped cells
    sort last)."""
    if item_ids.size and not np.issubdtype(item_ids.dtype, np.integer):
        raise ValueError(f"item_ids must hold integer ids, got dtype {item_ids.dtype}")
    ids: IntArray = item_ids.astype(np.int64, copy=False)
    if ids.size and ids.min() < PAD_ID:
        raise ValueError(f"item_ids holds {ids.min()}; ids are >= 0 and padding is {PAD_ID}")
    real = ids != PAD_ID
    bad = real & ~np.isfinite(values)
    if bad.any():
        row, position = (int(i[0]) for i in np.nonzero(bad))
        raise ValueError(
            f"scores[{position}] is {values[row, position]}; real candidates need finite"
        )
    ordered = np.sort(np.where(real, ids, PAD_ID), axis=1)
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != PAD_ID)
    if repeated.any():
        item = ordered[:, 1:][repeated][0]
        raise ValueError(f"item_ids lists item {item} twice; deduplicate the candidates")
    keep = real
    if config.blocklist:
        keep &= ~_is_in(ids, config.blocked_ids)
    if seen is not None:
        keep &= ~rows_isin(ids, seen)
    low = np.where(keep, values, np.inf).min(axis=1, keepdims=True, initial=np.inf)
    high = np.where(keep, values, -np.inf).max(axis=1, keepdims=True, initial=-np.inf)
    spread = high > low
    with np.errstate(invalid="ignore", divide="ignore"):  # rows without a kept candidate
        relevance = np.where(spread, (values - low) / np.where(spread, high - low, 1.0), 1.0)
    if config.freshness_weight > 0.0:
        relevance = relevance + _boost(ages, config)
    order = np.argsort(np.where(keep, -relevance, np.inf), axis=1, kind="stable")[:, :k]
    shown = np.take_along_axis(keep, order, axis=1)
    out_ids = np.full((ids.shape[0], k), PAD_ID, dtype=np.int64)
    out_scores = np.full((ids.shape[0], k), -np.inf, dtype=np.float64)
    width = order.shape[1]
    out_ids[:, :width] = np.where(shown, np.take_along_axis(ids, order, axis=1), PAD_ID)
    out_scores[:, :width] = np.where(shown, np.take_along_axis(reported, order, axis=1), -np.inf)
    return Reranked(out_ids, out_scores)
