"""The feed's request path: features → candidate sources → merge → ranker → re-rank.

:class:`FeedRecommender` implements :class:`~mlsd.serving.recommender.Recommender` over a loaded
model directory (:class:`~mlsd.serving.feed_model.FeedModel`, which says what the directory
holds); batch prediction runs the same path for many users (:mod:`mlsd.serving.batch`).

Every stage has a fallback, and the request one budget (:class:`Deadlines`, counted from its
arrival at the service, the wait for a model thread included, and checked before the ranker:
Python cannot pre-empt a call; the store clients carry their own socket timeouts), so a failed
or slow dependency degrades the answer instead of failing the request:

- precomputed list (Redis) unavailable → the online path;
- feature store down → the user's defaults (cold-start features), ``"features"`` in fallbacks;
- a candidate source raising → its candidates are dropped (``"source:<name>"``);
- ranker failure, or the request already over its budget → the merged order (``"ranker"``);
- no candidate at all → this version's precomputed list of any age, then the most popular items.

For monitoring, an online answer whose ranker ran carries the ranker's rows of the request
(:class:`~mlsd.serving.recommender.CandidateRows`) for a sampled share
``candidates_sample_rate`` of requests; the service logs them as its ``candidates`` table.

The ranker scores its rows as one float block (``ranker_inputs``, what LightGBM reads), not
as the DataFrame training builds from the same function: for a request's 200 rows, building and
checking the frame cost ~1.8 ms of CPU, more than the 200 trees. Only a sampled request's rows
become a frame, for the log. Batch prediction scores the same block
(:attr:`PreparedBatch.features`), built for all users of a chunk at once: each user's stored
features are passed once with the owner of every candidate row (``derive`` and
``request_columns`` repeat only the values the ranker reads, never a user's history or
per-category lists), so each user's rows are, to the bit, the block its request scores.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from mlsd.features.derive import derive
from mlsd.features.online import OnlineFeatures
from mlsd.models.ranking.base import FeatureSchema
from mlsd.models.ranking.candidates import (
    CLAIMED_SOURCE,
    SourceLists,
    candidate_columns,
    positions_in,
    ranker_inputs,
    request_columns,
)
from mlsd.serving.feed_model import FeedModel, Snapshot
from mlsd.serving.precomputed import Precomputed, PrecomputedStore
from mlsd.serving.recommender import (
    BadRequestError,
    CandidateRows,
    Path_,
    Recommendation,
    RecommendRequest,
    RecommendResult,
)
from mlsd.serving.rerank import PAD_ID, boost_ages, rerank, rerank_lists
from mlsd.serving.sources import UserQuery, candidates_matrix

READY_PROBE_S = 5.0
"""How often :meth:`FeedRecommender.ready` reads a store whose last read failed."""
READY_PROBE_USER = -(2**62)
"""The user :meth:`FeedRecommender.ready` reads: one no store holds (it gets the defaults)."""

logger = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Deadlines:
    """Milliseconds the request may take before it degrades.

    Python cannot interrupt a call, so the budget is checked between stages; the store
    clients carry their own socket timeouts (Redis: ``socket_timeout``)."""

    total_ms: float = 150.0
    """Past this, the ranker is skipped and the merged order served (``"ranker:deadline"``)."""


class _Clock:
    """Stage laps of one request; its total (what the deadline checks) counts from its arrival
    (:meth:`RecommendRequest.arrival`), the wait for a model thread before the first stage
    being the ``queue`` stage."""

    def __init__(self, request: RecommendRequest) -> None:
        self.mark = time.perf_counter()
        self.start = request.arrival(self.mark)
        self.stage_ms: dict[str, float] = {}
        if request.arrived is not None:
            self.stage_ms["queue"] = (self.mark - self.start) * 1000

    def lap(self, stage: str) -> float:
        now = time.perf_counter()
        self.stage_ms[stage] = (now - self.mark) * 1000
        self.mark = now
        return self.stage_ms[stage]

    def total(self) -> float:
        return (time.perf_counter() - self.start) * 1000


@dataclass(frozen=True)
class PreparedBatch:
    """Users through retrieval, the merge and feature assembly
    (:meth:`FeedRecommender.prepare_many`): the ranker's input.

    Attributes:
        user_ids: the users, in order.
        excludes: each user's seen items (never recommended), sorted.
        candidates: ``(n_users, n_candidates)`` merged candidates, padded with ``PAD_ID``.
        features: the ranker's rows as :func:`ranker_inputs` gives them (one float64 block,
            ``schema``'s columns), one per non-padding cell of ``candidates`` (row-major);
            :attr:`frame` is the DataFrame of them.
        schema: the block's columns.
        ages: ``(rows,)`` the candidates' ages in days (NaN unknown), for the freshness boost.
        sources: ``(n_users, n_candidates)`` index into ``source_names`` of the source that
            claimed each candidate (negative at padding), as a request's answer names it.
        source_names: the merge's sources.
    """

    user_ids: list[int]
    excludes: list[IntArray]
    candidates: IntArray
    features: FloatArray
    schema: FeatureSchema
    ages: FloatArray
    sources: npt.NDArray[np.int8]
    source_names: tuple[str, ...]

    def claimed(self, item_ids: IntArray) -> IntArray:
        """``(n_users, k)`` source index of each of :meth:`FeedRecommender.rank_many`'s items
        (-1 at padding or for an item not among the user's candidates)."""
        found, col = positions_in(item_ids, self.candidates)
        claimed = self.sources[np.arange(len(item_ids))[:, None], col].astype(np.int64)
        return np.where(found, claimed, -1)

    @property
    def frame(self) -> pd.DataFrame:
        """The ranker's rows as the DataFrame :func:`ranker_frame` builds (training's form)."""
        return self.schema.frame(self.features)


class FeedRecommender:
    """The feed model behind the service (see the module docstring).

    Args:
        model: the loaded model directory.
        features: the online feature store reader (``None``: every user is cold).
        precomputed: batch predictions in Redis (``None``: always online).
        deadlines: stage budgets.
        max_age_s: a precomputed list older than this is not served as fresh.
        candidates_sample_rate: share of online answers that carry the ranker's rows
            (``RecommendResult.candidates``), in [0, 1].
    """

    def __init__(
        self,
        model: FeedModel,
        *,
        features: OnlineFeatures | None = None,
        precomputed: PrecomputedStore | None = None,
        deadlines: Deadlines | None = None,
        max_age_s: float | None = 86_400.0,
        candidates_sample_rate: float = 0.0,
    ) -> None:
        if not 0.0 <= candidates_sample_rate <= 1.0:
            raise ValueError(
                f"candidates_sample_rate must be in [0, 1], got {candidates_sample_rate}"
            )
        self.model = model
        self.version = model.version
        self.features = features
        self.precomputed = precomputed
        self.deadlines = deadlines or Deadlines()
        self.max_age_s = max_age_s
        self.candidates_sample_rate = candidates_sample_rate
        self._healthy_features = True
        self._probed_at: float | None = None  # time.monotonic() of ready()'s last store read

    @property
    def reference_profile_path(self) -> Path | None:
        """The model's reference profile (what the service's monitor compares traffic with)."""
        return self.model.reference_profile

    def warm_up(self) -> FeedRecommender:
        """Load the item cache and run the path once (lazy imports, first-call allocations),
        so the first real request meets its deadlines; a reload swaps in a warm model."""
        if self.features is not None:
            self.features.refresh_item_cache()
        budget = self.deadlines
        self.deadlines = Deadlines(total_ms=float("inf"))
        try:
            self.recommend(RecommendRequest(None, k=1, allow_precomputed=False))
        finally:
            self.deadlines = budget
        return self

    # -- the protocol ------------------------------------------------------------------------

    async def recommend_fast(self, request: RecommendRequest) -> RecommendResult | None:
        """A fresh precomputed list read on the event loop (an asyncio Redis client), or
        ``None``: no list, a stale one, Redis failing, or a request that cannot take one;
        :meth:`recommend` then answers (and looks again: a miss costs one more GET)."""
        store, user_id = self.precomputed, request.user_id
        if not self._may_precompute(request) or request.k < 1 or user_id is None:
            return None
        if store is None or not store.can_await:
            return None
        clock = _Clock(request)
        try:
            found = await store.lookup_async(
                user_id,
                model_version=self.version,
                max_age_s=self.max_age_s,
                now=request.now,
            )
        except Exception:  # Redis down: the thread path records the fallback
            return None
        served = self._served(found.result, request)
        clock.lap("precomputed")
        return None if served is None else self._result(served, "precomputed", clock, [])

    def recommend(self, request: RecommendRequest) -> RecommendResult:
        if request.k < 1:
            raise BadRequestError(f"k must be >= 1, got {request.k}")
        clock = _Clock(request)
        fallbacks: list[str] = []
        if self._may_precompute(request):
            served = self._precomputed(request, fallbacks, fresh=True)
            clock.lap("precomputed")
            if served is not None:
                return self._result(served, "precomputed", clock, fallbacks)
        user = self._user(request.user_id, fallbacks)
        clock.lap("features")
        query = self._query(request, user)
        exclude = self.model.excluded(query)
        lists = self._retrieve(query, exclude, fallbacks)
        clock.lap("retrieval")
        if not any(len(items) for items, _ in lists.values()):
            return self._degraded(request, exclude, clock, fallbacks)
        width = self.model.n_candidates
        scored = SourceLists(
            {name: _row(items, width) for name, (items, _) in lists.items()},
            {name: _row(scores, width, fill=-np.inf) for name, (_, scores) in lists.items()},
        )
        merged = self.model.merge(scored.items, [query])
        uid = -1 if request.user_id is None else request.user_id
        pairs = candidate_columns([uid], merged, scored)
        clock.lap("merge")
        item_ids = np.asarray(pairs["item_id"], dtype=np.int64)
        order, probs, ages, rows = self._rank(request, user, pairs, clock, fallbacks)
        clock.lap("ranking")
        final = rerank(
            item_ids,
            order,
            k=request.k,
            config=self.model.rerank,
            item_categories=_dense_categories(self.model.snapshot, item_ids),
            item_age_days=ages if self.model.rerank.freshness_weight > 0 else None,
            seen=exclude,
            shown=probs,
        )
        clock.lap("rerank")
        row_of = {item: row for row, item in enumerate(item_ids.tolist())}
        claimed = pairs[CLAIMED_SOURCE]
        items = []
        for i, s in zip(final.item_ids.tolist(), final.scores.tolist(), strict=True):
            row = row_of.get(i)
            source = "?" if row is None else str(claimed[row])
            reasons = self._reasons(row, pairs) if request.explain and row is not None else ()
            items.append(Recommendation(int(i), float(s), source, reasons))
        candidates = None
        if rows is not None and random.random() < self.candidates_sample_rate:
            layout = self.model.ranking.layout
            matrix, schema = rows
            candidates = CandidateRows(
                item_ids, probs, schema.frame(matrix), layout.numeric, layout.categorical
            )
        return self._result(items, "online", clock, fallbacks, candidates)

    def recommend_many(
        self, user_ids: Sequence[int], *, k: int, now: float | None = None
    ) -> list[tuple[IntArray, FloatArray]]:
        """The online path for many users at once (batch prediction): each user's top ``k``
        item ids and scores, as :meth:`recommend` would answer them at ``now``.

        :meth:`prepare_many` then :meth:`rank_many`: every stage runs over all users together
        (one online-store read, one search per vector-index width, one merge, one derive, one
        ranker call, one re-ranking). No fallbacks: a failing dependency fails the batch (a job
        retries; a request degrades).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not len(user_ids):
            return []
        ids, scores = self.rank_many(self.prepare_many(user_ids, now=now), k=k)
        lengths = (ids != PAD_ID).sum(axis=1).tolist()
        return [(ids[row, :m], scores[row, :m]) for row, m in enumerate(lengths)]

    def prepare_many(self, user_ids: Sequence[int], *, now: float | None = None) -> PreparedBatch:
        """The first part of :meth:`recommend_many`: the users' stored features (one online
        store read), their merged candidates (each source over all users at once) and the
        ranker's rows. :meth:`rank_many` does the rest without the online store or the
        indexes, so consecutive batches can run the two parts in two threads."""
        if self.features is None:
            raise RuntimeError("FeedRecommender needs an OnlineFeatures for batch prediction")
        model, bundle, width = self.model, self.model.ranking, self.model.n_candidates
        now_s = int(now if now is not None else time.time())
        users = self.features.users_features(user_ids)
        queries = [
            self._query(
                RecommendRequest(int(u), k=1, now=now_s),
                {name: values[row : row + 1] for name, values in users.items()},
            )
            for row, u in enumerate(user_ids)
        ]
        excludes = [model.excluded(q) for q in queries]
        lists = {
            name: candidates_matrix(source, queries, width, excludes=excludes)
            for name, source in model.sources.items()
        }
        scored = SourceLists(
            {name: ids for name, (ids, _) in lists.items()},
            {name: scores for name, (_, scores) in lists.items()},
        )
        merged = model.merge(dict(scored.items), queries)
        pairs = candidate_columns(np.asarray(user_ids, dtype=np.int64), merged, scored)
        item_ids = np.asarray(pairs["item_id"], dtype=np.int64)
        owner = np.nonzero(merged.item_ids != PAD_ID)[0]  # each row's user
        items = self.features.item_features(item_ids)
        derived = derive(users, items, now_s=now_s, config=self.features.config, owner=owner)
        extras = model.snapshot.extras(pairs["user_id"], item_ids, float(now_s))
        frame = request_columns(
            pairs,
            user=users,
            items=items,
            derived=derived,
            extras=extras,
            layout=bundle.layout,
            config=bundle.feature_config,
            owner=owner,
        )
        # The block the ranker reads, as a request scores it (the DataFrame of a chunk's 100K
        # rows cost 0.02-0.06 ms of CPU per user to build, for nothing).
        features, schema = ranker_inputs(
            frame, bundle.layout, bundle.vocabulary, bundle.feature_config
        )
        return PreparedBatch(
            [int(u) for u in user_ids],
            excludes,
            merged.item_ids,
            features,
            schema,
            self._ages(derived, extras),
            merged.source,
            merged.source_names,
        )

    def rank_many(self, batch: PreparedBatch, *, k: int) -> tuple[IntArray, FloatArray]:
        """The rest of :meth:`recommend_many`: the ranker on a :meth:`prepare_many` batch's
        rows, then the re-ranking. Returns ``(n_users, k)`` item ids and scores, best first,
        rows padded with ``PAD_ID`` and ``-inf``."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        model, candidates = self.model, batch.candidates
        real = candidates != PAD_ID  # one ranker row per cell, row by row
        scores = np.full(candidates.shape, -np.inf)
        probs = np.full(candidates.shape, -np.inf)
        scores[real] = model.ranking.scores_matrix(batch.features, batch.schema)
        probs[real] = model.ranking.calibrated(scores[real])
        ages = None
        if model.rerank.freshness_weight > 0:
            ages = np.full(candidates.shape, np.nan)
            ages[real] = batch.ages
        final = rerank_lists(
            candidates,
            scores,
            k=k,
            config=model.rerank,
            item_categories=_dense_categories(model.snapshot, candidates[real]),
            item_age_days=ages,
            seen=batch.excludes,
            shown=probs,
        )
        return final.item_ids, final.scores

    def record_events(self, events: Sequence[Mapping[str, object]]) -> int:
        if self.features is None or not events:
            return 0
        frame = pd.DataFrame(list(events))
        if "ts" not in frame:
            frame["ts"] = time.time()
        frame["ts"] = pd.to_datetime(frame["ts"].fillna(time.time()), unit="s", utc=True)
        frame["value"] = frame.get("value", 1.0)
        accepted = self.features.push_events(frame)
        if self.precomputed is not None:  # lists computed before these events must skip them
            known = frame[frame["user_id"].notna() & frame["item_id"].notna()]
            try:
                self.precomputed.note_consumed(known["user_id"], known["item_id"])
            except Exception:
                logger.warning("could not record consumed items for the precomputed lists")
        return accepted

    def history(self, user_id: int, n: int = 20) -> list[int]:
        if self.features is None:
            return []
        user = self.features.user_features(user_id)
        recent = user["recent_item_ids"][0][: int(user["recent_len"][0])]  # the rest: padding
        return [int(i) for i in recent[:n]]

    def ready(self) -> bool:
        """Whether the online feature store answered its last read. Until a request has read
        it, and while its last read failed, the store is read here (an unknown user's row, at
        most every :data:`READY_PROBE_S`): a replica whose store was down from the start is not
        ready, and one that a failed read took out of rotation, where no request reaches it,
        comes back once the store answers."""
        if self.features is None or (self._healthy_features and self._probed_at is not None):
            return True
        now = time.monotonic()
        if self._probed_at is None or now - self._probed_at >= READY_PROBE_S:
            self._probed_at = now
            try:
                self.features.user_features(READY_PROBE_USER)
                self._healthy_features = True
            except Exception:
                logger.warning("feature store read failed in the readiness check")
                self._healthy_features = False
        return self._healthy_features

    # -- stages ------------------------------------------------------------------------------

    @staticmethod
    def _may_precompute(request: RecommendRequest) -> bool:
        """Whether a precomputed list may answer: a known user who allows it and asks no
        explanation (a list keeps no reasons; the online path gives them)."""
        return request.allow_precomputed and request.user_id is not None and not request.explain

    def _precomputed(
        self,
        request: RecommendRequest,
        fallbacks: list[str],
        *,
        fresh: bool,
        seen: IntArray | None = None,
    ) -> list[Recommendation] | None:
        """This version's list for the user: fresh (at most ``max_age_s`` old), or of any
        age (``fresh=False``, the stale fallback, which also skips ``seen``)."""
        if self.precomputed is None or request.user_id is None:
            return None
        try:
            found = self.precomputed.lookup(
                request.user_id,
                model_version=self.version,
                max_age_s=self.max_age_s if fresh else None,
                now=request.now,
            )
        except Exception:  # Redis down: the online path answers
            fallbacks.append("precomputed")
            return None
        return self._served(found.result, request, seen)

    def _served(
        self, hit: Precomputed | None, request: RecommendRequest, seen: IntArray | None = None
    ) -> list[Recommendation] | None:
        """The first ``k`` items of a precomputed list less what the online path would skip
        now: the blocklist, the items the user consumed since the batch, the request's own
        recent items (and ``seen``); ``None`` when what is left is not the model's whole
        answer (:meth:`Precomputed.serves`)."""
        if hit is None or len(hit.item_ids) == 0:
            return None
        skip = [self.model.rerank.blocked_ids, hit.consumed]
        if request.recent_items:
            skip.append(np.asarray(request.recent_items, dtype=np.int64))
        if seen is not None:
            skip.append(seen)
        exclude = np.concatenate(skip) if any(len(part) for part in skip) else skip[0]
        answer = hit.serves(request.k, exclude)
        if answer is None or len(answer[0]) == 0:
            return None
        ids, scores, sources = answer
        return [
            Recommendation(int(i), float(s), source)
            for i, s, source in zip(ids.tolist(), scores.tolist(), sources, strict=True)
        ]

    def _user(self, user_id: int | None, fallbacks: list[str]) -> dict[str, np.ndarray]:
        if self.features is None:
            raise RuntimeError("FeedRecommender needs an OnlineFeatures for the online path")
        if user_id is None:
            return self.features.default_user()
        try:
            user = self.features.user_features(user_id)
            self._healthy_features = True
        except Exception:
            logger.warning("feature store read failed; serving user %s as cold", user_id)
            self._healthy_features = False
            fallbacks.append("features")
            return self.features.default_user()
        return user

    def _query(self, request: RecommendRequest, user: Mapping[str, np.ndarray]) -> UserQuery:
        recent = np.asarray(user["recent_item_ids"][0], dtype=np.int64)
        stamps = np.asarray(user["recent_ts"][0], dtype=np.int64)
        real = int(user["recent_len"][0])  # the rest is padding (-1 is also an item id)
        history = recent[:real][::-1]  # stored newest first; sources read oldest → newest
        history_ts = stamps[:real][::-1]
        now_s = int(request.now if request.now is not None else time.time())
        if request.recent_items:
            extra = np.asarray(list(request.recent_items), dtype=np.int64)
            history = np.concatenate([history, extra])
            history_ts = np.concatenate([history_ts, np.full(len(extra), now_s)])
        attributes = {
            name: str(user[name][0])
            for name in self.model.ranking.feature_config.user_attributes
            if name in user
        }
        return UserQuery(request.user_id, history, history_ts, attributes, now_s)

    def _retrieve(
        self, query: UserQuery, exclude: IntArray, fallbacks: list[str]
    ) -> dict[str, tuple[IntArray, npt.NDArray[np.floating]]]:
        lists: dict[str, tuple[IntArray, npt.NDArray[np.floating]]] = {}
        for name, source in self.model.sources.items():
            try:
                lists[name] = source.candidates(query, self.model.n_candidates, exclude=exclude)
            except Exception:
                logger.exception("candidate source %s failed", name)
                fallbacks.append(f"source:{name}")
                lists[name] = (np.zeros(0, np.int64), np.zeros(0, np.float32))
        return lists

    def _ages(self, derived: Mapping[str, Any], extras: Mapping[str, Any]) -> FloatArray:
        """The rows' ages for the freshness boost, by the model's clock (NaN unknown)."""
        return boost_ages(
            derived["item_age_days"], extras["item_created_days"], self.model.rerank.freshness_clock
        )

    def _rank(
        self,
        request: RecommendRequest,
        user: Mapping[str, np.ndarray],
        pairs: Mapping[str, npt.NDArray[Any]],
        clock: _Clock,
        fallbacks: list[str],
    ) -> tuple[FloatArray, FloatArray, FloatArray, tuple[FloatArray, FeatureSchema] | None]:
        """The ranker's scores, which order the list as offline evaluation orders it, and
        their calibrated click probabilities, which the answer shows (both the merged order
        on failure); item ages; the ranker's features as :func:`ranker_inputs` gives them
        (``None`` when the ranker did not run): the DataFrame is built only for a request
        whose rows are logged."""
        item_ids = np.asarray(pairs["item_id"], dtype=np.int64)
        merged_order = 1.0 - np.arange(len(item_ids)) / max(len(item_ids), 1)
        ages = np.full(len(item_ids), np.nan)
        if self.features is None or clock.total() > self.deadlines.total_ms:
            fallbacks.append("ranker:deadline")
            return merged_order, merged_order, ages, None
        bundle = self.model.ranking
        try:
            now = pd.Timestamp(
                request.now if request.now is not None else time.time(), unit="s", tz="UTC"
            )
            batch = self.features.features_for(user, item_ids, request.context, now=now)
            now_s = now.value / 1e9
            extras = self.model.snapshot.extras(request.user_id, item_ids, now_s)
            frame = request_columns(
                pairs,
                user=batch.user,
                items=batch.items,
                derived=batch.derived,
                extras=extras,
                layout=bundle.layout,
                config=bundle.feature_config,
            )
            matrix, schema = ranker_inputs(
                frame, bundle.layout, bundle.vocabulary, bundle.feature_config
            )
            scores = bundle.scores_matrix(matrix, schema)
            probs = bundle.calibrated(scores)
            ages = self._ages(batch.derived, extras)
        except Exception:
            logger.exception("ranking failed; serving the merged order")
            fallbacks.append("ranker")
            return merged_order, merged_order, ages, None
        return scores, np.asarray(probs, dtype=np.float64), ages, (matrix, schema)

    def _degraded(
        self, request: RecommendRequest, seen: IntArray, clock: _Clock, fallbacks: list[str]
    ) -> RecommendResult:
        """Every source came back empty: this version's precomputed list of any age, else the
        popular items, less what the user has seen and the blocklist (the re-ranker's filters)."""
        served = self._precomputed(request, fallbacks, fresh=False, seen=seen)
        if served is not None:
            return self._result(served, "fallback:precomputed", clock, fallbacks)
        popular = self.model.sources.get("popularity")
        items: list[Recommendation] = []
        if popular is not None:
            query = UserQuery(request.user_id, np.zeros(0, np.int64), np.zeros(0, np.int64), {}, 0)
            exclude = np.union1d(seen, self.model.rerank.blocked_ids)
            ids, scores = popular.candidates(query, request.k, exclude=exclude)
            items = [
                Recommendation(int(i), float(s), "popularity")
                for i, s in zip(ids.tolist(), scores.tolist(), strict=True)
            ]
        return self._result(items, "fallback:popular", clock, fallbacks)

    def _reasons(self, row: int, pairs: Mapping[str, npt.NDArray[Any]]) -> tuple[str, ...]:
        rrank = {
            name: float(pairs[f"rrank_{name}"][row])
            for name in self.model.sources
            if f"rrank_{name}" in pairs
        }
        proposed = [name for name, value in rrank.items() if value > 0.0]
        reasons = [f"proposed by {', '.join(proposed)}"] if proposed else []
        best = max(proposed, key=lambda n: rrank[n], default=None)
        if best is not None:
            rank = round(1.0 / rrank[best])
            reasons.append(f"#{rank} for you in {best}")
        return tuple(reasons)

    def _result(
        self,
        items: list[Recommendation],
        path: Path_,
        clock: _Clock,
        fallbacks: list[str],
        candidates: CandidateRows | None = None,
    ) -> RecommendResult:
        stage_ms = dict(clock.stage_ms)
        stage_ms["total"] = clock.total()
        return RecommendResult(
            items, path, self.version, stage_ms, tuple(fallbacks), candidates=candidates
        )


def _row(values: npt.ArrayLike, width: int, *, fill: float = -1) -> npt.NDArray[Any]:
    """A 1-D list as a ``(1, width)`` row, padded with ``fill``."""
    array = np.asarray(values)
    out = np.full((1, width), fill, dtype=array.dtype if array.size else np.float64)
    out[0, : min(len(array), width)] = array[:width]
    return out


def _dense_categories(snapshot: Snapshot, item_ids: IntArray) -> IntArray:
    """Category codes indexed by item id (what :func:`rerank` reads), for these candidates."""
    table = snapshot.dense_categories
    top = int(item_ids.max(initial=0)) + 1
    if top <= len(table):
        return table
    out = np.full(top, -1, dtype=np.int64)  # an item newer than the snapshot: a wider table
    out[: len(table)] = table
    return out
