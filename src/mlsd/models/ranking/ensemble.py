"""A z-score-averaging ensemble of rankers: several second-stage models vote on each row.

Each member is fitted on the same rows; its scores are standardised with the mean and standard
deviation it gives on the validation rows (the training rows when ``fit`` gets no ``valid``),
and the ensemble's score is the weighted mean of those z-scores. Margins (logistic, LightGBM),
listwise scores (LambdaRank) and probabilities (DCN-v2) live on different scales; z-scores put
them on one, so no member dominates by its units.

Why an ensemble: on the temporal protocol the ranker learns from a few label windows and is
judged on a later one. A linear model transfers across windows but cannot model interactions;
trees and the deep network can, but also memorise window-specific patterns (every cold user of
a window has the same candidates with the same features). Averaging them keeps most of each
one's strength and is less variable from window to window than any one of them.

Saved as ``ranker.json`` (members, weights, standardisation) plus one sub-directory per member
written by the member's own ``save``, so the safe formats of every member are kept.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

import numpy as np
import pandas as pd

from mlsd.models.ranking.base import FloatArray, Ranker, RankingData
from mlsd.models.ranking.gbdt import LightGBMRanker, Objective
from mlsd.models.ranking.logistic import LogisticRanker

RANKER_JSON = "ranker.json"
MEMBERS_DIR = "members"
FORMAT_VERSION = 1


def regularised_trees(objective: Objective) -> LightGBMRanker:
    """LightGBM with smaller, more regularised trees than :class:`LightGBMRanker`'s defaults:
    with a few label windows, fewer and larger leaves transfer better to the next window."""
    return LightGBMRanker(
        objective=objective,
        n_estimators=500,
        learning_rate=0.03,
        num_leaves=15,
        min_child_samples=200,
        reg_lambda=10.0,
    )


def default_members(*, deep: bool = True) -> list[tuple[str, Ranker]]:
    """Logistic regression, regularised LightGBM (binary and LambdaRank), and DCN-v2.

    The trees are :func:`regularised_trees`; ``deep=False`` leaves the DCN-v2 member out (and
    torch unimported).
    """
    members: list[tuple[str, Ranker]] = [
        ("logistic", LogisticRanker()),
        ("lightgbm", regularised_trees("binary")),
        ("lambdarank", regularised_trees("lambdarank")),
    ]
    if deep:
        from mlsd.models.ranking.deep import DeepRanker, DeepRankerConfig

        config = DeepRankerConfig(tasks={"click": 1.0, "rating": 0.5})
        members.append(("deep", DeepRanker(config, progress=False)))
    return members


class EnsembleRanker(Ranker):
    """The weighted mean of its members' standardised scores.

    Args:
        members: ``(name, unfitted ranker)`` pairs, as scikit-learn's ``VotingClassifier``;
            ``None`` uses :func:`default_members`. ``fit`` fits copies, so the given rankers
            stay unfitted.
        weights: name → weight (> 0); ``None`` weighs every member alike.

    Attributes:
        members_: name → fitted member, in the given order.
        weights_: name → weight.
        score_mean_, score_std_: name → the member's score mean and standard deviation on the
            validation rows (training rows without ``valid``).
    """

    name = "ensemble"

    members_: dict[str, Ranker]
    weights_: dict[str, float]
    score_mean_: dict[str, float]
    score_std_: dict[str, float]

    def __init__(
        self,
        members: Sequence[tuple[str, Ranker]] | None = None,
        *,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        self.members = members
        self.weights = weights

    def _checked_members(self) -> list[tuple[str, Ranker]]:
        members = list(self.members) if self.members is not None else default_members()
        names = [name for name, _ in members]
        if not members or len(set(names)) != len(names):
            raise ValueError(f"EnsembleRanker: members need unique names, got {names}")
        weights = dict(self.weights or {})
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise ValueError(f"EnsembleRanker: weights for unknown members {unknown}; have {names}")
        bad = {k: v for k, v in weights.items() if not v > 0}
        if bad:
            raise ValueError(f"EnsembleRanker: weights must be > 0, got {bad}")
        return members

    def fit(self, train: RankingData, valid: RankingData | None = None) -> Self:
        """Fit a copy of every member on ``train`` (each may early-stop on ``valid``)."""
        members = self._checked_members()
        reference = valid if valid is not None and len(valid.groups) else train
        self.members_, self.score_mean_, self.score_std_ = {}, {}, {}
        for name, member in members:
            fitted = copy.deepcopy(member).fit(train, valid)
            scores = fitted.predict(reference.features)
            std = float(np.std(scores))
            self.members_[name] = fitted
            self.score_mean_[name] = float(np.mean(scores))
            # A member that scores every row alike cannot rank: keep it, but at scale 1.
            self.score_std_[name] = std if std > 0 and np.isfinite(std) else 1.0
        weights = self.weights or {}
        self.weights_ = {name: float(weights.get(name, 1.0)) for name in self.members_}
        return self

    def compile(self, *, inline: bool = False) -> Self:
        """Compile every member (:meth:`Ranker.compile`)."""
        self._check_fitted()
        for member in self.members_.values():
            member.compile(inline=inline)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "members_"):
            raise RuntimeError("EnsembleRanker is not fitted; call fit(train) or load(dir)")

    def member_scores(self, features: pd.DataFrame) -> dict[str, FloatArray]:
        """Name → ``(n,)`` standardised score of each member."""
        self._check_fitted()
        return {
            name: (member.predict(features) - self.score_mean_[name]) / self.score_std_[name]
            for name, member in self.members_.items()
        }

    def predict(self, features: pd.DataFrame) -> FloatArray:
        """``(n,)`` weighted mean of the members' z-scores (a ranking score, not a probability;
        calibrate it for probabilities)."""
        self._check_fitted()
        total = sum(self.weights_.values())
        scores = np.zeros(len(features), dtype=np.float64)
        for name, z in self.member_scores(features).items():
            scores += self.weights_[name] / total * z
        return scores

    def feature_importance(self) -> dict[str, float]:
        """Column → weighted mean of the members' importances (each normalised to sum 1), for
        the members that report one; largest first."""
        self._check_fitted()
        out: dict[str, float] = {}
        for name, member in self.members_.items():
            method = getattr(member, "feature_importance", None)
            if method is None:
                continue
            values: dict[str, float] = method()
            total = sum(values.values())
            for column, value in values.items():
                share = value / total if total > 0 else 0.0
                out[column] = out.get(column, 0.0) + self.weights_[name] * share
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def save(self, path: Path) -> None:
        """Write ``ranker.json`` and each member into ``members/<name>/``."""
        self._check_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        entries = []
        for name, member in self.members_.items():
            member_dir = Path(MEMBERS_DIR) / name
            member.save(path / member_dir)
            entries.append(
                {
                    "name": name,
                    "kind": member.name,
                    "dir": member_dir.as_posix(),
                    "weight": self.weights_[name],
                    "score_mean": self.score_mean_[name],
                    "score_std": self.score_std_[name],
                }
            )
        meta = {"kind": self.name, "format_version": FORMAT_VERSION, "members": entries}
        (path / RANKER_JSON).write_text(json.dumps(meta, indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Self:
        """Read an ensemble written by :meth:`save` (members through the ranker registry)."""
        from mlsd.models.ranking.registry import load_ranker  # the registry imports this module

        meta_path = Path(path) / RANKER_JSON
        meta = json.loads(meta_path.read_text())
        if meta.get("kind") != cls.name:
            raise ValueError(f"{meta_path}: kind {meta.get('kind')!r} is not {cls.name!r}")
        members = {}
        for entry in meta["members"]:
            member_dir = (Path(path) / entry["dir"]).resolve()
            if Path(path).resolve() not in member_dir.parents:
                raise ValueError(f"{meta_path}: member directory {entry['dir']!r} is outside")
            members[entry["name"]] = load_ranker(member_dir)
        weights = {e["name"]: float(e["weight"]) for e in meta["members"]}
        ranker = cls(list(members.items()), weights=weights)
        ranker.members_, ranker.weights_ = members, weights
        ranker.score_mean_ = {e["name"]: float(e["score_mean"]) for e in meta["members"]}
        ranker.score_std_ = {e["name"]: float(e["score_std"]) for e in meta["members"]}
        return ranker
