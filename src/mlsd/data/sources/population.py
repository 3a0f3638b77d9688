"""Who lives in the simulated world: the user and item vocabularies and the population draws.

:class:`~mlsd.data.sources.world.World` calls :func:`draw_users` and :func:`draw_items` once, then
:func:`draw_drift` for a world with ``drift_at``; it stores the arrays they return as its
``user_*`` and ``item_*`` fields. Categorical user attributes are codes into the tuples below.

This module reads the config through :class:`PopulationConfig` rather than importing
:mod:`mlsd.data.sources.world`, which imports it.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

_US_PER_SECOND = 1_000_000  # as in world.py, which imports this module
PREHISTORY_DAYS = 365
"""Items that exist at the start were created up to this many days before it."""

# User attributes are drawn with these shares; ``user_age`` etc. hold codes into the names.
AGE_BUCKETS = ("under 18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
AGE_SHARES = (0.05, 0.2, 0.3, 0.2, 0.1, 0.08, 0.07)
FEATURE_DRIFT_AGE_BOOST = (4.0, 4.0, 2.0, 1.0, 0.5, 0.4, 0.3)
"""``drift_kind="feature"``: activity multipliers per age bucket after ``drift_at``."""
GENDERS = ("F", "M", "X")
GENDER_SHARES = (0.48, 0.48, 0.04)
OCCUPATIONS = (
    *("student", "engineer", "healthcare", "education", "sales", "arts", "trades"),
    *("management", "service", "science", "retired", "other"),
)
REGIONS = ("us-east", "us-west", "eu-west", "eu-central", "asia-east", "latam")
CATEGORY_NAMES = (
    *("news", "sports", "music", "movies", "gaming", "tech", "food", "travel", "fashion"),
    *("science", "finance", "health", "comedy", "art", "books", "cars", "pets", "diy"),
    *("parenting", "nature"),
)
"""Names of the first categories; beyond these, categories are ``category_<k>``."""


class PopulationConfig(Protocol):
    """The fields of :class:`~mlsd.data.sources.world.WorldConfig` that the draws read."""

    n_users: int
    n_items: int
    n_categories: int
    n_factors: int
    days: int
    taste_concentration: float
    popularity_exponent: float
    new_item_fraction: float
    drift_kind: str
    drift_strength: float

    @property
    def start_us(self) -> int: ...


def category_names(n_categories: int) -> list[str]:
    """The names of categories ``0 .. n_categories - 1``, the codes of ``item_category``."""
    if n_categories <= len(CATEGORY_NAMES):
        return list(CATEGORY_NAMES[:n_categories])
    return [f"category_{k}" for k in range(n_categories)]


def _dirichlet_rows(rng: np.random.Generator, alpha: FloatArray) -> FloatArray:
    """One Dirichlet draw per row of ``alpha`` (rows x k), via normalised gammas."""
    gammas = rng.standard_gamma(alpha)
    totals = gammas.sum(axis=1, keepdims=True)
    # Tiny concentrations can underflow every gamma of a row to 0; such a user is indifferent.
    flat = totals[:, 0] <= 0
    gammas[flat] = 1.0
    totals[flat] = alpha.shape[1]
    out: FloatArray = gammas / totals
    return out


def draw_users(rng: np.random.Generator, config: PopulationConfig) -> dict[str, npt.NDArray[Any]]:
    """The ``user_*`` arrays, (n_users, ...): demographics, activity, tastes, latent factors."""
    n = config.n_users
    age = rng.choice(len(AGE_BUCKETS), size=n, p=AGE_SHARES).astype(np.int8)
    gender = rng.choice(len(GENDERS), size=n, p=GENDER_SHARES).astype(np.int8)
    return {
        "user_age": age,
        "user_gender": gender,
        "user_occupation": rng.integers(len(OCCUPATIONS), size=n, dtype=np.int8),
        "user_region": rng.integers(len(REGIONS), size=n, dtype=np.int8),
        "user_activity": rng.lognormal(0.0, 1.0, size=n),
        "user_taste": _draw_tastes(rng, config, age, gender),
        "user_factors": rng.standard_normal((n, config.n_factors), dtype=np.float32),
    }


def _draw_tastes(
    rng: np.random.Generator,
    config: PopulationConfig,
    age: npt.NDArray[np.int8],
    gender: npt.NDArray[np.int8],
) -> FloatArray:
    """(n_users, n_categories) Dirichlet tastes centred on age- and gender-specific priors."""
    k = config.n_categories
    age_prior = rng.dirichlet(np.ones(k), size=len(AGE_BUCKETS))
    gender_prior = rng.dirichlet(np.ones(k), size=len(GENDERS))
    centre = 0.4 * age_prior[age] + 0.2 * gender_prior[gender] + 0.4 / k
    return _dirichlet_rows(rng, config.taste_concentration * k * centre)


def draw_items(rng: np.random.Generator, config: PopulationConfig) -> dict[str, npt.NDArray[Any]]:
    """The ``item_*`` arrays, (n_items, ...), ids in creation order; every category has an item."""
    n, k = config.n_items, config.n_categories
    n_old = max(k, n - round(n * config.new_item_fraction))
    span_s = config.days * 86_400
    created_s = np.concatenate(
        [
            -rng.integers(1, PREHISTORY_DAYS * 86_400, size=n_old),  # before the start
            rng.integers(0, span_s, size=n - n_old),  # arriving during the span
        ]
    )
    created_us = config.start_us + np.sort(created_s) * _US_PER_SECOND  # ids in creation order
    category = rng.choice(k, size=n, p=rng.dirichlet(np.full(k, 2.0))).astype(np.int32)
    category[:k] = rng.permutation(k)  # the k oldest items cover every category from the start
    has_second = rng.random(n) < 0.3 if k > 1 else np.zeros(n, dtype=bool)
    second = np.where(has_second, (category + rng.integers(1, max(k, 2), size=n)) % k, -1)
    popularity = (rng.permutation(n) + 1.0) ** -config.popularity_exponent
    log_pop = np.log(popularity)
    z_pop = (log_pop - log_pop.mean()) / (log_pop.std() or 1.0)
    centres = rng.standard_normal((k, config.n_factors))
    noise = rng.standard_normal((n, config.n_factors))
    return {
        "item_category": category,
        "item_second_category": second.astype(np.int32),
        "item_created_us": created_us.astype(np.int64),
        "item_popularity": popularity,
        "item_trend": rng.standard_normal(n),
        # Popular items are somewhat better: quality correlates 0.5 with log popularity.
        "item_quality": 0.5 * z_pop + math.sqrt(0.75) * rng.standard_normal(n),
        "item_factors": (0.7 * centres[category] + math.sqrt(0.51) * noise).astype(np.float32),
    }


def draw_drift(
    rng: np.random.Generator, config: PopulationConfig, arrays: dict[str, npt.NDArray[Any]]
) -> dict[str, npt.NDArray[Any]]:
    """The post-drift user arrays: new tastes, or an activity shift towards young users."""
    taste, activity = arrays["user_taste"], arrays["user_activity"]
    s = config.drift_strength
    if config.drift_kind == "tastes":
        fresh = _draw_tastes(rng, config, arrays["user_age"], arrays["user_gender"])
        return {"user_taste_after": (1.0 - s) * taste + s * fresh, "user_activity_after": activity}
    boost = np.asarray(FEATURE_DRIFT_AGE_BOOST) ** s
    return {"user_taste_after": taste, "user_activity_after": activity * boost[arrays["user_age"]]}
