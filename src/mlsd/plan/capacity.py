"""Step 1: requirements → capacity plan, from measured costs rather than rules of thumb.

The back-of-the-envelope of a system design interview (peak requests per second, cores,
replicas, the batch job's hours, the key-value store's and the vector indexes' memory), made
executable: the traffic comes from :class:`~mlsd.plan.requirements.Requirements` (``[plan]``
in the system's TOML), and every cost per request, per user and per item is either measured or
computed from the exact formats mlsd writes:

- CPU per online and per precomputed request, and per batch-predicted user: a run of
  ``bench/serving.py`` (:meth:`Measured.from_serving_bench`), the service replicas apart from
  Redis and the balancer, at the catalog size and on the machine of that run;
- bytes of a precomputed list: :func:`mlsd.serving.precomputed.encode` itself, plus
  :data:`REDIS_KEY_OVERHEAD_BYTES` (measured on redis-server 7; a test checks it against a
  live server);
- bytes of a vector index per item: Faiss's layouts (a test checks them against serialized
  indexes), for each source that serves from one;
- bytes of a user's and an item's online features in Redis: measured by the same run, through
  Feast on a live server (:mod:`mlsd.features.footprint`).

What the measurement does not cover is said, not guessed: a plan for a catalog far from the
measured one, for more load on a replica than was measured, or over the latency budget
carries a warning.

    plan = capacity_plan(Requirements(daily_active_users=2_000_000), measured)
    for line in plan.lines:
        print(line.name, line.value, line.unit, line.how)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlsd.config import SOURCE_SECTIONS
from mlsd.plan.requirements import Requirements
from mlsd.serving.index import FlatIndex, HNSWIndex, IVFIndex, choose_index, default_pq_m
from mlsd.serving.precomputed import encode

SECONDS_PER_DAY = 86_400.0

REDIS_KEY_OVERHEAD_BYTES = 180
"""Redis's memory per precomputed key beyond the value's bytes: the key string, the main and
the expires dict entries and the allocator's rounding. Measured: 20,000 keys
``mlsd:feed:top:<user>`` with a TTL and 1,241-byte values (format 2, before the sources)
raised redis-server 7's ``used_memory`` by 1,421 bytes a key."""

FAISS_ID_BYTES = 4
"""Faiss HNSW stores each neighbour link as an int32."""

IVF_ID_BYTES = 8
"""Faiss inverted lists store each item's id as an int64."""

CATALOG_DRIFT = 2.0
"""A plan for a catalog more than this many times larger or smaller than the measured one
warns that the CPU costs may not carry over (retrieval and the candidates scale with it)."""


@dataclass(frozen=True)
class VectorSource:
    """A candidate source that serves from a vector index.

    Attributes:
        dim: dimension of its item vectors.
        user_vectors: whether it keeps a vector per user in memory (ALS, BPR; the two-tower
            model computes the user's at request time).
    """

    dim: int
    user_vectors: bool = False


@dataclass(frozen=True)
class PathCost:
    """One request path as measured.

    Attributes:
        service_cpu_ms: CPU of the service replicas per request.
        redis_cpu_ms, balancer_cpu_ms: CPU of Redis and of the balancer per request.
        p99_ms: the client's p99 at ``rps``.
        rps: requests per second served in the measured window.
        stages: stage → (p50, p99) ms inside the service (features, retrieval, ..., total);
            empty when the run did not report them.
    """

    service_cpu_ms: float
    p99_ms: float
    rps: float
    redis_cpu_ms: float = 0.0
    balancer_cpu_ms: float = 0.0
    stages: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Measured:
    """Costs measured by one run of ``bench/serving.py``.

    Attributes:
        online: the online path (features, retrieval, ranking per request).
        precomputed: the offline path's reads.
        batch_cpu_ms_per_user: CPU a batch-predicted user costs the batch job (Redis's share
            of the writes apart).
        replicas: service processes of the run (the measured rate was spread over them).
        cpus: cores of the machine.
        catalog_items: the catalog of the run (``None``: not recorded).
        arrivals: how the run's requests arrived (``uniform`` or ``poisson``).
        source: where the figures come from (a file, a commit).
        feature_bytes: Redis ``used_memory`` per user and per item of the online feature
            store, written through Feast (:mod:`mlsd.features.footprint`; ``None``: the run
            predates the measurement).
    """

    online: PathCost
    precomputed: PathCost
    batch_cpu_ms_per_user: float
    replicas: int
    cpus: int
    catalog_items: int | None
    source: str
    arrivals: str = "uniform"
    feature_bytes: tuple[float, float] | None = None

    @classmethod
    def from_serving_bench(cls, report: Mapping[str, Any], source: str) -> Measured:
        """Read ``bench/serving.py``'s JSON; a missing or malformed field is an error naming
        it and ``source``.

        CPU per request: each process's CPU seconds over the requests answered in the same
        span (warm-up included) when the run recorded them, else its cores over the measured
        window's requests per second (older runs; their cores are over the load worker's
        whole life, its start-up included, so the figure is a few per cent low)."""
        get = _getter(report, source)

        def path(name: str) -> PathCost:
            rps = get(name, "achieved_rps", kind=float)
            if rps <= 0:
                raise ValueError(f"{source}: {name}.achieved_rps is {rps}; nothing was served")
            p99 = get(name, "latency_ms", "p99", kind=float)
            if "cpu_seconds" in report[name] and "answered" in report[name]:
                answered = get(name, "answered", kind=int)
                used = _numbers(
                    get(name, "cpu_seconds", kind=dict), f"{source}: {name}.cpu_seconds"
                )
                per = {k: v / max(answered, 1) * 1000 for k, v in used.items()}
            else:
                cores = _numbers(get(name, "cpu_cores", kind=dict), f"{source}: {name}.cpu_cores")
                per = {k: v / rps * 1000 for k, v in cores.items()}
            stages = {
                stage: (float(ms["p50"]), float(ms["p99"]))
                for stage, ms in report[name].get("stage_ms", {}).items()
                if isinstance(ms, Mapping)
                and ms.get("p50") is not None
                and ms.get("p99") is not None
            }
            return PathCost(
                service_cpu_ms=_needed(per, "server", f"{source}: {name} CPU"),
                p99_ms=p99,
                rps=rps,
                redis_cpu_ms=per.get("redis", 0.0),
                balancer_cpu_ms=per.get("balancer", 0.0),
                stages=stages,
            )

        world = report.get("world")
        items = world.get("items") if isinstance(world, Mapping) else None
        load = report.get("load")
        arrivals = load.get("arrivals", "uniform") if isinstance(load, Mapping) else "uniform"
        feature_bytes = None
        if "feature_store" in report:
            feature_bytes = (
                get("feature_store", "bytes_per_user", kind=float),
                get("feature_store", "bytes_per_item", kind=float),
            )
        return cls(
            online=path("online"),
            precomputed=path("precomputed"),
            batch_cpu_ms_per_user=get("batch_predict", "cpu_ms_per_user", kind=float),
            replicas=get("service", "replicas", kind=int),
            cpus=get("machine", "cpus", kind=int),
            catalog_items=int(items) if isinstance(items, int) else None,
            source=source,
            arrivals=str(arrivals),
            feature_bytes=feature_bytes,
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


def _getter(report: Mapping[str, Any], source: str) -> Callable[..., Any]:
    """``get(*keys, kind=T)``: the value at ``keys``, checked to be a ``T``."""

    def get(*keys: str, kind: type) -> Any:
        value: Any = report
        for i, key in enumerate(keys):
            if not isinstance(value, Mapping) or key not in value:
                raise ValueError(
                    f"{source}: no {'.'.join(keys[: i + 1])}; expected the JSON that "
                    "bench/serving.py prints (run it with its online and precomputed phases)"
                )
            value = value[key]
        where = ".".join(keys)
        if value is None:
            raise ValueError(
                f"{source}: {where} is null: the run had requests without an answer "
                "(re-run it at a rate the service keeps up with)"
            )
        if kind is dict:
            if not isinstance(value, Mapping):
                raise ValueError(f"{source}: {where} should be an object, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{source}: {where} should be a number, got {value!r}")
        return kind(value)

    return get


def _numbers(values: Mapping[str, Any], where: str) -> dict[str, float]:
    """``values`` as floats; a value that is not a number is an error naming its key."""
    bad = {k: v for k, v in values.items() if isinstance(v, bool) or not isinstance(v, int | float)}
    if bad:
        raise ValueError(f"{where}: not numbers: {bad}")
    return {k: float(v) for k, v in values.items()}


def _needed(values: Mapping[str, float], key: str, where: str) -> float:
    if key not in values:
        raise ValueError(f"{where}: no {key!r} process among {sorted(values)}")
    return values[key]


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


def precomputed_value_bytes(
    list_length: int, model_version_chars: int, source_names: Sequence[str] = ()
) -> int:
    """Bytes of one user's precomputed value, as :func:`~mlsd.serving.precomputed.encode`
    writes it, with each item's source among ``source_names``."""
    value = encode(
        np.zeros(list_length, dtype=np.int64),
        np.zeros(list_length, dtype=np.float32),
        model_version="v" * model_version_chars,
        computed_at=0.0,
        sources=np.zeros(list_length, dtype=np.int64) if source_names else None,
        source_names=tuple(source_names),
    )
    return len(value)


INDEX_KINDS: dict[type, str] = {FlatIndex: "flat", HNSWIndex: "hnsw", IVFIndex: "ivfpq"}


def index_kind(index: str, catalog_items: int) -> str:
    """The index serving builds: ``index``, or for ``auto`` the one
    :func:`~mlsd.serving.index.choose_index` picks for the catalog."""
    if index != "auto":
        return index
    return INDEX_KINDS[type(choose_index(catalog_items, 64))]  # by size; dim is not asked


def index_bytes_per_item(index: str, dim: int, hnsw_m: int) -> int:
    """Memory of one item in a vector index: its float32 vector; for HNSW also its layer-0
    links (``2 * M`` int32; the upper layers hold about ``1 / M`` of the nodes); for IVF-PQ as
    serving builds it, the PQ code (``dim / 4`` bytes), its int64 id and the full vector kept
    for exact re-scoring."""
    vector = 4 * dim
    if index == "flat":
        return vector
    if index == "hnsw":
        return vector + 2 * hnsw_m * FAISS_ID_BYTES
    if index == "ivfpq":
        return vector + default_pq_m(dim) + IVF_ID_BYTES
    raise ValueError(f"index must be 'flat', 'hnsw' or 'ivfpq', got {index!r}")


DEFAULT_SOURCES = {"item vectors": VectorSource(64)}


class _Lines:
    """The plan being written: lines in order and warnings."""

    def __init__(self) -> None:
        self.lines: list[PlanLine] = []
        self.warnings: list[str] = []

    def add(self, name: str, value: float, unit: str, how: str) -> float:
        self.lines.append(PlanLine(name, value, unit, how))
        return value


def capacity_plan(
    req: Requirements,
    measured: Measured | None = None,
    *,
    sources: Mapping[str, VectorSource] | None = None,
    source_names: Sequence[str] | None = None,
) -> CapacityPlan:
    """The plan for ``req``: traffic, memory, and with ``measured`` the cores, replicas, the
    batch run and the latency budget (without it those are left out, and a warning says so).

    Args:
        req: the requirements.
        measured: costs from a ``bench/serving.py`` run.
        sources: name → the vector-index sources the system serves (default: one of
            dimension 64); ``mlsd plan capacity`` reads them from ``[retrieval]``.
        source_names: every candidate source, whose names each precomputed value holds
            (default: all the feed's; ``mlsd plan capacity``: ``[retrieval].sources``).
    """
    out = _Lines()
    online_rps, precomputed_rps = _traffic(req, out)
    names = tuple(SOURCE_SECTIONS) if source_names is None else tuple(source_names)
    _memory(req, sources if sources is not None else DEFAULT_SOURCES, names, out)
    _feature_store(req, measured, out)
    if measured is None:
        out.warnings.append(
            "no measured costs: cores, replicas, the batch run, latency and the online feature "
            "store's memory need a run of bench/serving.py (--measured FILE)"
        )
    else:
        _compute(req, measured, online_rps, precomputed_rps, out)
        _latency(req, measured, out)
    return CapacityPlan(req, measured, out.lines, out.warnings)


def _traffic(req: Requirements, out: _Lines) -> tuple[float, float]:
    mean = out.add(
        "mean requests/s",
        req.daily_active_users * req.requests_per_user_per_day / SECONDS_PER_DAY,
        "requests/s",
        f"{req.daily_active_users:,} users x {req.requests_per_user_per_day:g} a day / 86,400 s",
    )
    peak = out.add(
        "peak requests/s",
        mean * req.peak_to_average,
        "requests/s",
        f"mean x {req.peak_to_average:g}",
    )
    online = out.add(
        "peak online requests/s",
        peak * (1 - req.precomputed_share),
        "requests/s",
        f"peak x {1 - req.precomputed_share:g} (not precomputed)",
    )
    precomputed = out.add(
        "peak precomputed requests/s",
        peak * req.precomputed_share,
        "requests/s",
        f"peak x {req.precomputed_share:g}",
    )
    return online, precomputed


def _memory(
    req: Requirements,
    sources: Mapping[str, VectorSource],
    source_names: Sequence[str],
    out: _Lines,
) -> None:
    value = precomputed_value_bytes(req.list_length, req.model_version_chars, source_names)
    out.add(
        "precomputed store",
        req.users * (value + REDIS_KEY_OVERHEAD_BYTES) / 1e9,
        "GB",
        f"{req.users:,} users x ({value:,} B value + {REDIS_KEY_OVERHEAD_BYTES} B Redis's per "
        f"key), {req.list_length} items a list; Redis's used_memory: provision more for "
        "fragmentation and a save's copy-on-write",
    )
    kind = index_kind(req.index, req.catalog_items)
    total = 0.0
    for name, source in sources.items():
        per_item = index_bytes_per_item(kind, source.dim, req.hnsw_m)
        total += out.add(
            f"{name} index",
            req.catalog_items * per_item / 1e9,
            "GB",
            f"{req.catalog_items:,} items x {per_item} B ({kind}, dimension {source.dim}"
            f"{f', M {req.hnsw_m}' if kind == 'hnsw' else ''})"
            + (
                "; a norm-tiered exact index instead if the export measures it cheaper: "
                f"{4 * source.dim} B an item"
                if source.user_vectors and kind != "flat"
                else ""
            ),
        )
        if source.user_vectors:
            total += out.add(
                f"{name} user vectors",
                req.users * 4 * source.dim / 1e9,
                "GB",
                f"{req.users:,} users x {4 * source.dim} B (float32, dimension {source.dim})",
            )
    out.add(
        "vectors per replica",
        total,
        "GB",
        f"the indexes and user vectors of {len(sources)} source(s), in every replica",
    )


def _feature_store(req: Requirements, measured: Measured | None, out: _Lines) -> None:
    if measured is None:
        return  # the plan's warning about missing measurements covers it
    if measured.feature_bytes is None:
        out.warnings.append(
            f"{measured.source} has no feature_store figures (a bench/serving.py run from "
            "before they were measured): the online feature store's memory is left out"
        )
        return
    per_user, per_item = measured.feature_bytes
    out.add(
        "online feature store",
        (req.users * per_user + req.catalog_items * per_item) / 1e9,
        "GB",
        f"{req.users:,} users x {per_user:,.0f} B + {req.catalog_items:,} items x "
        f"{per_item:,.0f} B (Redis's used_memory per entity, measured through Feast; a "
        "user's grows with the recent items it keeps)",
    )


def _compute(
    req: Requirements,
    measured: Measured,
    online_rps: float,
    precomputed_rps: float,
    out: _Lines,
) -> None:
    online, pre = measured.online, measured.precomputed

    def busy_at_peak(online_ms: float, precomputed_ms: float) -> float:
        """Cores kept busy at peak by a process costing these ms a request on each path."""
        return (online_rps * online_ms + precomputed_rps * precomputed_ms) / 1000.0

    busy = busy_at_peak(online.service_cpu_ms, pre.service_cpu_ms)
    cores = out.add(
        "service cores at peak",
        busy / req.cpu_utilization,
        "cores",
        f"({online_rps:,.0f}/s x {online.service_cpu_ms:.2f} ms online + {precomputed_rps:,.0f}"
        f"/s x {pre.service_cpu_ms:.2f} ms precomputed) / {req.cpu_utilization:g} utilisation",
    )
    replicas = out.add(
        "service replicas",
        max(
            req.min_replicas,
            math.ceil(cores / req.cores_per_replica),
            math.ceil(busy / req.cores_per_replica) + 1,
        ),
        "replicas",
        f"cores / {req.cores_per_replica:g} a replica; one more than the peak's busy cores "
        f"need, so a lost replica leaves enough; at least {req.min_replicas}",
    )
    for name, online_ms, pre_ms in (
        ("Redis", online.redis_cpu_ms, pre.redis_cpu_ms),
        ("balancer", online.balancer_cpu_ms, pre.balancer_cpu_ms),
    ):
        out.add(
            f"{name} cores at peak",
            busy_at_peak(online_ms, pre_ms) / req.cpu_utilization,
            "cores",
            f"{online_ms:.3f} ms online, {pre_ms:.3f} ms precomputed a request",
        )
    cpu_hours = out.add(
        "batch run CPU",
        req.users * measured.batch_cpu_ms_per_user / 1000.0 / 3600.0,
        "core-hours",
        f"{req.users:,} users x {measured.batch_cpu_ms_per_user:.2f} ms (Redis's writes apart)",
    )
    out.add(
        "batch cores",
        math.ceil(cpu_hours / req.batch_window_hours),
        "cores",
        f"core-hours / {req.batch_window_hours:g} h window",
    )
    planned = busy / replicas
    phases = {"online": online, "precomputed": pre}
    loads = {k: c.rps * c.service_cpu_ms / 1000.0 / measured.replicas for k, c in phases.items()}
    heaviest = max(loads, key=loads.__getitem__)
    if planned > loads[heaviest]:
        out.warnings.append(
            f"each replica would be busy {planned:.2f} of a core at peak, more than the "
            f"{loads[heaviest]:.2f} the run measured one at (its {heaviest} phase): the p99 at "
            "that load is not measured"
        )
    _catalog_warning(req, measured, out)


def _catalog_warning(req: Requirements, measured: Measured, out: _Lines) -> None:
    if measured.catalog_items is None:
        out.warnings.append(f"{measured.source}: the measured catalog size is not recorded")
    elif not 1 / CATALOG_DRIFT <= req.catalog_items / measured.catalog_items <= CATALOG_DRIFT:
        out.warnings.append(
            f"CPU costs were measured at {measured.catalog_items:,} items; the plan's "
            f"{req.catalog_items:,} may cost differently (retrieval and candidates scale "
            "with the catalog)"
        )


def _latency(req: Requirements, measured: Measured, out: _Lines) -> None:
    budget = req.latency_budget_ms
    for name, cost in (("online", measured.online), ("precomputed", measured.precomputed)):
        out.add(
            f"{name} p99 measured",
            cost.p99_ms,
            "ms",
            f"at {cost.rps:g} requests/s over {measured.replicas} replica(s) on "
            f"{measured.cpus} cores, {measured.arrivals} arrivals; budget {budget:g} ms",
        )
        if cost.p99_ms > budget:
            out.warnings.append(
                f"the measured {name} p99 ({cost.p99_ms:.1f} ms) is over the {budget:g} ms "
                "budget before any network between services"
            )
    for stage, (p50, p99) in measured.online.stages.items():
        out.add(
            f"online stage {stage} p99",
            p99,
            "ms",
            f"p50 {p50:.2f} ms; {p99 / budget:.1%} of the budget, in the service",
        )
