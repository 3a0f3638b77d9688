"""The pipeline under offline evaluation: its settings, kept light (no torch) so configs load fast.

``[ranking]`` in a system's TOML maps onto :class:`PipelineConfig`;
:func:`mlsd.evaluation.offline.evaluate_pipeline` runs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from mlsd.evaluation.retrieval import MergeConfig
from mlsd.serving.rerank import RerankConfig

AUTO = "auto"
"""``PipelineConfig.ranker`` value: use the ranker with the best held-out NDCG@10."""


@dataclass(frozen=True)
class PipelineConfig:
    """The pipeline under evaluation (``[ranking]`` in the system's TOML).

    Attributes:
        n_candidates: merged candidates per user (each source lists this many).
        ranker: the rankers' key the full pipeline uses, or ``"auto"``: the best NDCG@10 of
            the held-out users' candidates — chosen on validation, never on test.
        ranker_windows: label windows the rankers learn from: on the temporal protocol the
            validation window [t1, t2) and ``ranker_windows - 1`` earlier windows of the same
            span, each with its own sources fit before it and features as of its start; on
            the random-per-user protocol as many inner random splits of the training data.
        ranker_valid_frac: users of the ranker's window held out for early stopping, AUC and
            calibration.
        auc_splits: draws of held-out users the rankers' AUC is measured on (1: the one the
            pipeline uses; each further draw refits every ranker, for the report's AUC spread).
        negative_keep_rate: each negative ranker row is kept with this probability (1: all);
            the calibration undoes the shift (:func:`mlsd.data.sampling.recalibrate_downsampled`
            then the calibrator, fit on held-out rows that keep every negative).
        calibration: ``"platt"`` or ``"isotonic"``.
        rerank: the re-ranking stage of the full pipeline.
        rerank_variants: extra re-ranking settings whose cost and gain the report shows.
        baselines: sources also scored alone (full ranking).
        ks: list cutoffs of every metric.
        merge: how the quotas are found (tuned on the ranker's window by default).
    """

    n_candidates: int = 200
    ranker: str = AUTO
    ranker_windows: int = 3
    ranker_valid_frac: float = 0.2
    auc_splits: int = 1
    negative_keep_rate: float = 1.0
    calibration: Literal["platt", "isotonic"] = "isotonic"
    rerank: RerankConfig = field(default_factory=RerankConfig)
    rerank_variants: Mapping[str, RerankConfig] = field(
        default_factory=lambda: {
            "mmr 0.7": RerankConfig(mmr_lambda=0.7),
            "freshness 0.3": RerankConfig(freshness_weight=0.3),
            "max 3 per category": RerankConfig(max_per_category=3),
        }
    )
    baselines: tuple[str, ...] = ("popularity", "ease", "als", "bpr")
    ks: tuple[int, ...] = (10, 20, 50, 100)
    merge: MergeConfig = field(default_factory=lambda: MergeConfig(quota_step=0.2))

    def __post_init__(self) -> None:
        if self.n_candidates < max(self.ks):
            raise ValueError(
                f"n_candidates={self.n_candidates} must be >= the largest k ({max(self.ks)})"
            )
        if self.ranker_windows < 1:
            raise ValueError(f"ranker_windows={self.ranker_windows}: must be >= 1")
        if not 0.0 < self.negative_keep_rate <= 1.0:
            raise ValueError(f"negative_keep_rate={self.negative_keep_rate}: must be in (0, 1]")
        if self.auc_splits < 1:
            raise ValueError(f"auc_splits={self.auc_splits}: must be >= 1")
        if not 0.0 < self.ranker_valid_frac < 1.0:
            raise ValueError(f"ranker_valid_frac={self.ranker_valid_frac}: must be in (0, 1)")
