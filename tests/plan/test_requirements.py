"""``[plan]``'s requirements refuse values that would plan nothing."""

from __future__ import annotations

import math
from typing import Any

import pytest

from mlsd.config import load_plan_requirements
from mlsd.plan.requirements import Requirements


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"users": 0}, "users must be > 0"),
        ({"precomputed_share": 1.5}, "precomputed_share must be in [0, 1]"),
        ({"cpu_utilization": 1.2}, "cpu_utilization must be in (0, 1]"),
        ({"peak_to_average": 0.5}, "peak_to_average must be >= 1"),
        ({"model_version_chars": -1}, "model_version_chars must be >= 0"),
        # TOML's nan and inf, which --set passes: NaN fails every comparison, so each range
        # check must be written to fail on it, and inf overflows the plan's whole counts
        ({"precomputed_share": math.nan}, "precomputed_share must be a finite number, got nan"),
        ({"requests_per_user_per_day": math.inf}, "requests_per_user_per_day must be a finite"),
        ({"batch_window_hours": math.inf}, "batch_window_hours must be a finite number"),
        ({"hnsw_m": 1}, "hnsw_m must be >= 2"),
        ({"precomputed_versions": 0}, "precomputed_versions must be > 0"),
    ],
)
def test_requirements_refuse_values_that_plan_nothing(
    changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        Requirements(**changes)


def test_a_nan_through_set_is_refused_naming_the_plan_key() -> None:
    with pytest.raises(ValueError, match=r"\[plan\]: precomputed_share must be a finite number"):
        load_plan_requirements(None, {"precomputed_share": "nan"})
