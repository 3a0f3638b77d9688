"""Feature definitions, declared once: batch computation, the Feast repository and serving use them.

Features come in five groups (the framework's split):

- ``user_static``: the contract's user attributes (age bucket, gender, ...); default ``"unknown"``.
- ``user_dynamic``: the user's recent activity, *stored* as of a time T (materialized into the
  online store, updated by pushes): the last N item ids and their timestamps, per-category event
  counts and mean values over 1, 7 and 30 days (vectors in :attr:`FeatureConfig.categories`
  order), total events per window, the last event's time and the events in its session.
- ``item``: item history stored as of T: events over 1, 7 and 30 days, mean value, the first
  event's time, and the category.
- ``context``: computed at request time: hour of day, day of week (+ context columns of events).
- ``cross``: computed at request time from the above: the user's affinity for the item's
  category, and whether the item is in the user's last N items.

Stored features hold *timestamps*, not ages: "time since the last event" and "days since the
item's first event" are derived at request time from the stored timestamp and the request's
``now``, so a value materialized an hour ago is still exact. Window counts cannot be derived
that way; they are as fresh as the last materialization or push.

Every feature of a label at time t is computed from events strictly before t.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

EVENT_TS_ALLOWANCE_S = 300.0
"""How far (seconds) an event's ``ts`` may be after the clock for
:meth:`mlsd.features.online.OnlineFeatures.push_events` to apply it (``POST /v1/events``
refuses such an event with a 422 before it gets there): clients' clocks drift a little, but a
later event would be counted in the user's online features before it happened, and, stored as
the user's newest state, would keep later materializations from replacing it in Redis (which
keeps the newest write)."""

DType = Literal["int64", "float32", "string", "int64_list", "float32_list"]
Group = Literal["user_static", "user_dynamic", "item", "context", "cross"]

UNKNOWN = "unknown"
"""Default of every string feature, and the category of unknown items."""

NEVER = 0
"""Default of a stored timestamp (seconds since the epoch): no event seen."""


@dataclass(frozen=True)
class Feature:
    """One feature: its name, type, group, the value unknown entities get, and what it means."""

    name: str
    dtype: DType
    group: Group
    default: object
    description: str


@dataclass(frozen=True)
class FeatureConfig:
    """What the feature step computes.

    Attributes:
        history_len: N, the number of recent items kept per user.
        windows_days: the look-back windows of counts and means, in days.
        session_gap_s: a gap longer than this (seconds) starts a new session.
        categories: the item categories, in the order of the per-category vectors; items of
            other categories count in none of them.
        user_attributes: the static user attribute columns of ``users.parquet``.
        event_types: the events that count (``None``: all of them).
    """

    history_len: int = 50
    windows_days: tuple[int, ...] = (1, 7, 30)
    session_gap_s: int = 1800
    categories: tuple[str, ...] = ()
    user_attributes: tuple[str, ...] = ()
    event_types: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.history_len < 1:
            raise ValueError(f"FeatureConfig.history_len={self.history_len}: must be >= 1")
        if not self.windows_days or any(w < 1 for w in self.windows_days):
            raise ValueError(f"FeatureConfig.windows_days={self.windows_days}: must be >= 1 each")
        if self.session_gap_s < 1:
            raise ValueError(f"FeatureConfig.session_gap_s={self.session_gap_s}: must be >= 1")
        if len(set(self.categories)) != len(self.categories):
            raise ValueError("FeatureConfig.categories: names must be unique")


@dataclass(frozen=True)
class FeatureSet:
    """All features of one configuration, grouped; see the module docstring."""

    config: FeatureConfig
    features: tuple[Feature, ...] = field(default_factory=tuple)

    def group(self, name: Group) -> tuple[Feature, ...]:
        return tuple(f for f in self.features if f.group == name)

    def names(self, name: Group) -> list[str]:
        return [f.name for f in self.group(name)]

    def defaults(self, name: Group) -> dict[str, object]:
        return {f.name: f.default for f in self.group(name)}


def window_names(prefix: str, config: FeatureConfig) -> list[str]:
    """``[f"{prefix}_1d", f"{prefix}_7d", ...]`` for the configured windows."""
    return [f"{prefix}_{w}d" for w in config.windows_days]


def feature_set(config: FeatureConfig) -> FeatureSet:
    """Declare every feature of ``config``."""
    n_cat = len(config.categories)
    features: list[Feature] = [
        Feature(a, "string", "user_static", UNKNOWN, f"user attribute {a!r}")
        for a in config.user_attributes
    ]
    features += [
        Feature("recent_item_ids", "int64_list", "user_dynamic", [], "last N items, newest first"),
        Feature("recent_ts", "int64_list", "user_dynamic", [], "their times, epoch seconds"),
        Feature("last_event_ts", "int64", "user_dynamic", NEVER, "last event, epoch seconds"),
        Feature("session_events", "int64", "user_dynamic", 0, "events in the last event's session"),
    ]
    for w in config.windows_days:
        features += [
            Feature(f"events_{w}d", "float32", "user_dynamic", 0.0, f"events in the last {w} d"),
            Feature(
                f"cat_count_{w}d",
                "float32_list",
                "user_dynamic",
                [0.0] * n_cat,
                f"events per category in the last {w} d",
            ),
            Feature(
                f"cat_mean_{w}d",
                "float32_list",
                "user_dynamic",
                [0.0] * n_cat,
                f"mean value per category in the last {w} d (0 when no event)",
            ),
        ]
    features += [
        Feature(f"item_events_{w}d", "float32", "item", 0.0, f"item's events in the last {w} d")
        for w in config.windows_days
    ]
    features += [
        Feature("item_mean_value", "float32", "item", 0.0, "mean value over all past events"),
        Feature("item_first_ts", "int64", "item", NEVER, "first event, epoch seconds"),
        Feature("category", "string", "item", UNKNOWN, "the item's category"),
        Feature("hour_of_day", "int64", "context", 0, "request hour, 0-23 UTC"),
        Feature("day_of_week", "int64", "context", 0, "request weekday, Monday = 0"),
        Feature("user_known", "int64", "context", 0, "1 when the user has stored features"),
        Feature("item_known", "int64", "context", 0, "1 when the item has stored features"),
        Feature("seconds_since_last_event", "float32", "cross", -1.0, "-1 when none"),
        Feature("session_events_now", "int64", "cross", 0, "0 when the session has ended"),
        Feature("item_age_days", "float32", "cross", -1.0, "since its first event; -1 when none"),
        Feature(
            "category_affinity",
            "float32",
            "cross",
            0.0,
            "share of the user's last-30-day (longest window) events in the item's category",
        ),
        Feature("seen_recently", "int64", "cross", 0, "1 when the item is in the last N items"),
    ]
    return FeatureSet(config=config, features=tuple(features))
