"""Online experiments in the service: route each request to its arm's model.

:class:`ExperimentRecommender` is a :class:`~mlsd.serving.recommender.Recommender` made of
other recommenders, one per arm of an :class:`~mlsd.evaluation.experiments.Experiment`. Each
request goes to the arm the experiment assigns its user (deterministic hashing of the user id
and the experiment's salt; an anonymous visitor by the request id), and the answer says which
experiment and arm served it, so the service log tags every request and exposure with its arm
and ``mlsd feed experiment report`` can compare the arms.

Composition instead of branching in the app: the HTTP layer, the log and the reload path stay
the same with or without an experiment, and a reload swaps all arms at once.

Feedback goes to every arm that keeps its own state (two feed models reading one feature store
share it, so the events are written once per store, not once per arm).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from mlsd.evaluation.experiments import Experiment
from mlsd.serving.recommender import (
    FastRecommender,
    Recommender,
    RecommendRequest,
    RecommendResult,
)

POPULAR_ALIAS = "popular"
"""An arm with this alias serves the dataset's most popular items (the baseline). Its answers
take the path ``"popular"``: by design, not a fallback (the fallback-rate alert ignores them)."""


class ExperimentRecommender:
    """The arms of ``experiment`` behind one :class:`Recommender`.

    Args:
        experiment: the assignment (arms, weights, salt).
        arms: arm name → the recommender serving it (every arm of the experiment).
    """

    def __init__(self, experiment: Experiment, arms: Mapping[str, Recommender]) -> None:
        names = [arm.name for arm in experiment.arms]
        missing = [name for name in names if name not in arms]
        extra = sorted(set(arms) - set(names))
        if missing or extra:
            raise ValueError(
                f"experiment {experiment.name!r}: arms {names}; recommenders given for "
                f"{sorted(arms)} (missing {missing}, unknown {extra})"
            )
        self.experiment = experiment
        self.arms = dict(arms)
        self._baseline = {arm.name: arm.alias == POPULAR_ALIAS for arm in experiment.arms}
        self.version = ",".join(f"{name}={self.arms[name].version}" for name in names)

    def arm_for(self, request: RecommendRequest) -> str:
        """The arm that serves ``request``: its user's, or for an anonymous visitor its
        request id's (which it must carry: the service gives every request one, and the same
        id must give the same arm each time it is asked, as the log records it)."""
        return self.experiment.assign(request.user_id, request_id=request.request_id).name

    def assignment(self, request: RecommendRequest) -> tuple[str, str]:
        """(experiment, arm) of ``request`` (:class:`~mlsd.serving.recommender.Routed`)."""
        return self.experiment.name, self.arm_for(request)

    def recommend(self, request: RecommendRequest) -> RecommendResult:
        arm = self.arm_for(request)
        return self._tag(arm, self.arms[arm].recommend(request))

    async def recommend_fast(self, request: RecommendRequest) -> RecommendResult | None:
        """The arm's fast answer, when its model has one for this request."""
        arm = self.arm_for(request)
        model = self.arms[arm]
        if not isinstance(model, FastRecommender):
            return None
        result = await model.recommend_fast(request)
        return None if result is None else self._tag(arm, result)

    def _tag(self, arm: str, result: RecommendResult) -> RecommendResult:
        if self._baseline[arm] and result.path == "fallback:popular" and not result.fallbacks:
            result = replace(result, path="popular")
        return replace(result, experiment=self.experiment.name, arm=arm)

    def record_events(self, events: Sequence[Mapping[str, object]]) -> int:
        accepted, seen = 0, set()
        for model in self.arms.values():
            sink = id(getattr(model, "features", None) or model)
            if sink in seen:
                continue
            seen.add(sink)
            accepted = max(accepted, model.record_events(events))
        return accepted

    def history(self, user_id: int, n: int = 20) -> list[int]:
        return self.arms[self.experiment.arms[0].name].history(user_id, n)

    def ready(self) -> bool:
        return all(model.ready() for model in self.arms.values())

    @property
    def reference_profile_path(self) -> Path | None:
        """The first arm's (the control's) training-time profile, else any arm's: the
        service's drift monitor compares the live traffic with it."""
        for arm in self.experiment.arms:
            path = getattr(self.arms[arm.name], "reference_profile_path", None)
            if isinstance(path, Path):
                return path
        return None
