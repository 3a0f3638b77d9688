"""The ``Ranker`` protocol every second-stage model implements, and the data it learns from.

scikit-learn style: hyperparameters in ``__init__``, ``fit(train, valid) -> self``, learned state
in attributes ending in ``_``. A ranker scores (request, candidate) rows; one request's rows form
a *group* (needed by listwise objectives such as LambdaRank, ignored by pointwise ones).

Rows are plain tables so every ranker (scikit-learn, LightGBM, PyTorch) reads the same thing:
``numeric`` columns are finite floats, ``categorical`` columns are int codes in
``[0, cardinality)`` with 0 reserved for "unknown". Rankers persist themselves with ``save`` /
``load`` in safe formats (JSON, LightGBM text, ``torch.load(weights_only=True)``), never pickle,
since serving loads them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Self

import numpy as np
import numpy.typing as npt
import pandas as pd

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

PRIMARY_LABEL = "click"
"""The label every ranker is trained and evaluated on; other labels feed multi-task heads."""


@dataclass(frozen=True)
class FeatureSchema:
    """Which columns a ranker reads, and how.

    Attributes:
        numeric: float feature columns (finite; rankers standardise them as they need).
        categorical: int-code columns, each in ``[0, cardinalities[name])``, 0 = unknown.
        cardinalities: number of codes of each categorical column (including 0).
    """

    numeric: tuple[str, ...]
    categorical: tuple[str, ...] = ()
    cardinalities: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [c for c in self.categorical if c not in self.cardinalities]
        if missing:
            raise ValueError(f"FeatureSchema: no cardinality for categorical columns {missing}")
        overlap = set(self.numeric) & set(self.categorical)
        if overlap:
            raise ValueError(
                f"FeatureSchema: columns {sorted(overlap)} are numeric and categorical"
            )

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.numeric, *self.categorical)

    def matrix(self, features: pd.DataFrame) -> FloatArray:
        """``(n, len(columns))`` float64 in schema order (categorical codes as floats).

        A frame already in schema order (what :func:`ranker_frame` builds) converts without a
        column selection, which costs ~20x more on a request's few hundred rows."""
        if tuple(features.columns) == self.columns:
            matrix: FloatArray = features.to_numpy(dtype=np.float64)
        else:
            matrix = features[list(self.columns)].to_numpy(dtype=np.float64)
        return matrix

    def check(self, features: pd.DataFrame, *, name: str = "features") -> None:
        """Raise a ValueError naming the column (and a row) that breaks the schema."""
        missing = [c for c in self.columns if c not in features.columns]
        if missing:
            raise ValueError(f"{name}: missing feature columns {missing}")
        if tuple(features.columns) == self.columns:
            numeric = features.to_numpy(dtype=np.float64)[:, : len(self.numeric)]
        else:
            numeric = features[list(self.numeric)].to_numpy(dtype=np.float64)
        self._check_finite(numeric, name)
        for column in self.categorical:
            codes = features[column].to_numpy()
            if not np.issubdtype(codes.dtype, np.integer):
                raise ValueError(f"{name}: categorical column {column!r} must hold int codes")
            bad = (codes < 0) | (codes >= self.cardinalities[column])
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise ValueError(
                    f"{name}: column {column!r} row {row}: code {codes[row]} outside "
                    f"[0, {self.cardinalities[column]})"
                )

    def check_matrix(self, matrix: FloatArray, *, name: str = "features") -> None:
        """:meth:`check` of a :meth:`matrix`-shaped block (``(n, len(columns))`` float64,
        codes as floats), with the same errors: the request path scores such a block without
        building a DataFrame, and a DataFrame's per-column checks cost ~20x more there."""
        if matrix.ndim != 2 or matrix.shape[1] != len(self.columns):
            raise ValueError(
                f"{name}: a ({matrix.shape}) block, expected (n, {len(self.columns)}) columns"
            )
        k = len(self.numeric)
        self._check_finite(matrix[:, :k], name)
        if not self.categorical:
            return
        codes = matrix[:, k:]
        bad = ~((codes >= 0) & (codes < self._code_limits) & (codes == np.floor(codes)))
        if bad.any():  # NaN and inf fail every comparison: caught here as well
            row, j = (int(i) for i in np.argwhere(bad)[0])
            column = self.categorical[j]
            raise ValueError(
                f"{name}: column {column!r} row {row}: code {codes[row, j]} outside "
                f"[0, {self.cardinalities[column]}) or not an integer"
            )

    @cached_property
    def _code_limits(self) -> FloatArray:
        return np.array([self.cardinalities[c] for c in self.categorical], dtype=np.float64)

    def _check_finite(self, numeric: FloatArray, name: str) -> None:
        if np.isfinite(numeric).all():  # one check over the block; the column on failure
            return
        for j, column in enumerate(self.numeric):
            bad = ~np.isfinite(numeric[:, j])
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise ValueError(
                    f"{name}: column {column!r} row {row}: {numeric[row, j]} is not finite"
                )

    def frame(self, matrix: FloatArray, index: pd.Index | None = None) -> pd.DataFrame:
        """A :meth:`matrix`-shaped block as the DataFrame it came from: numeric columns
        float64, categorical codes int64."""
        k = len(self.numeric)
        # One DataFrame built at the end: column-by-column inserts cost ~0.2 ms each.
        columns: dict[str, npt.NDArray[Any]] = dict(zip(self.numeric, matrix[:, :k].T, strict=True))
        for j, column in enumerate(self.categorical):
            columns[column] = matrix[:, k + j].astype(np.int64)
        return pd.DataFrame(columns, index=index)

    def to_dict(self) -> dict[str, object]:
        return {
            "numeric": list(self.numeric),
            "categorical": list(self.categorical),
            "cardinalities": dict(self.cardinalities),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, object]) -> FeatureSchema:
        numeric = raw["numeric"]
        categorical = raw.get("categorical", [])
        cardinalities = raw.get("cardinalities", {})
        if not (
            isinstance(numeric, list)
            and isinstance(categorical, list)
            and isinstance(cardinalities, dict)
        ):
            raise ValueError(f"FeatureSchema: malformed {dict(raw)!r}")
        return cls(
            tuple(numeric), tuple(categorical), {str(k): int(v) for k, v in cardinalities.items()}
        )


@dataclass(frozen=True)
class RankingData:
    """Labelled (request, candidate) rows.

    Attributes:
        features: one row per candidate; at least ``schema.columns``.
        labels: label name → ``(n,)`` float array; :data:`PRIMARY_LABEL` (0/1) is required,
            others (e.g. ``"rating"`` scaled to [0, 1]) are optional extra targets.
        groups: ``(n,)`` int64 request id of each row; a request's rows are contiguous.
        schema: the feature columns.
    """

    features: pd.DataFrame
    labels: Mapping[str, FloatArray]
    groups: IntArray
    schema: FeatureSchema

    def __post_init__(self) -> None:
        n = len(self.features)
        if PRIMARY_LABEL not in self.labels:
            raise ValueError(f"RankingData: the {PRIMARY_LABEL!r} label is required")
        for name, values in self.labels.items():
            if len(values) != n:
                raise ValueError(f"RankingData: label {name!r} has {len(values)} rows, not {n}")
        if len(self.groups) != n:
            raise ValueError(f"RankingData: groups has {len(self.groups)} rows, not {n}")
        if n and (np.diff(self.groups) != 0).sum() + 1 != len(np.unique(self.groups)):
            raise ValueError("RankingData: the rows of each group must be contiguous")
        self.schema.check(self.features, name="RankingData.features")

    @property
    def label(self) -> FloatArray:
        """The primary label."""
        return np.asarray(self.labels[PRIMARY_LABEL], dtype=np.float64)

    def group_sizes(self) -> IntArray:
        """Rows per group, in row order (LightGBM's ``group``)."""
        if len(self.groups) == 0:
            return np.zeros(0, dtype=np.int64)
        starts = np.flatnonzero(np.r_[True, self.groups[1:] != self.groups[:-1]])
        sizes: IntArray = np.diff(np.r_[starts, len(self.groups)]).astype(np.int64)
        return sizes

    def take(self, rows: npt.ArrayLike) -> RankingData:
        """A subset of rows (keep whole groups together to stay valid)."""
        index = np.asarray(rows, dtype=np.int64)
        return RankingData(
            self.features.iloc[index].reset_index(drop=True),
            {name: np.asarray(v)[index] for name, v in self.labels.items()},
            self.groups[index],
            self.schema,
        )


ScoreKind = Literal["probability", "log_odds", "score"]
"""What a ranker's ``predict`` returns: a click probability, its log-odds, or a score that only
orders (a listwise objective's, an ensemble's); :func:`as_probability` reads it."""


class Ranker(ABC):
    """A second-stage model: ``fit`` on labelled candidates, ``predict`` scores for new ones."""

    name: str = "ranker"

    @property
    def outputs(self) -> ScoreKind:
        """What :meth:`predict` returns (:data:`ScoreKind`); a plain score unless said."""
        return "score"

    @abstractmethod
    def fit(self, train: RankingData, valid: RankingData | None = None) -> Self:
        """Learn from ``train``; ``valid`` may drive early stopping. Returns ``self``."""

    @abstractmethod
    def predict(self, features: pd.DataFrame) -> FloatArray:
        """``(n,)`` float64 scores, higher = more likely engaged (same columns as at fit)."""

    def predict_matrix(self, matrix: FloatArray, schema: FeatureSchema) -> FloatArray:
        """:meth:`predict` of a ``schema.matrix``-shaped block (the request path's rows).

        This default checks the block (the frame's int codes would hide a fractional one) and
        builds the DataFrame; a ranker that scores a float matrix anyway (LightGBM) overrides
        it to skip the frame."""
        schema.check_matrix(matrix, name=f"{type(self).__name__}.predict")
        return self.predict(schema.frame(matrix))

    def compile(self, *, inline: bool = False) -> Self:
        """Ready the fitted ranker for many ``predict`` calls with the same scores: native
        code where the ranker has it (LightGBM's trees; ``inline``: compiled for large blocks
        of rows, as batch prediction scores, at a longer compile). This default changes
        nothing."""
        return self

    @abstractmethod
    def save(self, path: Path) -> None:
        """Write the fitted ranker to the directory ``path`` (safe formats only)."""

    @classmethod
    @abstractmethod
    def load(cls, path: Path) -> Self:
        """Read a ranker written by :meth:`save`."""


def as_probability(scores: npt.ArrayLike, outputs: ScoreKind) -> FloatArray | None:
    """``scores`` of a ranker whose :attr:`Ranker.outputs` is ``outputs`` as click
    probabilities: as they are, or the sigmoid of log-odds; ``None`` for a plain score, which
    is no probability (its log loss would measure its scale, not the ranker)."""
    values = np.asarray(scores, dtype=np.float64)
    if outputs == "probability":
        return values
    if outputs == "log_odds":
        return sigmoid(values)
    return None


def sigmoid(logits: npt.ArrayLike) -> FloatArray:
    """Numerically stable float64 logistic function."""
    x = np.asarray(logits, dtype=np.float64)
    out: FloatArray = np.exp(-np.logaddexp(0.0, -x))
    return out
