"""Request bodies on their own (pydantic, no app): an event's ``ts``."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from mlsd.serving.schemas import NOW_MAX, EventIn


def _event_ts(ts: object) -> datetime | None:
    return EventIn.model_validate({"user_id": 1, "item_id": 2, "event": "click", "ts": ts}).ts


def _refusal(ts: object) -> dict[str, object]:
    with pytest.raises(ValidationError) as refused:
        _event_ts(ts)
    (error,) = refused.value.errors()
    return dict(error)


def test_a_numeric_ts_is_unix_seconds_however_large() -> None:
    """pydantic alone reads a number above 2e10 as milliseconds: 20,000,000,001 s (year 2603)
    became 1970-08-20 and was stored, where the smaller 9,214,646,401 was refused."""
    assert _event_ts(1_700_000_000) == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    assert _event_ts(NOW_MAX) == datetime(2262, 1, 1, tzinfo=UTC)  # the last time taken
    assert _event_ts("2023-11-14T22:13:20Z") == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    error = _refusal(20_000_000_001)
    assert error["loc"] == ("ts",)
    assert "less than or equal to 2262-01-01T00:00:00Z" in str(error["msg"])


@pytest.mark.parametrize(
    ("ts", "says"),
    [
        (20_000_000_001.0, "less than or equal to 2262-01-01T00:00:00Z"),
        ("20000000001", "less than or equal to 2262-01-01T00:00:00Z"),
        (1_700_000_000_000, "send seconds since 1970-01-01T00:00:00Z, not milliseconds"),
    ],
    ids=["float", "numeric-text", "milliseconds"],
)
def test_a_ts_past_2262_in_any_numeric_form_is_refused_naming_ts(ts: object, says: str) -> None:
    error = _refusal(ts)
    assert error["loc"] == ("ts",)
    assert says in str(error["msg"])
