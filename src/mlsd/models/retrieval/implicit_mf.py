"""Matrix factorization retrievers through the ``implicit`` library: ALS and BPR.

Both learn ``user_factors_`` (n_users × d) and ``item_factors_`` (n_items × d) whose inner
product scores a (user, item) pair, so the item factors go straight into a vector index.
``implicit`` fits on the users × items CSR of the training window (entry = number of events);
cold users get the ``fallback`` (time-decayed popularity by default).
"""

from __future__ import annotations

from typing import Any, Self

import numpy as np
import numpy.typing as npt
from implicit.cpu.als import AlternatingLeastSquares
from implicit.cpu.bpr import BayesianPersonalizedRanking
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


class _ImplicitRetriever(Retriever):
    """Fit an ``implicit`` model on the interaction matrix; score by factor inner products.

    Attributes:
        user_factors_: ``(n_users, d)`` float32, rows in ``interactions_.user_ids`` order.
        item_factors_: ``(n_items, d)`` float32, rows in ``interactions_.item_ids`` order.
        interactions_: the training window's users × items matrix.
        fallback_: the fitted copy of ``fallback`` that answers cold users.
    """

    user_factors_: FloatArray
    item_factors_: FloatArray
    interactions_: InteractionMatrix
    scored_users_: npt.NDArray[np.bool_]
    fallback_: PopularityRetriever

    half_life_days: float | None = None
    fallback: PopularityRetriever | None = None

    def _make_model(self) -> Any:
        raise NotImplementedError

    def fit(self, train: RetrievalData) -> Self:
        interactions = InteractionMatrix.from_events(train.events, train.items["item_id"])
        if interactions.user_items.nnz == 0:
            raise ValueError(
                f"{type(self).__name__}: the training window has no events on catalog items; "
                "widen the window or check that events.item_id matches items.item_id"
            )
        # implicit runs its own threads; a multi-threaded BLAS underneath them only contends
        # (implicit warns about it). The limit reaches the BLAS libraries loaded so far, which
        # is why implicit is imported at the top of this module.
        with threadpool_limits(limits=1, user_api="blas"):
            model = self._make_model()
            user_items = decayed_user_items(train, interactions, self.half_life_days)
            model.fit(user_items, show_progress=False)
        self.user_factors_ = np.ascontiguousarray(model.user_factors, dtype=np.float32)
        self.item_factors_ = np.ascontiguousarray(model.item_factors, dtype=np.float32)
        self.interactions_ = interactions
        self.scored_users_ = user_items.getnnz(axis=1) > 0
        self.fallback_ = fit_fallback(self.fallback, train)
        return self

    def recommend(
        self, user_ids: npt.ArrayLike, k: int, *, exclude_seen: bool = True
    ) -> tuple[IntArray, FloatArray]:
        check_fitted(self, "item_factors_")
        return recommend_from_scores(
            user_ids,
            k,
            interactions=self.interactions_,
            score_rows=lambda rows: self.user_factors_[rows] @ self.item_factors_.T,
            fallback_scores=self.fallback_.popularity_,
            exclude_seen=exclude_seen,
            scored_rows=self.scored_users_,
        )


class ALSRetriever(_ImplicitRetriever):
    """Implicit-feedback ALS (Hu, Koren & Volinsky 2008): confidence ``alpha × events``.

    Args:
        factors: latent dimensions ``d``.
        regularization: L2 weight on the factors.
        alpha: confidence per observed event (``implicit`` scales the matrix by it).
        iterations: alternating sweeps over users and items.
        half_life_days: an event this many days before the cutoff gets half the confidence;
            ``None`` weighs all events alike.
        seed: seeds the factor initialisation; a fixed seed gives the same factors.
        num_threads: ``implicit``'s threads (0 = all cores).
        fallback: answers cold users (fitted on a copy); ``None`` = ``PopularityRetriever()``.
    """

    name = "als"

    def __init__(
        self,
        factors: int = 64,
        regularization: float = 0.05,
        alpha: float = 2.0,
        iterations: int = 15,
        half_life_days: float | None = None,
        seed: int = 0,
        num_threads: int = 2,
        fallback: PopularityRetriever | None = None,
    ) -> None:
        self.factors = factors
        self.regularization = regularization
        self.alpha = alpha
        self.iterations = iterations
        self.half_life_days = half_life_days
        self.seed = seed
        self.num_threads = num_threads
        self.fallback = fallback

    def _make_model(self) -> Any:
        return AlternatingLeastSquares(
            factors=self.factors,
            regularization=self.regularization,
            alpha=self.alpha,
            iterations=self.iterations,
            num_threads=self.num_threads,
            random_state=self.seed,
        )


class BPRRetriever(_ImplicitRetriever):
    """Bayesian personalized ranking (Rendle et al. 2009), trained by SGD on sampled pairs.

    ``implicit`` appends an item-bias column to ``item_factors_`` (and a column of ones to
    ``user_factors_``), so ``d = factors + 1`` and the inner product still gives the score.
    SGD runs lock-free over ``num_threads`` threads: only ``num_threads=1`` is deterministic.

    Args:
        factors: latent dimensions (before the bias column).
        learning_rate: SGD step size.
        regularization: L2 weight on the factors.
        iterations: epochs over the observed events.
        seed: seeds the initialisation and the negative sampling.
        num_threads: SGD threads (0 = all cores).
        fallback: answers cold users (fitted on a copy); ``None`` = ``PopularityRetriever()``.
    """

    name = "bpr"

    def __init__(
        self,
        factors: int = 64,
        learning_rate: float = 0.01,
        regularization: float = 0.01,
        iterations: int = 50,
        seed: int = 0,
        num_threads: int = 2,
        fallback: PopularityRetriever | None = None,
    ) -> None:
        self.factors = factors
        self.learning_rate = learning_rate
        self.regularization = regularization
        self.iterations = iterations
        self.seed = seed
        self.num_threads = num_threads
        self.fallback = fallback

    def _make_model(self) -> Any:
        return BayesianPersonalizedRanking(
            factors=self.factors,
            learning_rate=self.learning_rate,
            regularization=self.regularization,
            iterations=self.iterations,
            num_threads=self.num_threads,
            random_state=self.seed,
        )
