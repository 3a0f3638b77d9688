"""Step 1: requirements → capacity plan, from measured costs rather than rules of thumb.

The back-of-the-envelope of a system design interview (peak requests per second, cores,
replicas, the batch job's hours, the key-value store's and the vector index's memory), made
executable: the traffic comes from :class:`Requirements` (``[plan]`` in the system's TOML), and
every cost per request, per user and per item is either measured or computed from the exact
formats mlsd writes:

- CPU per online and per precomputed request, and per batch-predicted user: a run of
  ``bench/serving.py`` (:meth:`Measured.from_serving_bench`), service, balancer and Redis
  together, at the catalog size and on the machine of that run;
- bytes of a precomputed list: :func:`mlsd.serving.precomputed.encode` itself, plus
  :data:`REDIS_KEY_OVERHEAD_BYTES` (measured on redis-server 7; a test checks it against a
  live server);
- bytes of the vector index per item: Faiss's layout (``tests/plan`` checks it against a
  serialized index).

What the measurement does not cover is said, not guessed: a plan for a catalog far from the
measured one, or for more requests per replica than were measured, carries a warning.

    plan = capacity_plan(Requirements(daily_active_users=2_000_000), measured)
    for line in plan.lines:
        print(line.name, line.value, line.unit, line.how)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlsd.plan.requirements import Requirements
from mlsd.serving.precomputed import encode

SECONDS_PER_DAY = 86_400.0

REDIS_KEY_OVERHEAD_BYTES = 180
"""Redis's memory per precomputed key beyond the value's bytes: the key string, the main and
the expires dict entries and the allocator's rounding. Measured: 20,000 keys
``mlsd:feed:top:<user>`` with a TTL and 1,241-byte values raised redis-server 7's
``used_memory`` by 1,421 bytes a key."""

FAISS_ID_BYTES = 4
"""Faiss HNSW stores each neighbour link as an int32."""

CATALOG_DRIFT = 2.0
"""A plan for a catalog more than this many times larger or smaller than the measured one
warns that the CPU costs may not carry over (retrieval and the candidates scale with it)."""


@dataclass(frozen=True)
class PathCost:
    """One request path as measured: CPU per request and the latency at the measured rate.

    Attributes:
        stages: stage → (p50, p99) ms inside the service (features, retrieval, ..., total);
            empty when the run did not report them.
    """

    cpu_ms: float
    p99_ms: float
    rps: float
    stages: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Measured:
    """Costs measured by one run of ``bench/serving.py``.

    Attributes:
        online: the online path (features, retrieval, ranking per request).
        precomputed: the offline path's reads.
        batch_cpu_ms_per_user: CPU a batch-predicted user costs.
        replicas: service processes of the run (the measured rate was spread over them).
        cpus: cores of the machine.
        catalog_items: the catalog of the run (``None``: not recorded).
        source: where the figures come from (a file, a commit).
    """

    online: PathCost
    precomputed: PathCost
    batch_cpu_ms_per_user: float
    replicas: int
    cpus: int
    catalog_items: int | None
    source: str

    @classmethod
    def from_serving_bench(cls, report: Mapping[str, Any], source: str) -> Measured:
        """Read ``bench/serving.py``'s JSON. A path's CPU per request is the cores its
        service, balancer and Redis used over the requests per second they served (the load
        generator apart); a missing field is an error naming it and ``source``."""

        def get(*keys: str) -> Any:
            value: Any = report
            for i, key in enumerate(keys):
                if not isinstance(value, Mapping) or key not in value:
                    raise ValueError(
                        f"{source}: no {'.'.join(keys[: i + 1])}; expected the JSON that "
                        "bench/serving.py prints (run it with its online and precomputed phases)"
                    )
                value = value[key]
            return value

        def path(name: str) -> PathCost:
            cores = get(name, "cpu_cores")
            rps = float(get(name, "achieved_rps"))
            if rps <= 0:
                raise ValueError(f"{source}: {name}.achieved_rps is {rps}; nothing was served")
            used = sum(float(v) for k, v in cores.items() if k != "load_generator")
            stages = {
                stage: (float(ms["p50"]), float(ms["p99"]))
                for stage, ms in report[name].get("stage_ms", {}).items()
                if isinstance(ms, Mapping) and "p50" in ms and "p99" in ms
            }
            p99 = float(get(name, "latency_ms", "p99"))
            return PathCost(used / rps * 1000.0, p99, rps, stages)

        world = report.get("world")
        items = world.get("items") if isinstance(world, Mapping) else None
        return cls(
            online=path("online"),
            precomputed=path("precomputed"),
            batch_cpu_ms_per_user=float(get("batch_predict", "cpu_ms_per_user")),
            replicas=int(get("service", "replicas")),
            cpus=int(get("machine", "cpus")),
            catalog_items=int(items) if items is not None else None,
            source=source,
        )

    @classmethod
    def from_file(cls, path: Path) -> Measured:
        """:meth:`from_serving_bench` on a saved JSON file (``bench/serving.py --out``)."""
        try:
            report = json.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ValueError(f"{path}: file not found (bench/serving.py --out writes it)") from exc
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON ({exc})") from exc
        if not isinstance(report, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(report).__name__}")
        return cls.from_serving_bench(report, str(path))


@dataclass(frozen=True)
class PlanLine:
    """One quantity of the plan: its value, unit and how it was computed."""

    name: str
    value: float
    unit: str
    how: str


@dataclass(frozen=True)
class CapacityPlan:
    """The plan's quantities in order, and what the measurement leaves open."""

    requirements: Requirements
    measured: Measured | None
    lines: list[PlanLine]
    warnings: list[str] = field(default_factory=list)

    def value(self, name: str) -> float:
        """The value of the line called ``name``."""
        for line in self.lines:
            if line.name == name:
                return line.value
        raise KeyError(f"no plan line {name!r}; lines: {[line.name for line in self.lines]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "requirements": asdict(self.requirements),
            "measured": asdict(self.measured) if self.measured is not None else None,
            "lines": [asdict(line) for line in self.lines],
            "warnings": list(self.warnings),
        }


def precomputed_value_bytes(list_length: int, model_version_chars: int) -> int:
    """Bytes of one user's precomputed value, as :func:`~mlsd.serving.precomputed.encode`
    writes it."""
    value = encode(
        np.zeros(list_length, dtype=np.int64),
        np.zeros(list_length, dtype=np.float32),
        model_version="v" * model_version_chars,
        computed_at=0.0,
    )
    return len(value)


def index_bytes_per_item(index: str, dim: int, hnsw_m: int) -> int:
    """Memory of one item in the vector index: its float32 vector, and for HNSW its layer-0
    links (``2 * M`` int32; the upper layers hold about ``1 / M`` of the nodes and add
    little)."""
    vector = 4 * dim
    if index == "flat":
        return vector
    if index == "hnsw":
        return vector + 2 * hnsw_m * FAISS_ID_BYTES
    raise ValueError(f"index must be 'flat' or 'hnsw', got {index!r}")


def capacity_plan(req: Requirements, measured: Measured | None = None) -> CapacityPlan:
    """The plan for ``req``; without ``measured`` the lines that need CPU costs are left out
    and a warning says so."""
    lines: list[PlanLine] = []
    warnings: list[str] = []

    def add(name: str, value: float, unit: str, how: str) -> float:
        lines.append(PlanLine(name, value, unit, how))
        return value

    mean_rps = add(
        "mean requests/s",
        req.daily_active_users * req.requests_per_user_per_day / SECONDS_PER_DAY,
        "requests/s",
        f"{req.daily_active_users:,} users x {req.requests_per_user_per_day:g} a day / 86,400 s",
    )
    peak_rps = add(
        "peak requests/s",
        mean_rps * req.peak_to_average,
        "requests/s",
        f"mean x {req.peak_to_average:g} (peak to average)",
    )
    online_rps = add(
        "peak online requests/s",
        peak_rps * (1 - req.precomputed_share),
        "requests/s",
        f"peak x {1 - req.precomputed_share:g} (not precomputed)",
    )
    precomputed_rps = add(
        "peak precomputed requests/s",
        peak_rps * req.precomputed_share,
        "requests/s",
        f"peak x {req.precomputed_share:g}",
    )
    value_bytes = precomputed_value_bytes(req.list_length, req.model_version_chars)
    add(
        "precomputed store",
        req.users * (value_bytes + REDIS_KEY_OVERHEAD_BYTES) / 1e9,
        "GB",
        f"{req.users:,} users x ({value_bytes:,} B value + {REDIS_KEY_OVERHEAD_BYTES} B "
        f"Redis's per key), {req.list_length} items a list",
    )
    per_item = index_bytes_per_item(req.index, req.embedding_dim, req.hnsw_m)
    add(
        "vector index",
        req.catalog_items * per_item / 1e9,
        "GB",
        f"{req.catalog_items:,} items x {per_item} B ({req.index}, dimension "
        f"{req.embedding_dim}{f', M {req.hnsw_m}' if req.index == 'hnsw' else ''})",
    )
    if measured is None:
        warnings.append(
            "no measured costs: cores, replicas, the batch run and latency need a run of "
            "bench/serving.py (--measured FILE)"
        )
        return CapacityPlan(req, None, lines, warnings)

    online, pre = measured.online, measured.precomputed
    busy = (online_rps * online.cpu_ms + precomputed_rps * pre.cpu_ms) / 1000.0
    cores = add(
        "serving cores at peak",
        busy / req.cpu_utilization,
        "cores",
        f"({online_rps:,.0f}/s x {online.cpu_ms:.2f} ms online + {precomputed_rps:,.0f}/s x "
        f"{pre.cpu_ms:.2f} ms precomputed) / {req.cpu_utilization:g} utilisation",
    )
    replicas = add(
        "service replicas",
        max(req.min_replicas, math.ceil(cores / req.cores_per_replica)),
        "replicas",
        f"cores / {req.cores_per_replica:g} a replica, at least {req.min_replicas}",
    )
    cpu_hours = add(
        "batch run CPU",
        req.users * measured.batch_cpu_ms_per_user / 1000.0 / 3600.0,
        "core-hours",
        f"{req.users:,} users x {measured.batch_cpu_ms_per_user:.2f} ms",
    )
    add(
        "batch cores",
        math.ceil(cpu_hours / req.batch_window_hours),
        "cores",
        f"core-hours / {req.batch_window_hours:g} h window",
    )
    add(
        "online p99 measured",
        online.p99_ms,
        "ms",
        f"at {online.rps:g} requests/s over {measured.replicas} replica(s) on "
        f"{measured.cpus} cores; budget {req.latency_budget_ms:g} ms",
    )
    for stage, (p50, p99) in online.stages.items():
        add(
            f"online stage {stage} p99",
            p99,
            "ms",
            f"p50 {p50:.2f} ms; {p99 / req.latency_budget_ms:.1%} of the budget, in the service",
        )
    if online.p99_ms > req.latency_budget_ms:
        warnings.append(
            f"the measured online p99 ({online.p99_ms:.1f} ms) is over the "
            f"{req.latency_budget_ms:g} ms budget before any network between services"
        )
    per_replica = online_rps / replicas
    measured_per_replica = online.rps / measured.replicas
    if per_replica > measured_per_replica:
        warnings.append(
            f"each replica would take {per_replica:,.0f} online requests/s at peak, more than "
            f"the {measured_per_replica:,.0f} measured: the p99 at that load is not measured"
        )
    if measured.catalog_items is None:
        warnings.append(f"{measured.source}: the measured catalog size is not recorded")
    elif not (1 / CATALOG_DRIFT <= req.catalog_items / measured.catalog_items <= CATALOG_DRIFT):
        warnings.append(
            f"CPU costs were measured at {measured.catalog_items:,} items; the plan's "
            f"{req.catalog_items:,} may cost differently (retrieval and candidates scale "
            "with the catalog)"
        )
    return CapacityPlan(req, measured, lines, warnings)
