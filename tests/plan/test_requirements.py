"""``[plan]``'s requirements refuse values that would plan nothing."""

from __future__ import annotations

from typing import Any

import pytest

from mlsd.plan.requirements import Requirements


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"users": 0}, "users must be > 0"),
        ({"precomputed_share": 1.5}, "precomputed_share must be in [0, 1]"),
        ({"cpu_utilization": 1.2}, "cpu_utilization must be in (0, 1]"),
        ({"peak_to_average": 0.5}, "peak_to_average must be >= 1"),
        ({"model_version_chars": -1}, "model_version_chars must be >= 0"),
    ],
)
def test_requirements_refuse_values_that_plan_nothing(
    changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        Requirements(**changes)
