"""A feed model directory, loaded: what training wrote and the request path reads.

:func:`mlsd.systems.feed.package.package_model` writes it::

    model/
      model.json       version, source order, candidates per request, re-ranking, the
                       evaluation settings of its held-out scores (for the registry's gate)
      sources/<name>/  each candidate source's serving artifact (mlsd.serving.sources)
      ranking/         the ranker, its calibrator, feature vocabulary and layout, and the merge
                       quotas (warm and cold) its training rows were merged with
      snapshot.npz     per-item and per-user counts as of training (ranker inputs the online
                       store does not hold), item categories for re-ranking
      reference_profile.json  the ranker's inputs and scores at training time (monitoring)

:meth:`FeedModel.load` reads it; :class:`~mlsd.serving.feed.FeedRecommender` serves it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from mlsd.models.ranking.base import Ranker
from mlsd.models.ranking.bundle import RankingBundle
from mlsd.models.retrieval.merge import (
    QUOTAS,
    Fusion,
    MergedCandidates,
    Quota,
    merge_by_segment,
    merge_candidates,
)
from mlsd.serving.rerank import RerankConfig
from mlsd.serving.sources import CandidateSource, UserQuery, load_source

logger = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

MODEL_JSON = "model.json"
SNAPSHOT = "snapshot.npz"
REFERENCE_PROFILE = "reference_profile.json"
FORMAT_VERSION = 1


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
        """Category code indexed by item id (what :func:`~mlsd.serving.rerank.rerank` reads),
        -1 unknown; built once, since a per-request table would cost a catalog-sized
        allocation."""
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
