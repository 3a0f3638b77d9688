"""Request and response bodies of the service (pydantic): the routes and the OpenAPI schema."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from mlsd.data.schema import FLOAT32_MAX
from mlsd.features.definitions import EVENT_TS_ALLOWANCE_S
from mlsd.serving.recommender import Path_

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
NOW_MAX = 9_214_646_400.0
"""The latest time accepted, Unix seconds (2262-01-01T00:00:00Z), for a request's ``now``
(simulations set it) and an event's ``ts``: pandas' nanosecond timestamps, which the feature
path converts both to, end in April 2262."""
Int64 = Annotated[int, Field(strict=True, ge=INT64_MIN, le=INT64_MAX)]
"""An id in a body: strict, so JSON ``true``, ``"7"`` or ``7.0`` is a 422, not user 1 or 7
(query and path parameters arrive as text and are parsed, not here)."""
Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
"""A number in a body: JSON integers and decimals only (a string such as ``"7"`` is a 422, as
for ids), finite (the parser reads ``NaN`` and ``Infinity`` literals)."""
ContextValue = Annotated[str, Field(strict=True)] | Annotated[int, Field(strict=True)] | Finite
"""A request context value: a string, an integer or a finite number; ``true`` is a 422, not 1."""
_NUMBER = re.compile(r"[+-]?[0-9]+(\.[0-9]+)?")


def _unix_seconds(value: object) -> object:
    """An event's ``ts`` given as a number, or text of one, read as Unix seconds at any size;
    other values (ISO 8601 text) are left to pydantic.

    Why: pydantic reads a number above 2e10 as milliseconds, so 20,000,000,001 s (year 2603,
    after :data:`NOW_MAX`) became 1970-08-20 and was stored, where 9,214,646,401 was refused.
    """
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):  # NaN, infinite, or beyond year 9999
        raise ValueError(
            f"{value!r} is not a time in Unix seconds (1970 to 2262); send seconds since "
            "1970-01-01T00:00:00Z, not milliseconds, or ISO 8601 text"
        ) from None


EventTime = Annotated[
    datetime,
    Field(ge=datetime.fromtimestamp(0, UTC), le=datetime.fromtimestamp(NOW_MAX, UTC)),
    BeforeValidator(_unix_seconds),
]
"""An event's time: ISO 8601 text (pydantic's parsing) or a number of Unix seconds however
large (pydantic alone reads one above 2e10 as milliseconds), from 1970 to :data:`NOW_MAX` (the
bounds of a request's ``now``)."""


class ItemOut(BaseModel):
    item_id: int
    score: float
    source: str = Field(description="the candidate source that proposed the item")
    reasons: list[str] = Field(description="why, when the request asked to explain")


class RecommendationsOut(BaseModel):
    request_id: str
    user_id: int | None
    model_version: str
    path: Path_
    fallbacks: list[str] = Field(description="dependencies that failed on the way")
    items: list[ItemOut]
    stage_ms: dict[str, float] = Field(description="milliseconds per stage; 'total': all of it")
    experiment: str = Field("", description="the online experiment that routed the request")
    arm: str = Field("", description="the experiment arm that answered")


class RecommendIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Int64 | None = Field(None, description="null for an anonymous visitor")
    k: int | None = Field(
        None, strict=True, ge=1, description="items, at most MLSD_MAX_K; MLSD_DEFAULT_K"
    )
    context: dict[str, ContextValue] = Field(default_factory=dict, max_length=64)
    recent_items: list[Int64] = Field(default_factory=list, max_length=1000)
    explain: bool = False
    allow_precomputed: bool = True
    now: Finite | None = Field(
        None, ge=0, le=NOW_MAX, description="request time, Unix seconds (default: the clock)"
    )


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Int64
    item_id: Int64
    event: str = Field(min_length=1, max_length=64, examples=["click"])
    value: Finite = Field(
        1.0,
        ge=-FLOAT32_MAX,
        le=FLOAT32_MAX,
        description="finite, within float32's range (the online store's type)",
    )
    ts: EventTime | None = Field(
        None,
        description=(
            "ISO 8601 or Unix seconds (not milliseconds), 1970 to 2262 (UTC when no offset), "
            "at most "
            f"{EVENT_TS_ALLOWANCE_S:.0f} s after the server's clock; default: now"
        ),
    )
    request_id: str | None = Field(
        None, max_length=64, description="the request_id of the recommendation that showed it"
    )


class AcceptedOut(BaseModel):
    accepted: int


class HistoryOut(BaseModel):
    user_id: int
    model_version: str
    items: list[int] = Field(description="the user's most recent items, newest first")


class UserSampleOut(BaseModel):
    user_ids: list[int]


class StatusOut(BaseModel):
    status: str
    model_version: str | None = None
    detail: str | None = None


class ErrorOut(BaseModel):
    detail: str = Field(description="what went wrong, and what to do")


class ReloadOut(BaseModel):
    old_version: str | None
    new_version: str


# ---------------------------------------------------------------- metrics
