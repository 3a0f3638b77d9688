"""Gradient-boosted trees with LightGBM: pointwise (``binary``) or listwise (``lambdarank``).

Trees are the strong default for tabular ranking features: no scaling, interactions for free,
and categorical codes split natively. The model is saved as LightGBM's own text format plus a
JSON sidecar, so serving never unpickles anything. A model loaded to serve can be compiled to
native code (:meth:`LightGBMRanker.compile`, :mod:`mlsd.models.ranking.native`): the same
scores, about 8x faster for a request's rows.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, Self

import lightgbm as lgb
import numpy as np
import pandas as pd

from mlsd.models.ranking.base import FeatureSchema, FloatArray, Ranker, RankingData, ScoreKind
from mlsd.models.ranking.native import CompiledTrees, compile_booster

RANKER_JSON = "ranker.json"
BOOSTER_TXT = "booster.txt"
FORMAT_VERSION = 1
SERIAL_ROWS = 20_000
"""Fewer rows than this are scored on one thread (see :meth:`LightGBMRanker.predict`)."""

_PREDICT_THREADS: ContextVar[int | None] = ContextVar("lightgbm_predict_threads", default=None)


@contextlib.contextmanager
def predict_threads(n: int) -> Iterator[None]:
    """Score on ``n`` threads whatever the row count, within this block of this thread (a
    batch job that runs the ranker beside other work gives it one core). Threads change the
    work split, never a row's score."""
    if n < 1:
        raise ValueError(f"predict_threads needs n >= 1, got {n}")
    token = _PREDICT_THREADS.set(n)
    try:
        yield
    finally:
        _PREDICT_THREADS.reset(token)


Objective = Literal["binary", "lambdarank"]
# Early stopping watches the first metric: logloss for binary (smoother than AUC on a small
# validation set), NDCG@10 for lambdarank (what a top-of-feed ranker is judged on).
METRICS: dict[str, dict[str, Any]] = {
    "binary": {"metric": ["binary_logloss", "auc"]},
    "lambdarank": {"metric": ["ndcg"], "eval_at": [10]},
}


class LightGBMRanker(Ranker):
    """LightGBM on the click label, reproducible run to run.

    Args:
        objective: ``"binary"`` (pointwise log loss) or ``"lambdarank"`` (listwise, per group).
        n_estimators: maximum boosting rounds.
        learning_rate: shrinkage per round.
        num_leaves: maximum leaves per tree.
        min_child_samples: minimum rows per leaf (LightGBM's ``min_data_in_leaf``).
        reg_lambda: L2 penalty on leaf values.
        max_cat_to_onehot: a categorical feature with at most this many values splits one
            value against the rest; above it, LightGBM's many-vs-many split sorts the values
            by their gradient statistics and can cut them into any two sets. On user
            attributes (ML-100K's 61 ages, 21 occupations) such sets pick out small groups of
            the training users, which does not carry over to new users: one-vs-rest splits
            raised the held-out users' AUC on ML-100K from 0.752 to 0.760 (5 user splits).
        feature_fraction: share of the features each tree may use (drawn per tree).
        bagging_fraction: share of the rows each tree is fitted on (drawn per tree; 1 = all).
        early_stopping_rounds: stop when the validation metric has not improved for this many
            rounds (only when ``fit`` gets ``valid``); ``None`` never stops early.
        num_threads: worker threads; fixed so results do not depend on the machine.
        seed: seeds every LightGBM random choice.

    Attributes:
        booster_: the trained ``lgb.Booster``, trimmed to its best iteration.
        schema_: the features it was fitted on.
        best_iteration_: rounds kept.
        evals_result_: validation metric per round (empty without ``valid``).
        compiled_: the trees as native code once :meth:`compile` ran (else ``None``).

    ``predict`` returns raw margins (log-odds for ``binary``; for ``lambdarank`` only the order
    within a request is meaningful). Use :class:`~mlsd.models.ranking.calibration.Calibrator`
    for probabilities.
    """

    name = "lightgbm"

    @property
    def outputs(self) -> ScoreKind:
        """Log-odds for ``binary``; a score that only orders for ``lambdarank``."""
        return "log_odds" if self.objective == "binary" else "score"

    def __init__(
        self,
        *,
        objective: Objective = "binary",
        n_estimators: int = 300,
        learning_rate: float = 0.05,
        num_leaves: int = 31,
        min_child_samples: int = 20,
        reg_lambda: float = 0.0,
        max_cat_to_onehot: int = 4,
        feature_fraction: float = 1.0,
        bagging_fraction: float = 1.0,
        early_stopping_rounds: int | None = 30,
        num_threads: int = 1,
        seed: int = 0,
    ) -> None:
        self.objective = objective
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.reg_lambda = reg_lambda
        self.max_cat_to_onehot = max_cat_to_onehot
        self.feature_fraction = feature_fraction
        self.bagging_fraction = bagging_fraction
        self.early_stopping_rounds = early_stopping_rounds
        self.num_threads = num_threads
        self.seed = seed
        self.compiled_: CompiledTrees | None = None

    def get_params(self) -> dict[str, Any]:
        """The constructor arguments (JSON-safe)."""
        return {
            "objective": self.objective,
            "n_estimators": self.n_estimators,
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_child_samples": self.min_child_samples,
            "reg_lambda": self.reg_lambda,
            "max_cat_to_onehot": self.max_cat_to_onehot,
            "feature_fraction": self.feature_fraction,
            "bagging_fraction": self.bagging_fraction,
            "early_stopping_rounds": self.early_stopping_rounds,
            "num_threads": self.num_threads,
            "seed": self.seed,
        }

    def _lgb_params(self) -> dict[str, Any]:
        if self.objective not in METRICS:
            raise ValueError(
                f"LightGBMRanker: objective {self.objective!r} is not one of {list(METRICS)}"
            )
        for name in ("feature_fraction", "bagging_fraction"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"LightGBMRanker: {name} {getattr(self, name)} is not in (0, 1]")
        if self.max_cat_to_onehot < 1:
            raise ValueError(f"LightGBMRanker: max_cat_to_onehot {self.max_cat_to_onehot} < 1")
        return {
            "objective": self.objective,
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_child_samples,
            "lambda_l2": self.reg_lambda,
            "max_cat_to_onehot": self.max_cat_to_onehot,
            "feature_fraction": self.feature_fraction,
            "bagging_fraction": self.bagging_fraction,
            "bagging_freq": 1 if self.bagging_fraction < 1.0 else 0,
            "num_threads": self.num_threads,
            "seed": self.seed,
            # Same data + same threads -> same trees: no histogram-layout auto-choice, no
            # thread-order-dependent float sums.
            "deterministic": True,
            "force_row_wise": True,
            "verbosity": -1,
            **METRICS[self.objective],
        }

    # --- fitting ---------------------------------------------------------------------------

    def _dataset(self, data: RankingData, *, reference: lgb.Dataset | None = None) -> lgb.Dataset:
        label = data.label
        if not np.isin(np.unique(label), [0.0, 1.0]).all():
            raise ValueError("LightGBMRanker.fit: the click label must be 0/1")
        return lgb.Dataset(
            _matrix(data.features, data.schema),
            label=label.astype(np.int64),
            group=data.group_sizes() if self.objective == "lambdarank" else None,
            feature_name=list(data.schema.columns),
            categorical_feature=list(data.schema.categorical),
            reference=reference,
            free_raw_data=True,
        )

    def fit(self, train: RankingData, valid: RankingData | None = None) -> Self:
        """Boost on ``train``; with ``valid``, stop early on its first metric."""
        if valid is not None and valid.schema.columns != train.schema.columns:
            raise ValueError(
                f"LightGBMRanker.fit: valid columns {valid.schema.columns} differ from train "
                f"columns {train.schema.columns}"
            )
        params = self._lgb_params()
        train_set = self._dataset(train)
        valid_sets, callbacks = [], []
        self.evals_result_: dict[str, dict[str, list[float]]] = {}
        if valid is not None:
            valid_sets.append(self._dataset(valid, reference=train_set))
            callbacks.append(lgb.record_evaluation(self.evals_result_))
            if self.early_stopping_rounds is not None:
                callbacks.append(
                    lgb.early_stopping(
                        self.early_stopping_rounds, first_metric_only=True, verbose=False
                    )
                )
        booster = lgb.train(
            params,
            train_set,
            num_boost_round=self.n_estimators,
            valid_sets=valid_sets,
            valid_names=["valid"] if valid_sets else None,
            callbacks=callbacks,
        )
        self.best_iteration_ = booster.best_iteration or booster.current_iteration()
        # Trim to the best round so predict, save and load all see the same trees.
        self.booster_ = lgb.Booster(
            model_str=booster.model_to_string(num_iteration=self.best_iteration_)
        )
        self.schema_ = train.schema
        self.compiled_ = None
        return self

    def compile(self, *, inline: bool = False) -> Self:
        """Score with the trees compiled to native code from now on (checked against LightGBM
        on probe rows; :func:`~mlsd.models.ranking.native.compile_booster`)."""
        self.compiled_ = compile_booster(self.booster_, seed=self.seed, inline=inline)
        return self

    # --- scoring ---------------------------------------------------------------------------

    def predict(self, features: pd.DataFrame) -> FloatArray:
        """``(n,)`` raw margins, in the schema's column order whatever the frame's order."""
        self.schema_.check(features, name="LightGBMRanker.predict")
        return self._scores(_matrix(features, self.schema_))

    def predict_matrix(self, matrix: FloatArray, schema: FeatureSchema) -> FloatArray:
        """:meth:`predict` of a ``schema.matrix`` block: the float64 matrix LightGBM reads
        anyway, so the same scores without a DataFrame and its conversion (in the request
        path, building and checking the frame cost more than the trees)."""
        if schema.columns != self.schema_.columns:  # another order: the frame reorders it
            return super().predict_matrix(matrix, schema)
        self.schema_.check_matrix(matrix, name="LightGBMRanker.predict")
        return self._scores(matrix)

    def _scores(self, matrix: FloatArray) -> FloatArray:
        # One thread below SERIAL_ROWS: a request's few hundred rows score in ~0.6 ms on one
        # thread and ~6 ms with OpenMP waking a second one on a busy 2-core machine. Unless
        # the caller says otherwise (predict_threads).
        n = len(matrix)
        threads = _PREDICT_THREADS.get() or (1 if n < SERIAL_ROWS else self.num_threads)
        if self.compiled_ is not None:
            return self.compiled_.predict(matrix, threads=threads)
        scores = self.booster_.predict(matrix, raw_score=True, num_threads=threads)
        return np.asarray(scores, dtype=np.float64).reshape(n)

    def feature_importance(
        self, *, importance_type: Literal["gain", "split"] = "gain"
    ) -> dict[str, float]:
        """Column → total split gain (or split count), largest first."""
        values = self.booster_.feature_importance(importance_type=importance_type)
        pairs = zip(self.booster_.feature_name(), values.tolist(), strict=True)
        return dict(sorted(((k, float(v)) for k, v in pairs), key=lambda kv: -kv[1]))

    # --- persistence -----------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write ``booster.txt`` (LightGBM text) and ``ranker.json`` (kind, params, schema)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.booster_.save_model(str(path / BOOSTER_TXT))
        meta = {
            "kind": self.name,
            "format_version": FORMAT_VERSION,
            "params": self.get_params(),
            "schema": self.schema_.to_dict(),
            "best_iteration": self.best_iteration_,
            "booster": BOOSTER_TXT,
        }
        (path / RANKER_JSON).write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path: Path) -> Self:
        """Read a ranker written by :meth:`save`."""
        meta_path = Path(path) / RANKER_JSON
        meta = json.loads(meta_path.read_text())
        if meta.get("kind") != cls.name:
            raise ValueError(f"{meta_path}: kind {meta.get('kind')!r} is not {cls.name!r}")
        ranker = cls(**meta["params"])
        ranker.schema_ = FeatureSchema.from_dict(meta["schema"])
        ranker.best_iteration_ = int(meta["best_iteration"])
        ranker.evals_result_ = {}
        ranker.booster_ = lgb.Booster(model_file=str(Path(path) / meta["booster"]))
        return ranker


def _matrix(features: pd.DataFrame, schema: FeatureSchema) -> FloatArray:
    """``(n, n_columns)`` float64 in schema order; LightGBM reads integer codes from floats."""
    return schema.matrix(features)
