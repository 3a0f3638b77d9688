"""EASE (Steck 2019): a linear item-to-item model with a closed-form solution.

With the binary users × items matrix ``X`` and ``P = (XᵀX + λI)⁻¹``, the weights are
``B = I − P · diag(1 / diag(P))``: ``B[i, j] = −P[i, j] / P[j, j]`` off the diagonal, 0 on it
(an item may not predict itself). A user's scores are ``x_u · B``. The cost is one dense
``n × n`` inversion over the items that have training events — ``n² × 4`` bytes of memory
(1.6 GB at 20k items, 10 GB at 50k) and ``O(n³)`` time — hence the ``max_items`` guard.
"""

from __future__ import annotations

from typing import Self

import numpy as np
import numpy.typing as npt
import scipy.linalg
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from mlsd.models.retrieval.base import (
    FloatArray,
    IntArray,
    InteractionMatrix,
    RetrievalData,
    Retriever,
)
from mlsd.models.retrieval.popularity import PopularityRetriever, decayed_user_items, fit_fallback
from mlsd.models.retrieval.topk import check_fitted, recommend_from_scores


def ease_weights(user_items: sp.csr_matrix, l2: float) -> FloatArray:
    """EASE item-item weights ``B`` (n_items × n_items, float32, zero diagonal).

    Args:
        user_items: ``X``, ``(n_users, n_items)``, binary or weighted interactions.
        l2: the ridge weight λ (> 0) added to the Gram matrix's diagonal.
    """
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0 for XᵀX + λI to be invertible, got {l2}")
    x = sp.csr_matrix(user_items, dtype=np.float32)
    gram = (x.T @ x).toarray()
    gram[np.diag_indices_from(gram)] += l2
    # XᵀX + λI is symmetric positive definite, and its transpose (Fortran order) is itself:
    # a Cholesky inverse in place (overwrite_a) keeps a single n × n buffer alive.
    inverse = scipy.linalg.inv(gram.T, overwrite_a=True, check_finite=False, assume_a="pos")
    weights = np.asarray(inverse).T
    weights /= -np.diag(weights).copy()[np.newaxis, :]
    weights[np.diag_indices_from(weights)] = 0.0
    return np.ascontiguousarray(weights, dtype=np.float32)


class EASERetriever(Retriever):
    """Embarrassingly shallow autoencoder: scores ``x_u · B`` with ``B`` in closed form.

    ``X`` holds event counts (binary for MovieLens ratings), each event weighted
    ``2 ** (-age_days / half_life_days)`` when a half-life is given, so recent co-occurrences
    shape ``B`` more and a user's recent items weigh more in ``x_u``. Only items with training
    events take part in the inversion (the others would get all-zero weights anyway); they
    score 0 for warm users.

    Args:
        l2: the ridge weight λ; larger values shrink the weights of rarely seen items.
        half_life_days: age in days at which an event counts half; ``None`` counts all alike.
        max_items: refuse to fit above this many items with events (memory ``n² × 4`` bytes).
        num_threads: BLAS threads for the inversion. 1 by default: on a shared 2-core machine
            two OpenBLAS threads made the ML-100K fit 30× slower (0.3 s → 9 s).
        fallback: answers cold users (fitted on a copy); ``None`` = ``PopularityRetriever()``.

    Attributes:
        weights_: ``(n_active, n_active)`` float32 ``B`` over the active items.
        active_items_: ``(n_active,)`` columns of ``interactions_`` that have training events.
        user_items_: ``(n_users, n_active)`` float32 CSR ``X``, rows as in ``interactions_``.
        interactions_: the training window's users × items matrix (event counts).
        fallback_: the fitted copy of ``fallback`` that answers cold users.
    """

    name = "ease"

    weights_: FloatArray
    active_items_: IntArray
    user_items_: sp.csr_matrix
    interactions_: InteractionMatrix
    fallback_: PopularityRetriever

    def __init__(
        self,
        l2: float = 200.0,
        half_life_days: float | None = None,
        max_items: int = 50_000,
        num_threads: int = 1,
        fallback: PopularityRetriever | None = None,
    ) -> None:
        self.l2 = l2
        self.half_life_days = half_life_days
        self.max_items = max_items
        self.num_threads = num_threads
        self.fallback = fallback

    def fit(self, train: RetrievalData) -> Self:
        interactions = InteractionMatrix.from_events(train.events, train.items["item_id"])
        active = np.flatnonzero(interactions.user_items.getnnz(axis=0)).astype(np.int64)
        if len(active) > self.max_items:
            gigabytes = len(active) ** 2 * 4 / 1e9
            raise ValueError(
                f"EASE: {len(active):,} catalog items have training events (catalog "
                f"{len(interactions.item_ids):,}), above max_items={self.max_items:,}; the "
                f"dense item × item inversion needs about {gigabytes:.1f} GB. Restrict the "
                "catalog (e.g. to the most popular items), raise max_items if the memory is "
                "there, or use ALSRetriever / the two-tower model for large catalogs."
            )
        user_items = decayed_user_items(train, interactions, self.half_life_days)
        self.user_items_ = sp.csr_matrix(user_items[:, active], dtype=np.float32)
        with threadpool_limits(limits=self.num_threads, user_api="blas"):
            self.weights_ = ease_weights(self.user_items_, self.l2)
        self.active_items_ = active
        self.interactions_ = interactions
        self.fallback_ = fit_fallback(self.fallback, train)
        return self

    def recommend(
        self, user_ids: npt.ArrayLike, k: int, *, exclude_seen: bool = True
    ) -> tuple[IntArray, FloatArray]:
        check_fitted(self, "weights_")
        return recommend_from_scores(
            user_ids,
            k,
            interactions=self.interactions_,
            score_rows=self._score_rows,
            fallback_scores=self.fallback_.popularity_,
            exclude_seen=exclude_seen,
            scored_rows=self.user_items_.getnnz(axis=1) > 0,
        )

    def _score_rows(self, rows: IntArray) -> FloatArray:
        scores = np.zeros((len(rows), len(self.interactions_.item_ids)), dtype=np.float32)
        scores[:, self.active_items_] = self.user_items_[rows] @ self.weights_
        return scores
