"""Turn ranker scores into click probabilities.

Rankers are trained to order candidates; their scores need not be probabilities (LambdaRank
margins are not even on a fixed scale). Anything that multiplies scores by money or mixes them
across models (ads auctions, multi-objective blends) needs calibrated probabilities, so a
:class:`Calibrator` is fitted on held-out ``(score, click)`` pairs after the ranker:

* ``"platt"``: ``sigmoid(a * score + b)``, two numbers; right when the distortion is a
  monotone squash of log-odds (e.g. an over-confident logistic model).
* ``"isotonic"``: a monotone step-linear map; fits any monotone distortion but needs more
  data and can overfit small validation sets.

Both serialise to a small JSON-safe dict and are applied with numpy alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, Self

import numpy as np
import numpy.typing as npt
from scipy.special import expit
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from mlsd.models.ranking.base import FloatArray

CalibrationMethod = Literal["platt", "isotonic"]
METHODS: tuple[CalibrationMethod, ...] = ("platt", "isotonic")
# Platt's fit is meant to be unpenalised; a tiny penalty only keeps (a, b) finite when the
# scores separate the labels perfectly.
PLATT_C = 1e4


def _as_scores(scores: npt.ArrayLike, *, name: str) -> FloatArray:
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}: scores row {row} is {values[row]}, not a finite number")
    return values


class Calibrator:
    """Monotone map from ranker scores to probabilities in ``[0, 1]``.

    Args:
        method: ``"platt"`` or ``"isotonic"``.

    Attributes:
        a_, b_: Platt's slope and intercept (``"platt"`` only).
        x_thresholds_, y_thresholds_: the isotonic knots, interpolated linearly and clipped
            at both ends (``"isotonic"`` only).

    Example:
        >>> cal = Calibrator("platt").fit([-2.0, -1.0, 1.0, 2.0, 0.5], [0, 0, 1, 1, 0])
        >>> bool(0.0 <= cal.transform([0.0])[0] <= 1.0)
        True
    """

    def __init__(self, method: CalibrationMethod = "platt") -> None:
        self.method = method

    def fit(self, scores: npt.ArrayLike, labels: npt.ArrayLike) -> Self:
        """Fit on ``(n,)`` scores and their ``(n,)`` 0/1 labels (held out from the ranker)."""
        if self.method not in METHODS:
            raise ValueError(f"Calibrator: method {self.method!r} is not one of {METHODS}")
        x = _as_scores(scores, name="Calibrator.fit")
        y = np.asarray(labels, dtype=np.float64).reshape(-1)
        if len(x) != len(y):
            raise ValueError(f"Calibrator.fit: {len(x)} scores but {len(y)} labels")
        classes = np.unique(y)
        if not np.isin(classes, [0.0, 1.0]).all() or len(classes) < 2:
            raise ValueError(f"Calibrator.fit: labels must be 0/1 with both present, got {classes}")
        if self.method == "platt":
            model = LogisticRegression(C=PLATT_C).fit(x[:, None], y.astype(np.int64))
            self.a_ = float(model.coef_[0, 0])
            self.b_ = float(model.intercept_[0])
        else:
            iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
            iso.fit(x, y)
            self.x_thresholds_: FloatArray = np.asarray(iso.X_thresholds_, dtype=np.float64)
            self.y_thresholds_: FloatArray = np.asarray(iso.y_thresholds_, dtype=np.float64)
        return self

    def transform(self, scores: npt.ArrayLike) -> FloatArray:
        """``(n,)`` probabilities in ``[0, 1]``, non-decreasing in the score."""
        x = _as_scores(scores, name="Calibrator.transform")
        if self.method == "platt":
            probabilities: FloatArray = expit(self.a_ * x + self.b_)
        else:
            # np.interp clamps outside the knots, as IsotonicRegression(out_of_bounds="clip").
            probabilities = np.interp(x, self.x_thresholds_, self.y_thresholds_)
        return np.clip(probabilities, 0.0, 1.0)

    def to_dict(self) -> dict[str, object]:
        """JSON-safe parameters; :meth:`from_dict` rebuilds an identical calibrator."""
        if self.method == "platt":
            return {"method": "platt", "a": self.a_, "b": self.b_}
        return {
            "method": "isotonic",
            "x_thresholds": self.x_thresholds_.tolist(),
            "y_thresholds": self.y_thresholds_.tolist(),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, object]) -> Calibrator:
        """Rebuild from :meth:`to_dict` output."""
        method = raw.get("method")
        if method == "platt":
            calibrator = cls("platt")
            calibrator.a_ = float(raw["a"])  # type: ignore[arg-type]
            calibrator.b_ = float(raw["b"])  # type: ignore[arg-type]
            return calibrator
        if method == "isotonic":
            calibrator = cls("isotonic")
            x = np.asarray(raw["x_thresholds"], dtype=np.float64)
            y = np.asarray(raw["y_thresholds"], dtype=np.float64)
            if x.ndim != 1 or x.shape != y.shape or len(x) == 0:
                raise ValueError("Calibrator.from_dict: x/y thresholds must be equal-length lists")
            calibrator.x_thresholds_, calibrator.y_thresholds_ = x, y
            return calibrator
        raise ValueError(f"Calibrator.from_dict: method {method!r} is not one of {METHODS}")
