"""The feed's request path: features → candidate sources → merge → ranker → re-rank.

:class:`FeedRecommender` implements :class:`~mlsd.serving.recommender.Recommender` over a model
directory written by training (:func:`mlsd.systems.feed.package.package_model`)::

    model/
      model.json       version, source order, candidates per request, re-ranking, the
                       evaluation settings of its held-out scores (for the registry's gate)
      sources/<name>/  each candidate source's serving artifact (mlsd.serving.sources)
      ranking/         the ranker, its calibrator, feature vocabulary and layout, and the merge
                       quotas (warm and cold) its training rows were merged with
      snapshot.npz     per-item and per-user counts as of training (ranker inputs the online
                       store does not hold), item categories for re-ranking
      reference_profile.json  the ranker's inputs and scores at training time (monitoring)

Every stage has a deadline (checked when it ends: Python cannot pre-empt a call) and a fallback,
so a failed or slow dependency degrades the answer instead of failing the request:

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

import json
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from mlsd.features.derive import derive
from mlsd.features.online import OnlineFeatures
from mlsd.models.ranking.base import FeatureSchema, Ranker
from mlsd.models.ranking.bundle import RankingBundle
from mlsd.models.ranking.candidates import (
    CLAIMED_SOURCE,
    SourceLists,
    candidate_columns,
    positions_in,
    ranker_inputs,
    request_columns,
)
from mlsd.models.ranking.gbdt import predict_threads
from mlsd.models.retrieval.merge import (
    QUOTAS,
    Fusion,
    MergedCandidates,
    Quota,
    merge_by_segment,
    merge_candidates,
)
from mlsd.serving.precomputed import Precomputed, PrecomputedStore
from mlsd.serving.recommender import (
    BadRequestError,
    CandidateRows,
    Path_,
    Recommendation,
    RecommendRequest,
    RecommendResult,
)
from mlsd.serving.rerank import PAD_ID, RerankConfig, boost_ages, rerank, rerank_lists
from mlsd.serving.sources import CandidateSource, UserQuery, candidates_matrix, load_source

logger = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

MODEL_JSON = "model.json"
SNAPSHOT = "snapshot.npz"
REFERENCE_PROFILE = "reference_profile.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Deadlines:
    """Milliseconds the request may take before it degrades.

    Python cannot interrupt a call, so the budget is checked between stages; the store
    clients carry their own socket timeouts (Redis: ``socket_timeout``)."""

    total_ms: float = 150.0
    """Past this, the ranker is skipped and the merged order served (``"ranker:deadline"``)."""


@dataclass(frozen=True)
class Snapshot:
    """Counts as of training, looked up by id (sorted id arrays + values)."""

    item_ids: IntArray
    item_users_all: FloatArray
    item_created_days_ref: FloatArray
    """Epoch seconds of each item's ``created_ts`` (NaN unknown)."""
    item_category: IntArray
    """Category code per item (index into ``categories``), -1 unknown."""
    user_ids: IntArray
    user_events_all: FloatArray
    seen_indptr: IntArray = field(default_factory=lambda: np.zeros(1, np.int64))
    """CSR row starts over ``user_ids`` into ``seen_items`` (a snapshot without them: none)."""
    seen_items: IntArray = field(default_factory=lambda: np.zeros(0, np.int64))
    """Each user's distinct items of the training events, sorted within the user's row."""

    def seen(self, user_id: int | None) -> IntArray:
        """The user's items as of training, sorted: with the online store's recent items,
        what the request path never recommends (offline evaluation excludes every item seen
        before its cutoff; the recent items alone would let older ones back in)."""
        if user_id is None or len(self.seen_indptr) != len(self.user_ids) + 1:
            return self.seen_items[:0]
        row = int(np.searchsorted(self.user_ids, user_id))
        if row == len(self.user_ids) or self.user_ids[row] != user_id:
            return self.seen_items[:0]
        return self.seen_items[self.seen_indptr[row] : self.seen_indptr[row + 1]]

    @staticmethod
    def _lookup(ids: IntArray, keys: IntArray, values: npt.NDArray[Any], default: float) -> Any:
        if len(keys) == 0:
            return np.full(len(ids), default)
        pos = np.minimum(np.searchsorted(keys, ids), len(keys) - 1)
        return np.where(keys[pos] == ids, values[pos], default)

    def extras(
        self, user_id: int | IntArray | None, item_ids: IntArray, now_s: float
    ) -> dict[str, Any]:
        """Snapshot features of the rows: one user (``None``: anonymous) or one per row."""
        rows = self._item_rows(item_ids)
        known = rows >= 0
        created = np.where(known, self.item_created_days_ref[rows], np.nan)
        days = np.where(np.isnan(created), -1.0, (now_s - created) / 86_400)
        users = np.asarray([-1 if user_id is None else user_id], dtype=np.int64).reshape(-1)
        return {
            "item_users_all": np.where(known, self.item_users_all[rows], 0.0),
            "item_created_days": days,
            "user_events_all": self._lookup(users, self.user_ids, self.user_events_all, 0.0),
        }

    def _item_rows(self, item_ids: IntArray) -> IntArray:
        """Each item's row in ``item_ids``, -1 unknown: :meth:`_lookup`'s rows from a table
        indexed by id (two binary searches in a 1M-item snapshot cost ~70 µs a request)."""
        table = self._dense_rows
        if len(table) == 0:
            return np.full(len(item_ids), -1, dtype=np.int64)
        inside = (item_ids >= 0) & (item_ids < len(table))
        rows: IntArray = np.where(inside, table[np.where(inside, item_ids, 0)], -1)
        return rows

    @cached_property
    def _dense_rows(self) -> IntArray:
        top = int(self.item_ids.max(initial=-1)) + 1
        out = np.full(top, -1, dtype=np.int64)
        out[self.item_ids] = np.arange(len(self.item_ids), dtype=np.int64)
        return out

    @cached_property
    def dense_categories(self) -> IntArray:
        """Category code indexed by item id (what :func:`rerank` reads), -1 unknown; built
        once, since a per-request table would cost a catalog-sized allocation."""
        rows = self._dense_rows
        out: IntArray = np.where(rows >= 0, self.item_category[rows], -1).astype(np.int64)
        return out


@dataclass(frozen=True)
class FeedModel:
    """A loaded model directory."""

    version: str
    sources: dict[str, CandidateSource]
    quotas: dict[str, Quota]
    n_candidates: int
    ranking: RankingBundle
    rerank: RerankConfig
    snapshot: Snapshot
    reference_profile: Path | None = None
    """The training-time profile of the ranker's inputs (None: the model has none)."""
    cold_quotas: dict[str, Quota] | None = None
    """The merge quotas of a user without history (None: ``quotas``), tuned apart on
    validation: every source answers such a user with its fallback list, often the same one,
    so the warm users' quotas would spend slots on duplicates."""
    fusion: Fusion = QUOTAS
    """How the quotas merge the sources (the bundle's: the ranker learned from that merge)."""

    def excluded(self, query: UserQuery) -> IntArray:
        """What the query's user is never recommended, sorted: the recent items the online
        store holds and every item they had seen in the training events
        (:meth:`Snapshot.seen`), as offline evaluation excludes all items seen before its
        cutoff. The request path, batch prediction and the reference profile read it."""
        return np.union1d(query.history, self.snapshot.seen(query.user_id))

    def merge(
        self, lists: Mapping[str, IntArray], queries: Sequence[UserQuery]
    ) -> MergedCandidates:
        """Merge each query's row of the sources' ``(n, n_candidates)`` lists with its quotas:
        :attr:`cold_quotas` for a query without history. One query (a request) takes one
        merge; a batch merges its warm and cold rows apart."""
        width = self.n_candidates
        if len(queries) == 1:
            no_history = len(queries[0].history) == 0
            quotas = (
                self.cold_quotas if no_history and self.cold_quotas is not None else self.quotas
            )
            return merge_candidates(lists, quotas, width, fusion=self.fusion)
        cold = np.array([len(q.history) == 0 for q in queries], dtype=bool)
        return merge_by_segment(
            lists,
            self.quotas,
            width,
            cold=cold,
            cold_quotas=self.cold_quotas,
            fusion=self.fusion,
        )

    @classmethod
    def load(
        cls, path: Path, *, compile_trees: bool = False, inline_trees: bool = False
    ) -> FeedModel:
        """Read a model directory; with ``compile_trees``, its ranker's trees become native
        code (:meth:`Ranker.compile`: the same scores, ~8x faster per request; ``inline_trees``
        for batch prediction's large blocks). A ranker that cannot be compiled serves as it
        is, with a warning."""
        path = Path(path)
        meta_path = path / MODEL_JSON
        if not meta_path.is_file():
            raise ValueError(f"{path}: no {MODEL_JSON}; not a feed model directory")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta_path}: not valid JSON ({err})") from err
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format_version {meta.get('format_version')!r}")
        try:
            with np.load(path / SNAPSHOT, allow_pickle=False) as raw:
                snapshot = Snapshot(**{name: raw[name] for name in raw.files})
        except (OSError, TypeError, ValueError) as err:
            raise ValueError(f"{path / SNAPSHOT}: unreadable snapshot ({err})") from err
        rerank_raw = dict(meta.get("rerank", {}))
        rerank_raw["blocklist"] = frozenset(rerank_raw.get("blocklist", ()))
        rerank_raw.setdefault("freshness_clock", "first_event")  # the clock of older models
        profile = meta.get("reference_profile")
        if profile is not None and not (path / profile).is_file():
            # Serving does not need it: the model serves, its traffic is not drift-checked.
            logger.warning(
                "%s: reference profile %r is missing; no drift monitoring", path, profile
            )
            profile = None
        ranking = RankingBundle.load(path / "ranking")
        if compile_trees:
            _compile_ranker(ranking.ranker, path / "ranking", inline=inline_trees)
        return cls(
            version=str(meta["version"]),
            sources={name: load_source(path / "sources" / name) for name in meta["sources"]},
            quotas=dict(ranking.quotas),  # the bundle's: the ranker was trained on that merge
            n_candidates=int(meta["n_candidates"]),
            ranking=ranking,
            rerank=RerankConfig(**rerank_raw),
            snapshot=snapshot,
            reference_profile=None if profile is None else path / profile,
            cold_quotas=None if ranking.cold_quotas is None else dict(ranking.cold_quotas),
            fusion=ranking.fusion,
        )


def _compile_ranker(ranker: Ranker, where: Path, *, inline: bool) -> None:
    start = time.perf_counter()
    try:
        ranker.compile(inline=inline)
    except (ImportError, ValueError) as err:  # lleaves missing, or a mismatch on the probes
        logger.warning("%s: ranker not compiled, LightGBM scores it (%s)", where, err)
        return
    logger.info("%s: ranker compiled in %.1f s", where, time.perf_counter() - start)


class _Clock:
    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.mark = self.start
        self.stage_ms: dict[str, float] = {}

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
        clock = _Clock()
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
        clock = _Clock()
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
        recent = self.features.user_features(user_id)["recent_item_ids"][0]
        return [int(i) for i in recent[recent >= 0][:n]]

    def ready(self) -> bool:
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
        keep = recent >= 0
        history = recent[keep][::-1]  # stored newest first; sources read oldest → newest
        history_ts = stamps[keep][::-1]
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


def batch_predict(
    recommender: FeedRecommender,
    store: PrecomputedStore,
    user_ids: Sequence[int],
    *,
    k: int,
    chunk: int = 500,
    workers: int = 2,
    now: float | None = None,
    progress: bool = False,
    on_chunk: Callable[[int], None] | None = None,
) -> tuple[int, float]:
    """The offline path: each user's top ``k`` by :meth:`FeedRecommender.recommend_many`,
    written to Redis with the model version and time; returns (users written, users per
    second). Every list is computed as of one time, ``now`` (default: the start).

    Users go ``chunk`` at a time to ``workers`` threads; each takes a chunk through the whole
    path: reads the online store, retrieves and merges its candidates, builds the ranker rows
    (:meth:`~FeedRecommender.prepare_many`), scores them on one thread, re-ranks
    (:meth:`~FeedRecommender.rank_many`) and writes the lists in one pipelined round trip.
    Faiss, the compiled trees, SQLite, Redis I/O and most numpy calls release the GIL; the
    Python between them does not, so two workers keep about 1.75 of two cores busy: at 1M
    items, 200 candidates and 200 compiled trees, about 1.2 ms of CPU per user and 1,490
    users/s, against 780 users/s (before the exact ALS search) with one thread preparing
    chunks and the other ranking them. Processes do not share a GIL:
    :func:`batch_predict_processes` forks one-thread workers from one loaded model (about
    0.8-0.9 ms of CPU per user: the candidate sources ~0.3, the trees ~0.15 when compiled
    with inlining, the online-store read ~0.13; 2,270-2,420 users/s on two quiet cores),
    and ``mlsd feed batch-predict --shard I/N`` splits the users among machines. One request
    path for both answers means a precomputed list is what the online path would have said at
    batch time.

    ``on_chunk(n)`` is called after each chunk's ``n`` users are written.
    """
    from concurrent.futures import ThreadPoolExecutor

    from rich.progress import Progress

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 users, got {chunk}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    start = time.perf_counter()
    now = time.time() if now is None else now

    def one_chunk(lo: int) -> int:
        batch = recommender.prepare_many([int(u) for u in user_ids[lo : lo + chunk]], now=now)
        with predict_threads(1):  # the other worker has the other core
            items, scores = recommender.rank_many(batch, k=k)
        store.write(
            batch.user_ids,
            items,
            scores.astype(np.float32),
            model_version=recommender.version,
            computed_at=now,  # the time the lists are as of, not the time they were written
            k=k,
            sources=batch.claimed(items),  # what the online answer names as each item's source
            source_names=batch.source_names,
        )
        return len(batch.user_ids)

    written = 0
    with (
        Progress(disable=not progress, transient=True) as bar,
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="batch") as pool,
    ):
        task = bar.add_task("batch predictions", total=len(user_ids))
        for done in pool.map(one_chunk, range(0, len(user_ids), chunk)):
            written += done
            bar.advance(task, done)
            if on_chunk is not None:
                on_chunk(done)
    seconds = time.perf_counter() - start
    return written, written / max(seconds, 1e-9)


def batch_predict_processes(
    recommender: FeedRecommender,
    store: PrecomputedStore,
    user_ids: Sequence[int],
    *,
    k: int,
    processes: int,
    chunk: int = 500,
    now: float | None = None,
    progress: bool = False,
) -> tuple[int, float]:
    """:func:`batch_predict` in ``processes`` forked children of this process, each taking
    every ``processes``-th user on one thread; returns (users written, users per second from
    the fork to the last child's exit).

    Threads in one process share the GIL, and separate processes (``--shard I/N``) each load
    the model (at 1M items about a minute of CPU and 1.5 GB apiece) and start predicting when
    their own load ends, so they overlap for only part of the run. Children forked from one
    loaded model share its pages copy-on-write (``gc.freeze`` first keeps the collector from
    touching, and so copying, them) and start together. Each child drops the inherited SQLite
    connection (:meth:`OnlineFeatures.after_fork`); Redis clients reconnect on their own.
    Linux and macOS only (``fork``). A child that fails makes this raise, naming it.
    """
    import gc
    import multiprocessing

    from rich.progress import Progress

    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    now = time.time() if now is None else now
    features = recommender.features
    if features is not None:
        features.wait_for_refresh()
    context = multiprocessing.get_context("fork")
    done: multiprocessing.queues.SimpleQueue[int] = context.SimpleQueue()

    def child(part: int) -> None:
        if features is not None:
            features.after_fork()
        batch_predict(
            recommender,
            store,
            user_ids[part::processes],
            k=k,
            chunk=chunk,
            workers=1,
            now=now,
            on_chunk=done.put,
        )

    start = time.perf_counter()
    gc.freeze()
    try:
        children = [
            context.Process(target=child, args=(part,), name=f"batch-{part}")
            for part in range(processes)
        ]
        for process in children:
            process.start()
    finally:
        gc.unfreeze()
    written = 0
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("batch predictions", total=len(user_ids))
        while any(process.is_alive() for process in children) or not done.empty():
            while not done.empty():
                n = done.get()
                written += n
                bar.advance(task, n)
            time.sleep(0.05)
    seconds = time.perf_counter() - start
    for part, process in enumerate(children):
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(
                f"batch worker {part}/{processes} (pid {process.pid}) exited with code "
                f"{process.exitcode}; its error is above"
            )
    return written, written / max(seconds, 1e-9)
