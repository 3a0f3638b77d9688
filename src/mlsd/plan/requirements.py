"""``[plan]``: the traffic and service levels a capacity plan is for (step 1, requirements).

Kept apart from :mod:`mlsd.plan.capacity` so the config reads it without importing serving code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal


@dataclass(frozen=True)
class Requirements:
    """``[plan]``: the traffic and the service levels a plan is for.

    Attributes:
        daily_active_users: users who send at least one request a day.
        requests_per_user_per_day: feed loads per active user per day.
        peak_to_average: the busiest hour's rate over the day's mean rate.
        precomputed_share: of the requests, those answered from a precomputed list (the
            offline path); the rest run the online path.
        users: users a batch run writes a precomputed list for (and the rows of the ALS and
            BPR user-vector tables).
        catalog_items: items retrieval searches (vectors in each index).
        list_length: items in a precomputed list.
        precomputed_versions: model versions whose precomputed lists Redis holds at once. Keys
            are per version with a TTL (:mod:`mlsd.serving.precomputed`): a new version's batch
            (the next champion's, a challenger's) is written beside the champion's, whose
            lists stay until their TTL ends, so 2 (the champion and the next) unless batches
            of more versions overlap within a TTL.
        model_version_chars: characters of the model version stored in every list.
        index: the vector index: ``auto`` as serving picks it by catalog size (exact below
            50K items, HNSW below 5M, IVF-PQ with exact re-scoring above), or ``flat``,
            ``hnsw``, ``ivfpq``.
        hnsw_m: HNSW's links per node (``M``); layer 0 keeps twice as many.
        latency_budget_ms: the p99 a request may take end to end.
        cpu_utilization: the share of a replica's core loaded at peak, headroom for bursts
            and deploys (a lost replica is covered by one replica more, not by this).
        cores_per_replica: cores each service replica uses (one model thread each: 1).
        min_replicas: replicas kept for availability whatever the load.
        batch_window_hours: hours a batch run may take.
    """

    daily_active_users: int = 1_000_000
    requests_per_user_per_day: float = 10.0
    peak_to_average: float = 3.0
    precomputed_share: float = 0.8
    users: int = 5_000_000
    catalog_items: int = 1_000_000
    list_length: int = 100
    precomputed_versions: int = 2
    model_version_chars: int = 17
    index: Literal["auto", "flat", "hnsw", "ivfpq"] = "auto"
    hnsw_m: int = 32
    latency_budget_ms: float = 500.0
    cpu_utilization: float = 0.6
    cores_per_replica: float = 1.0
    min_replicas: int = 2
    batch_window_hours: float = 4.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str):
                continue
            # TOML's nan and inf (--set peak_to_average=inf) plan nothing
            if not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
            if f.name in ("precomputed_share", "model_version_chars"):
                if not value >= 0:
                    raise ValueError(f"{f.name} must be >= 0, got {value}")
            elif not value > 0:
                raise ValueError(f"{f.name} must be > 0, got {value}")
        if not 0 <= self.precomputed_share <= 1:
            raise ValueError(f"precomputed_share must be in [0, 1], got {self.precomputed_share}")
        if not 0 < self.cpu_utilization <= 1:
            raise ValueError(f"cpu_utilization must be in (0, 1], got {self.cpu_utilization}")
        if not self.peak_to_average >= 1:
            raise ValueError(f"peak_to_average must be >= 1, got {self.peak_to_average}")
        if not self.hnsw_m >= 2:
            raise ValueError(
                "hnsw_m must be >= 2 (a node reaches HNSW level l with probability M^-l: at 1 "
                f"every node would reach every level), got {self.hnsw_m}"
            )
