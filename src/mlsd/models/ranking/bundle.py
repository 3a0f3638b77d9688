"""The ranking stage as one artifact: ranker, calibrator, feature vocabulary and layout, quotas.

Everything serving needs to turn merged candidates into calibrated scores, saved as JSON plus
the ranker's own safe files (no pickle):

    bundle/
      bundle.json        kind, chosen ranker name, quotas, layout, feature config, metadata
      vocabulary.json    categorical value → code
      calibrator.json
      ranker/            the ranker's ``save`` directory (``ranker.json`` + weights)
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

from mlsd.data.sampling import recalibrate_downsampled
from mlsd.features.definitions import FeatureConfig
from mlsd.models.ranking.base import FeatureSchema, FloatArray, Ranker, ScoreKind, sigmoid
from mlsd.models.ranking.calibration import Calibrator
from mlsd.models.ranking.candidates import FeatureLayout, Vocabulary
from mlsd.models.ranking.registry import load_ranker
from mlsd.models.retrieval.merge import QUOTAS, Fusion, Quota

BUNDLE_JSON = "bundle.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class RankingBundle:
    """A trained ranking stage.

    Attributes:
        ranker: the fitted ranker; ``ranker_name`` its key in the system's config.
        calibrator: ranker score → click probability.
        vocabulary, layout: how candidate rows become the ranker's features.
        quotas: the merge quotas of the candidate sources (of warm users when
            ``cold_quotas`` is set).
        cold_quotas: the quotas of cold users (no history), or ``None``: ``quotas``.
        fusion: how the quotas merge the sources (quotas, or reciprocal-rank fusion with the
            quotas as weights); the ranker learned from candidates merged so.
        feature_config: the feature step's configuration the rows were computed with.
        metadata: free JSON (dataset hash, metrics, protocol, ...).
    """

    ranker: Ranker
    ranker_name: str
    calibrator: Calibrator
    vocabulary: Vocabulary
    layout: FeatureLayout
    quotas: Mapping[str, Quota]
    feature_config: FeatureConfig
    metadata: Mapping[str, Any] = field(default_factory=dict)
    negative_keep_rate: float = 1.0
    cold_quotas: Mapping[str, Quota] | None = None
    fusion: Fusion = QUOTAS
    calibration_scale: CalibrationScale = "log_odds"
    """What the calibrator reads (:func:`calibration_input`); a bundle saved before the scale
    was recorded reads ``"prior_corrected"``, the scale its calibrator was fitted on."""

    def probabilities(self, features: pd.DataFrame) -> FloatArray:
        """Click probabilities of candidate rows: ranker → downsampling correction →
        calibrator, the same chain the calibrator was fitted through."""
        return self.calibrated(self.ranker.predict(features))

    def scores_matrix(self, matrix: FloatArray, schema: FeatureSchema) -> FloatArray:
        """The ranker's own scores of a ``schema.matrix`` block (:func:`ranker_inputs`; the
        request path, which skips the DataFrame when the ranker can): what the list is
        ordered by, as offline evaluation orders it. An isotonic calibrator is a step
        function, so its probabilities tie where the ranker's scores do not."""
        return np.asarray(self.ranker.predict_matrix(matrix, schema), dtype=np.float64)

    def calibrated(self, scores: npt.ArrayLike) -> FloatArray:
        """Click probabilities of the ranker's ``scores``, value by value (the same score gets
        the same probability whatever else is in the batch)."""
        corrected = calibration_input(
            scores, self.negative_keep_rate, self.ranker.outputs, scale=self.calibration_scale
        )
        return self.calibrator.transform(corrected)

    def save(self, path: Path) -> Path:
        """Write the bundle to directory ``path`` (created); returns it."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.ranker.save(path / "ranker")
        (path / "vocabulary.json").write_text(self.vocabulary.to_json())
        (path / "calibrator.json").write_text(json.dumps(self.calibrator.to_dict()))
        meta = {
            "kind": "ranking-bundle",
            "format_version": FORMAT_VERSION,
            "ranker_name": self.ranker_name,
            "quotas": dict(self.quotas),
            "cold_quotas": None if self.cold_quotas is None else dict(self.cold_quotas),
            "merge": dataclasses.asdict(self.fusion),
            "layout": self.layout.to_dict(),
            "feature_config": dataclasses.asdict(self.feature_config),
            "negative_keep_rate": self.negative_keep_rate,
            "calibration_scale": self.calibration_scale,
            "metadata": dict(self.metadata),
        }
        (path / BUNDLE_JSON).write_text(json.dumps(meta, indent=2, default=str))
        return path

    @classmethod
    def load(cls, path: Path) -> RankingBundle:
        """Read a bundle written by :meth:`save`; a clear ValueError when it is not one."""
        path = Path(path)
        meta_path = path / BUNDLE_JSON
        if not meta_path.is_file():
            raise ValueError(f"{path}: no {BUNDLE_JSON}; not a ranking bundle")
        try:
            meta = json.loads(meta_path.read_text())
            vocabulary = Vocabulary.from_json((path / "vocabulary.json").read_text())
            calibrator = Calibrator.from_dict(json.loads((path / "calibrator.json").read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: unreadable ranking bundle ({err})") from err
        if meta.get("kind") != "ranking-bundle" or meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{meta_path}: kind {meta.get('kind')!r} version {meta.get('format_version')!r}; "
                f"expected 'ranking-bundle' version {FORMAT_VERSION}"
            )
        raw_config = dict(meta["feature_config"])
        for key in ("windows_days", "categories", "user_attributes", "event_types"):
            if raw_config.get(key) is not None:
                raw_config[key] = tuple(raw_config[key])
        layout = meta["layout"]
        try:  # a bundle from before reciprocal-rank fusion merged by quotas
            fusion = Fusion(**meta.get("merge", {}))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{meta_path}: merge {meta.get('merge')!r}: {err}") from err
        return cls(
            ranker=load_ranker(path / "ranker"),
            ranker_name=str(meta["ranker_name"]),
            calibrator=calibrator,
            vocabulary=vocabulary,
            layout=FeatureLayout(tuple(layout["numeric"]), tuple(layout["categorical"])),
            quotas=dict(meta["quotas"]),
            feature_config=FeatureConfig(**raw_config),
            metadata=dict(meta.get("metadata", {})),
            negative_keep_rate=float(meta.get("negative_keep_rate", 1.0)),
            calibration_scale=_scale(meta.get("calibration_scale", "prior_corrected"), meta_path),
            cold_quotas=None if meta.get("cold_quotas") is None else dict(meta["cold_quotas"]),
            fusion=fusion,
        )


CalibrationScale = Literal["log_odds", "prior_corrected"]
_LOGIT_CLIP = 1e-7
"""Probabilities are clipped to [this, 1 - this] before their log-odds (a 0 or 1 would be
infinite)."""


def _scale(value: object, where: Path) -> CalibrationScale:
    if value not in ("log_odds", "prior_corrected"):
        raise ValueError(
            f"{where}: calibration_scale {value!r} is not 'log_odds' or 'prior_corrected'"
        )
    return value


def calibration_input(
    scores: npt.ArrayLike,
    keep_rate: float,
    outputs: ScoreKind,
    *,
    scale: CalibrationScale = "log_odds",
) -> FloatArray:
    """What the calibrator is fitted on and reads: the ranker's log-odds (a probability's
    logit; a score that only orders, as it is) shifted by ``log(keep_rate)``, which maps a
    ranker fit with negatives kept at ``keep_rate`` back to the world's click rate (the same
    correction as :func:`prior_corrected`, in log-odds).

    Platt's ``sigmoid(a * x + b)`` is a calibration of log-odds: on probabilities it cannot
    even leave a calibrated model as it is (on a calibrated ranker's probabilities it put
    the top 1% at a 0.91 click rate against a true 0.81). Isotonic regression depends only on
    the order. ``scale="prior_corrected"`` is the earlier input (:func:`prior_corrected`),
    which bundles saved before this one's calibrators were fitted on."""
    if scale == "prior_corrected":
        return prior_corrected(scores, keep_rate, outputs)
    values = np.asarray(scores, dtype=np.float64)
    if outputs == "probability":
        p = np.clip(values, _LOGIT_CLIP, 1.0 - _LOGIT_CLIP)
        values = np.log(p) - np.log1p(-p)
    return values + math.log(keep_rate) if keep_rate < 1.0 else values


def prior_corrected(scores: npt.ArrayLike, keep_rate: float, outputs: ScoreKind) -> FloatArray:
    """Scores of a ranker fit with negatives kept at rate ``keep_rate``, mapped back to the
    world's click rate (:func:`mlsd.data.sampling.recalibrate_downsampled`); unchanged at 1.

    ``outputs`` is the ranker's :attr:`~mlsd.models.ranking.base.Ranker.outputs`: anything
    but a probability goes through a sigmoid first, decided by the ranker and never by the
    values at hand, so a row's result does not depend on the other rows of its batch. The map
    is monotone, so rankings do not change; it leaves the calibrator less to correct."""
    values = np.asarray(scores, dtype=np.float64)
    if keep_rate >= 1.0:
        return values
    if outputs != "probability":
        values = sigmoid(values)
    return recalibrate_downsampled(values, keep_rate)
