"""The baseline ranker: logistic regression over standardised numerics and one-hot categories.

Every stronger ranker has to beat this one, so it is deliberately plain: scikit-learn's
``LogisticRegression`` fits it, but scoring is a few lines of numpy over the learned arrays, so a
saved model is one JSON file that serving reads without scikit-learn (and without pickle).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, Self

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression

from mlsd.models.ranking.base import FeatureSchema, FloatArray, Ranker, RankingData, ScoreKind

RANKER_JSON = "ranker.json"
FORMAT_VERSION = 1

ClassWeight = Literal["balanced"] | Mapping[int, float] | None


def _check_binary(y: FloatArray, *, name: str) -> None:
    values = np.unique(y)
    if not np.isin(values, [0.0, 1.0]).all():
        raise ValueError(f"{name}: the click label must be 0/1, found values {values[:5]}")
    if len(values) < 2:
        raise ValueError(f"{name}: the click label has one class only ({values}); need both")


class LogisticRanker(Ranker):
    """Pointwise logistic regression on ``click``.

    Args:
        C: inverse L2 strength, as in scikit-learn (smaller = stronger regularisation).
        class_weight: ``None``, ``"balanced"`` or ``{0: w0, 1: w1}``, as in scikit-learn.
        max_iter: L-BFGS iterations.

    Attributes:
        schema_: the features it was fitted on.
        mean_, scale_: ``(n_numeric,)`` standardisation of the numeric columns.
        numeric_coef_: ``(n_numeric,)`` weights of the standardised numerics.
        categorical_coef_: column → ``(cardinality,)`` weight of each code.
        intercept_: the bias.

    ``predict`` returns log-odds (the decision function); ``sigmoid`` of it is the click
    probability. Validation data is accepted for the common interface and ignored.
    """

    name = "logistic"
    outputs: ScoreKind = "log_odds"

    def __init__(
        self,
        *,
        C: float = 1.0,  # noqa: N803 - scikit-learn's name
        class_weight: ClassWeight = None,
        max_iter: int = 1000,
    ) -> None:
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter

    # --- fitting ---------------------------------------------------------------------------

    def fit(self, train: RankingData, valid: RankingData | None = None) -> Self:
        """Fit on ``train``'s click label; ``valid`` is unused (no early stopping)."""
        y = train.label
        _check_binary(y, name="LogisticRanker.fit")
        schema = train.schema
        numeric = train.features[list(schema.numeric)].to_numpy(dtype=np.float64)
        self.mean_: FloatArray = numeric.mean(axis=0)
        std = numeric.std(axis=0)
        # A constant column would divide by zero; it carries no signal, so leave it unscaled.
        self.scale_: FloatArray = np.where(std > 0, std, 1.0)
        self.schema_ = schema

        design = sp.hstack(
            [sp.csr_matrix((numeric - self.mean_) / self.scale_), *self._one_hot(train.features)],
            format="csr",
        )
        class_weight = (
            dict(self.class_weight)
            if isinstance(self.class_weight, Mapping)
            else (self.class_weight)
        )
        model = LogisticRegression(C=self.C, class_weight=class_weight, max_iter=self.max_iter)
        model.fit(design, y.astype(np.int64))

        coef = model.coef_[0].astype(np.float64)
        n_numeric = len(schema.numeric)
        self.numeric_coef_: FloatArray = coef[:n_numeric]
        self.categorical_coef_: dict[str, FloatArray] = {}
        offset = n_numeric
        for column in schema.categorical:
            width = schema.cardinalities[column]
            self.categorical_coef_[column] = coef[offset : offset + width]
            offset += width
        self.intercept_ = float(model.intercept_[0])
        return self

    def _one_hot(self, features: pd.DataFrame) -> list[sp.csr_matrix]:
        """One ``(n, cardinality)`` indicator block per categorical column."""
        n = len(features)
        blocks = []
        for column in self.schema_.categorical:
            codes = features[column].to_numpy(dtype=np.int64)
            shape = (n, self.schema_.cardinalities[column])
            blocks.append(sp.csr_matrix((np.ones(n), (np.arange(n), codes)), shape=shape))
        return blocks

    # --- scoring ---------------------------------------------------------------------------

    def predict(self, features: pd.DataFrame) -> FloatArray:
        """``(n,)`` log-odds of a click, computed with numpy from the learned arrays."""
        self.schema_.check(features, name="LogisticRanker.predict")
        matrix = self.schema_.matrix(features)
        numeric = matrix[:, : len(self.schema_.numeric)]
        scores = ((numeric - self.mean_) / self.scale_) @ self.numeric_coef_ + self.intercept_
        for j, column in enumerate(self.schema_.categorical, start=len(self.schema_.numeric)):
            scores = scores + self.categorical_coef_[column][matrix[:, j].astype(np.int64)]
        return np.asarray(scores, dtype=np.float64).reshape(len(features))

    # --- persistence -----------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write ``ranker.json``: params, schema and every learned array as JSON lists."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        class_weight = (
            {str(k): float(v) for k, v in self.class_weight.items()}
            if isinstance(self.class_weight, Mapping)
            else self.class_weight
        )
        meta = {
            "kind": self.name,
            "format_version": FORMAT_VERSION,
            "params": {"C": self.C, "class_weight": class_weight, "max_iter": self.max_iter},
            "schema": self.schema_.to_dict(),
            "intercept": self.intercept_,
            "numeric_coef": self.numeric_coef_.tolist(),
            "categorical_coef": {k: v.tolist() for k, v in self.categorical_coef_.items()},
            "mean": self.mean_.tolist(),
            "scale": self.scale_.tolist(),
        }
        (path / RANKER_JSON).write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path: Path) -> Self:
        """Rebuild a fitted ranker from ``ranker.json`` (no scikit-learn objects involved)."""
        meta_path = Path(path) / RANKER_JSON
        meta = json.loads(meta_path.read_text())
        if meta.get("kind") != cls.name:
            raise ValueError(f"{meta_path}: kind {meta.get('kind')!r} is not {cls.name!r}")
        params = meta["params"]
        class_weight = params["class_weight"]
        if isinstance(class_weight, dict):
            class_weight = {int(k): float(v) for k, v in class_weight.items()}
        ranker = cls(C=params["C"], class_weight=class_weight, max_iter=params["max_iter"])
        ranker.schema_ = FeatureSchema.from_dict(meta["schema"])
        ranker.intercept_ = float(meta["intercept"])
        ranker.numeric_coef_ = np.asarray(meta["numeric_coef"], dtype=np.float64)
        ranker.categorical_coef_ = {
            k: np.asarray(v, dtype=np.float64) for k, v in meta["categorical_coef"].items()
        }
        ranker.mean_ = np.asarray(meta["mean"], dtype=np.float64)
        ranker.scale_ = np.asarray(meta["scale"], dtype=np.float64)
        return ranker
