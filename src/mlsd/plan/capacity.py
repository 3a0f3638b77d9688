"""Step 1: requirements → capacity plan, from measured costs rather than rules of thumb.

The back-of-the-envelope of a system design interview (peak requests per second, cores,
replicas, the batch job's hours, the key-value store's and the vector indexes' memory), made
executable: the traffic comes from :class:`~mlsd.plan.requirements.Requirements` (``[plan]``
in the system's TOML), and every cost per request, per user and per item is either measured or
computed from the exact formats mlsd writes:

- CPU per online and per precomputed request, and per batch-predicted user: a run of
  ``bench/serving.py`` (:meth:`Measured.from_serving_bench`), the service replicas apart from
  Redis and the balancer, at the catalog size and on the machine of that run;
- bytes of a precomputed list in Redis: :func:`mlsd.serving.precomputed.encode`'s value and
  the key, each rounded up to jemalloc's size class as Redis allocates them, plus
  :data:`REDIS_KEY_ENTRY_BYTES` of Redis's dicts (:func:`redis_bytes_per_key`; fitted on
  redis-server 7.0, and a test checks it against a live server at several list lengths), for
  each of the ``precomputed_versions`` whose lists Redis holds at once;
- bytes of each candidate source in every replica, from what its serving artifact holds once
  loaded (:mod:`mlsd.serving.sources`; a test loads exported artifacts and counts their
  arrays): a vector index per source that serves from one (Faiss's layouts, which a test
  checks against serialized indexes) and its user vectors; EASE's dense item x item weights,
  co-visitation's neighbour table, the popularity lists. What depends on the data rather than
  on the config (segment popularity's tables) is a warning, not a guess;
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

import inspect
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlsd.config import SOURCE_SECTIONS
from mlsd.plan.pipeline import Pipeline, pipeline_warnings
from mlsd.plan.requirements import Requirements
from mlsd.serving.index import (
    FlatIndex,
    HNSWConfig,
    HNSWIndex,
    IVFIndex,
    choose_index,
    default_pq_m,
)
from mlsd.serving.precomputed import MAX_CONSUMED, PrecomputedStore, encode

SECONDS_PER_DAY = 86_400.0

REDIS_KEY_ENTRY_BYTES = 97
"""Redis's memory per key besides the key's and the value's allocations
(:func:`redis_bytes_per_key`): an entry in the main dict and one in the expires dict (24 bytes
each, 32 as allocated) and their bucket tables (a power of two of 8-byte pointers each: 8 to 16
bytes a key, 13 at 61% full); the ~7 bytes left match a dict's previous bucket table, kept until
Redis's incremental rehash finishes. Fitted on redis-server 7.0.15 (jemalloc 5.3): 5,000 keys
written by :class:`~mlsd.serving.precomputed.PrecomputedStore` (and 20,000), lists of 1 to
2,000 items, model versions of 1, 17 and 40 characters: the model is within 0.1% of
``used_memory`` in 39 of 42 runs, 1.6% at worst (1-item lists); the 180 bytes per key it
replaces, measured at one value size, were 18% under at 150 items and 11% over at 1."""

CONSUMED_KEY_BYTES_AT_WORST = 8_700
"""Redis ``used_memory`` of one user's consumed-items key at its cap (:data:`~mlsd.serving.
precomputed.MAX_CONSUMED` int64 ids, 8,000 B), rounded up: 500 users each writing 1 to 1,100
events one at a time through :meth:`~mlsd.serving.precomputed.PrecomputedStore.note_consumed`
on redis-server 7.0.15 took 8,592 B a user from 513 events on (APPEND over-allocates a growing
string: 4,104 B took an 8 KiB allocation) and 8,690 B past the cap."""

REDIS_EMBSTR_MAX = 44
"""Redis keeps a string value of up to this many bytes in one allocation with its object
header (``OBJ_ENCODING_EMBSTR_SIZE_LIMIT``); a longer one gets an allocation of its own."""

REDIS_OBJECT_BYTES = 16
"""Redis's object header (``robj``) of a value."""

FAISS_ID_BYTES = 4
"""Faiss HNSW stores each neighbour link as an int32."""

HNSW_OFFSET_BYTES = 8
"""Faiss HNSW's ``offsets``: an int64 per node, where its links start."""

HNSW_LEVEL_BYTES = 4
"""Faiss HNSW's ``levels``: an int32 per node, the levels it reaches."""

IVF_ID_BYTES = 8
"""Faiss inverted lists store each item's id as an int64."""

CATALOG_DRIFT = 2.0
"""A plan for a catalog more than this many times larger or smaller than the measured one
warns that the CPU costs may not carry over (retrieval and the candidates scale with it)."""


ID_BYTES = 8
"""An item or user id as serving holds it: int64."""

RANKED_ITEM_BYTES = 12
"""An item of a ranked list (the popularity list, each source's fallback): int64 id + float32
score."""

SEGMENT_LIST_ITEMS = 2_000
"""Items of each attribute profile's segment popularity list: ``SEGMENT_TOP_N`` of
:mod:`mlsd.serving.sources` (not imported, as that imports torch; a test checks they agree)."""

SEGMENT_ROWS_EXAMPLE = 45
"""Rows of segment popularity's tables for ML-100K's segment columns (age bucket, gender,
occupation, region), the example its warning quotes."""


@dataclass(frozen=True)
class Sized:
    """One part of a source's memory in every replica: its plan line's name, bytes, how."""

    name: str
    bytes: float
    how: str


@dataclass(frozen=True)
class VectorSource:
    """A candidate source that serves from a vector index (ALS, BPR, the two-tower model).

    Attributes:
        dim: dimension of its item vectors.
        user_vectors: whether it keeps a vector per user in memory (ALS, BPR; the two-tower
            model computes the user's at request time).
        fold_in: whether it keeps the item factors a second time, beside the index, to fold
            in users it has no vector for (ALS).
        history_embeddings: whether its user tower embeds the history's items, a table of
            ``(items + 1) x dim`` float32 (the two-tower model).
        item_bias: whether its vectors carry one dimension more than ``dim``, an item bias
            (BPR: ``implicit`` appends it to the item factors, a column of ones to the user's).
    """

    dim: int
    user_vectors: bool = False
    fold_in: bool = False
    history_embeddings: bool = False
    item_bias: bool = False

    @property
    def stored_dim(self) -> int:
        """The dimension of the vectors as stored."""
        return self.dim + self.item_bias

    def sized(self, name: str, req: Requirements) -> tuple[list[Sized], list[str]]:
        """The index (Faiss's layout and the int64 id map beside it), the user vectors and
        ids, and the per-item arrays serving holds besides the index (``FactorSource``,
        ``TwoTowerSource``): the fallback list, and the fold-in's or the tower's tables."""
        items, dim, kind = (
            req.catalog_items,
            self.stored_dim,
            index_kind(req.index, req.catalog_items),
        )
        per_item = index_bytes_per_item(kind, dim, req.hnsw_m) + ID_BYTES
        dimension = f"dimension {self.dim}" + (" + an item bias" if self.item_bias else "")
        tiered = (
            "; a norm-tiered exact index instead if the export measures it cheaper: "
            f"{4 * dim + 2 * ID_BYTES} B an item (float32 vector, int64 id, float64 norm)"
        )
        graph = ""
        if kind == "hnsw":
            m = req.hnsw_m
            graph = (
                f", M {m}: {4 * dim} B float32 vector, {2 * m} int32 layer-0 links, "
                f"{FAISS_ID_BYTES * m / (m - 1):.1f} B of upper-layer links expected (a node "
                "reaches level l with probability M^-l), an int64 offset and an int32 level"
            )
        shown = f"{per_item:,.1f}".removesuffix(".0")
        parts = [
            Sized(
                f"{name} index",
                items * per_item,
                f"{items:,} items x {shown} B ({kind}, {dimension}{graph}; an int64 id map)"
                + (tiered if self.user_vectors and kind != "flat" else ""),
            )
        ]
        if self.user_vectors:
            per_user = 4 * dim + ID_BYTES
            parts.append(
                Sized(
                    f"{name} user vectors",
                    req.users * per_user,
                    f"{req.users:,} users x {per_user} B (float32, {dimension}; int64 id)",
                )
            )
        per_item, what, once = RANKED_ITEM_BYTES, ["the fallback list (12 B)"], 0
        if self.fold_in:
            per_item += 4 * dim + ID_BYTES + 1
            what.append(
                f"the item factors again for folding in unknown users ({4 * dim} B float32, "
                "an int64 id, a 1 B mask)"
            )
        if self.history_embeddings:
            per_item, once = per_item + 4 * dim + ID_BYTES, 4 * dim
            what.append(
                f"the user tower's history embeddings ({4 * dim} B float32, one row more for "
                "padding) and an int64 id"
            )
        parts.append(
            Sized(
                f"{name} item arrays",
                items * per_item + once,
                f"{items:,} items x {per_item} B: {', '.join(what)}",
            )
        )
        return parts, []


@dataclass(frozen=True)
class PopularityList:
    """The popularity source: one ranked list of the catalog (``PopularSource``)."""

    def sized(self, name: str, req: Requirements) -> tuple[list[Sized], list[str]]:
        items = req.catalog_items
        how = f"{items:,} items x {RANKED_ITEM_BYTES} B (int64 id + float32 score, best first)"
        return [Sized(f"{name} list", items * RANKED_ITEM_BYTES, how)], []


@dataclass(frozen=True)
class SegmentLists:
    """Segment popularity (``SegmentPopularSource``): what the config sizes, the catalog's ids
    and its fallback list; its per-column score tables and its attribute profiles' lists grow
    with the users' attributes, which ``[plan]`` does not give, so they are a warning."""

    def sized(self, name: str, req: Requirements) -> tuple[list[Sized], list[str]]:
        items = req.catalog_items
        per_item = ID_BYTES + RANKED_ITEM_BYTES
        line = Sized(
            f"{name} lists",
            items * per_item,
            f"{items:,} items x {per_item} B (int64 ids, the fallback list); its score tables "
            "and profile lists are not counted (see the warnings)",
        )
        tables = SEGMENT_ROWS_EXAMPLE * items * 4 / 1e9
        warning = (
            f"{name}: its score tables (a float32 row of the {items:,} items for each level of "
            "each segment column, plus one per column: ML-100K's age bucket, gender, "
            f"occupation and region make {SEGMENT_ROWS_EXAMPLE} rows, {tables:.2f} GB) and its "
            f"attribute profiles' lists ({min(SEGMENT_LIST_ITEMS, items):,} items x "
            f"{RANKED_ITEM_BYTES} B each) depend on the users' attributes, which [plan] does "
            "not give: they are not in the memory per replica. An export's segments.npz holds "
            "them (tables, top_ids and top_scores): add their bytes"
        )
        return [line], [warning]


def csr_index_bytes(items: int, entries: int) -> int:
    """Bytes of a column index and a row start of scipy's CSR: int32, int64 from 2**31."""
    return 4 if max(entries, items) < 2**31 else 8


def covisitation_bytes(items: int, entries: int) -> int:
    """Memory of a loaded co-visitation source (``CovisitationSource``) with ``entries``
    co-visited pairs: the CSR table (a float32 weight and a column an entry, a row start an
    item), the item ids, and two ranked lists of the catalog (the fallback, and its backfill
    form)."""
    index = csr_index_bytes(items, entries)
    return entries * (4 + index) + (items + 1) * index + items * (ID_BYTES + 2 * RANKED_ITEM_BYTES)


@dataclass(frozen=True)
class CovisitationTable:
    """Co-visitation: each item's strongest co-visited items (``max_neighbours``; ``None``:
    all, which the plan cannot size)."""

    max_neighbours: int | None

    def sized(self, name: str, req: Requirements) -> tuple[list[Sized], list[str]]:
        items = req.catalog_items
        if self.max_neighbours is None:
            bound = covisitation_bytes(items, items * 200) / 1e9
            return [], [
                f"[retrieval.{name}] max_neighbours is not set: every co-visited pair is kept, "
                "so the plan cannot size its table and leaves it out of the memory per "
                f"replica; set max_neighbours (200: at most {bound:.2f} GB at {items:,} items)"
            ]
        entries = items * self.max_neighbours
        index = csr_index_bytes(items, entries)
        per_item = index + ID_BYTES + 2 * RANKED_ITEM_BYTES
        how = (
            f"at most {items:,} items x {self.max_neighbours} neighbours x {4 + index} B "
            f"(float32 weight + int{8 * index} item), + {per_item} B an item (its row's start, "
            "its id, the fallback and backfill lists); items co-visited with fewer keep fewer"
        )
        return [Sized(f"{name} neighbours", covisitation_bytes(items, entries), how)], []


def ease_bytes(items: int, active: int) -> int:
    """Memory of a loaded EASE source (``EASESource``) over ``active`` items with training
    events: the dense float32 weights ``B`` (``active²``), the active items' positions, and
    per catalog item its id, its position among the active ones and the fallback list."""
    return 4 * active**2 + ID_BYTES * active + items * (2 * ID_BYTES + RANKED_ITEM_BYTES)


@dataclass(frozen=True)
class EASEWeights:
    """EASE: a dense item x item matrix over at most ``max_items`` items with training events
    (``EASERetriever`` refuses to fit above)."""

    max_items: int

    def builds_at(self, catalog_items: int) -> bool:
        """Whether EASE fits a catalog this size (as configured, not above ``max_items``)."""
        return catalog_items <= self.max_items

    def sized(self, name: str, req: Requirements) -> tuple[list[Sized], list[str]]:
        items = req.catalog_items
        active = min(items, self.max_items)
        how = (
            f"{active:,}² x 4 B (float32 item x item weights over min(catalog, max_items) "
            f"items) + {items:,} items x {2 * ID_BYTES + RANKED_ITEM_BYTES} B (ids, positions, "
            "the fallback list)"
        )
        warnings = []
        if not self.builds_at(items):
            warnings.append(
                f"[retrieval.{name}] max_items is {self.max_items:,} but the plan's catalog has "
                f"{items:,} items: EASE refuses to fit when more than max_items items have "
                "training events, so the system as configured cannot be built at this catalog "
                f"unless at most {self.max_items:,} of its items have events (the line assumes "
                f"that many). Drop {name} from [retrieval].sources (ALS, BPR and the two-tower "
                "model serve large catalogs), or raise max_items where the memory is there: "
                f"{items:,} items need {4 * items**2 / 1e9:,.0f} GB of weights in every replica"
            )
        return [Sized(f"{name} weights", ease_bytes(items, active), how)], warnings


SourceMemory = VectorSource | PopularityList | SegmentLists | CovisitationTable | EASEWeights
"""What the plan knows of a candidate source's memory in every replica."""


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
        pipeline: the config, sources and ranker the run measured (``None``: a run from
            before it recorded them); the plan warns when they are not the planned ones.
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
    pipeline: Pipeline | None = None

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
                answered = get(name, "answered", kind=int, positive=True)
                used = _numbers(
                    get(name, "cpu_seconds", kind=dict), f"{source}: {name}.cpu_seconds"
                )
                per = {k: v / answered * 1000 for k, v in used.items()}
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
        if isinstance(items, int) and not isinstance(items, bool) and items <= 0:
            raise ValueError(f"{source}: world.items is {items}; expected the run's catalog, > 0")
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
            replicas=get("service", "replicas", kind=int, positive=True),
            cpus=get("machine", "cpus", kind=int, positive=True),
            catalog_items=int(items) if isinstance(items, int) else None,
            source=source,
            arrivals=str(arrivals),
            feature_bytes=feature_bytes,
            pipeline=(
                Pipeline.from_dict(report["pipeline"], source) if "pipeline" in report else None
            ),
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
    """``get(*keys, kind=T, positive=False)``: the value at ``keys``, checked to be a ``T``:
    a number is also checked to be finite and >= 0 (> 0 with ``positive``), as every count,
    time and byte figure of the run is (JSON's ``NaN`` and ``Infinity`` parse as floats)."""

    def get(*keys: str, kind: type, positive: bool = False) -> Any:
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
        if kind is int and not (math.isfinite(value) and value == int(value)):
            raise ValueError(f"{source}: {where} should be a whole number, got {value!r}")
        if not math.isfinite(value) or not (value > 0 if positive else value >= 0):
            raise ValueError(
                f"{source}: {where} is {value!r}; expected a finite number "
                f"{'> 0' if positive else '>= 0'} (re-run bench/serving.py --out FILE)"
            )
        return kind(value)

    return get


def _numbers(values: Mapping[str, Any], where: str) -> dict[str, float]:
    """``values`` (CPU seconds or cores per process) as floats; a value that is not a number,
    or not a finite one >= 0, is an error naming its key."""
    bad = {k: v for k, v in values.items() if isinstance(v, bool) or not isinstance(v, int | float)}
    if bad:
        raise ValueError(f"{where}: not numbers: {bad}")
    wrong = {k: v for k, v in values.items() if not (math.isfinite(v) and v >= 0)}
    if wrong:
        raise ValueError(f"{where}: expected finite numbers >= 0 (CPU a process used), got {wrong}")
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


def jemalloc_size_class(n: int) -> int:
    """The bytes jemalloc 5 allocates for a request of ``n`` (its ``nallocx``; Redis's
    ``used_memory`` counts these): 8; multiples of 16 up to 128; then four classes per doubling
    (160, 192, 224, 256, 320, 384, ...), each a multiple of a quarter of the power of two below
    ``n``. Why a value's bytes cannot be added up plainly: a 1,414-byte string takes 1,536,
    a 2,064-byte one 2,560 (24% more). A test checks it against the library's ``nallocx``."""
    if n <= 8:
        return 8
    if n <= 128:
        return -(-n // 16) * 16
    spacing = 1 << ((n - 1).bit_length() - 3)
    return -(-n // spacing) * spacing


def sds_bytes(n: int) -> int:
    """Allocated bytes of a Redis string (``sds``) of ``n`` bytes: its header (1, 3, 5 or 9
    bytes as the length needs; 1 below 32 bytes, which only keys are, values of that size being
    embedded), the bytes and a terminating 0, in jemalloc's size class."""
    header = 1 if n < 1 << 5 else 3 if n < 1 << 8 else 5 if n < 1 << 16 else 9
    return jemalloc_size_class(header + n + 1)


def redis_bytes_per_key(value_bytes: int, key_chars: int) -> int:
    """Redis ``used_memory`` of one string key with a TTL (``SET ... EX``): the key's string,
    the value's object and string (one allocation up to :data:`REDIS_EMBSTR_MAX` bytes), each
    in jemalloc's size class, and :data:`REDIS_KEY_ENTRY_BYTES` of the dicts. For values below
    32 KiB (lists of up to ~2,500 items): a longer one is read into a buffer Redis trims only
    when more than a tenth of it is free."""
    if value_bytes <= REDIS_EMBSTR_MAX:
        value = jemalloc_size_class(REDIS_OBJECT_BYTES + 3 + value_bytes + 1)
    else:
        value = jemalloc_size_class(REDIS_OBJECT_BYTES) + sds_bytes(value_bytes)
    return REDIS_KEY_ENTRY_BYTES + sds_bytes(key_chars) + value


PRECOMPUTED_PREFIX = str(inspect.signature(PrecomputedStore).parameters["prefix"].default)
"""The precomputed store's default key prefix (keys are ``<prefix>:<version>:<user id>``)."""


def precomputed_key_chars(users: int, model_version_chars: int) -> int:
    """Characters of the longest precomputed key for user ids below ``users``."""
    user = len(str(max(users - 1, 0)))
    return len(PRECOMPUTED_PREFIX) + 1 + model_version_chars + 1 + user


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


def hnsw_graph_bytes(hnsw_m: int) -> float:
    """Expected bytes of one node of Faiss's HNSW graph (``faiss.HNSW``), as
    ``HNSWIndex.memory_bytes`` counts them: its layer-0 links (``2 * M`` int32), its entry in
    ``offsets`` (int64) and ``levels`` (int32), and its upper layers' links: a node reaches
    level ``l >= 1`` with probability ``M^-l`` and keeps ``M`` int32 links there, so
    ``4 * M * (1/M + 1/M² + ...) = 4 * M / (M - 1)`` bytes expected."""
    upper = FAISS_ID_BYTES * hnsw_m / (hnsw_m - 1)
    return 2 * hnsw_m * FAISS_ID_BYTES + HNSW_OFFSET_BYTES + HNSW_LEVEL_BYTES + upper


def index_bytes_per_item(index: str, dim: int, hnsw_m: int) -> float:
    """Memory of one item in a vector index: its float32 vector; for HNSW also its node of the
    graph (:func:`hnsw_graph_bytes`); for IVF-PQ as serving builds it, the PQ code (``dim / 4``
    bytes), its int64 id and the full vector kept for exact re-scoring."""
    vector = 4 * dim
    if index == "flat":
        return vector
    if index == "hnsw":
        return vector + hnsw_graph_bytes(hnsw_m)
    if index == "ivfpq":
        return vector + default_pq_m(dim) + IVF_ID_BYTES
    raise ValueError(f"index must be 'flat', 'hnsw' or 'ivfpq', got {index!r}")


DEFAULT_SOURCES: dict[str, SourceMemory] = {"item vectors": VectorSource(64)}

BUILT_HNSW_M = HNSWConfig().m
"""The ``M`` of the HNSW indexes the feed builds: its export (``export_source(..., index=
"auto")`` in :mod:`mlsd.systems.feed.package`) takes :func:`~mlsd.serving.index.choose_index`'s
index, with ``HNSWConfig``'s defaults."""


def index_warnings(req: Requirements) -> list[str]:
    """Warnings when ``[plan]``'s ``index`` or ``hnsw_m`` size an index other than the one the
    feed builds (its export always asks for ``auto``, and HNSW at ``HNSWConfig``'s ``M``)."""
    built = index_kind("auto", req.catalog_items)
    planned = index_kind(req.index, req.catalog_items)
    warnings = []
    if req.index != "auto":
        warnings.append(
            f"[plan].index is {req.index!r}, but the feed's export builds every vector index "
            f"with index='auto' ({built} at {req.catalog_items:,} items): the index lines are a "
            'what-if, not the deployed system; set index = "auto" to plan what is built'
        )
    if planned == "hnsw" and req.hnsw_m != BUILT_HNSW_M:
        warnings.append(
            f"[plan].hnsw_m is {req.hnsw_m}, but the feed builds HNSW with M = {BUILT_HNSW_M} "
            "(HNSWConfig's default, which its export uses): the index lines are a what-if, not "
            f"the deployed system; set hnsw_m = {BUILT_HNSW_M} to plan what is built"
        )
    return warnings


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
    sources: Mapping[str, SourceMemory] | None = None,
    source_names: Sequence[str] | None = None,
    pipeline: Pipeline | None = None,
) -> CapacityPlan:
    """The plan for ``req``: traffic, memory, and with ``measured`` the cores, replicas, the
    batch run and the latency budget (without it those are left out, and a warning says so).

    Args:
        req: the requirements.
        measured: costs from a ``bench/serving.py`` run.
        sources: name → what each candidate source keeps in a replica's memory (default:
            one vector index of dimension 64); ``mlsd plan capacity`` reads them from
            ``[retrieval]``. With it, a source of ``source_names`` it lacks is a warning.
        source_names: every candidate source, whose names each precomputed value holds
            (default: all the feed's; ``mlsd plan capacity``: ``[retrieval].sources``).
        pipeline: the pipeline planned for (``mlsd plan capacity``: ``--config``'s), compared
            with the one ``measured`` ran (:func:`~mlsd.plan.pipeline.pipeline_warnings`).
    """
    out = _Lines()
    online_rps, precomputed_rps = _traffic(req, out)
    names = tuple(SOURCE_SECTIONS) if source_names is None else tuple(source_names)
    _precomputed_store(req, names, out)
    if sources is not None:
        out.warnings.extend(
            f"[retrieval] source {name!r}: the plan has no model of its memory, which is not "
            "in the memory per replica"
            for name in names
            if name not in sources
        )
    memory = sources if sources is not None else DEFAULT_SOURCES
    _source_memory(req, memory, out)
    if any(isinstance(source, VectorSource) for source in memory.values()):
        out.warnings.extend(index_warnings(req))
    _feature_store(req, measured, out)
    if measured is None:
        out.warnings.append(
            "no measured costs: cores, replicas, the batch run, latency and the online feature "
            "store's memory need a run of bench/serving.py (--measured FILE)"
        )
    else:
        _compute(req, measured, online_rps, precomputed_rps, out)
        unbuildable = [
            name
            for name, source in (sources or {}).items()
            if isinstance(source, EASEWeights) and not source.builds_at(req.catalog_items)
        ]
        out.warnings.extend(
            pipeline_warnings(measured.pipeline, pipeline, measured.source, unbuildable=unbuildable)
        )
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
    if req.daily_active_users > req.users:
        bound = req.users / req.daily_active_users
        out.warnings.append(
            f"[plan].daily_active_users ({req.daily_active_users:,}) is more than [plan].users "
            f"({req.users:,}), the users a batch run writes a precomputed list for: "
            f"{req.daily_active_users - req.users:,} or more active users would have no list, "
            f"so at most {bound:.0%} of the requests can be answered from one (if active users "
            "send alike)"
            + (
                f", not the [plan].precomputed_share of {req.precomputed_share:g}"
                if req.precomputed_share > bound
                else ""
            )
            + "; raise users to the users the system knows, or lower daily_active_users"
        )
    return online, precomputed


def _precomputed_store(req: Requirements, source_names: Sequence[str], out: _Lines) -> None:
    value = precomputed_value_bytes(req.list_length, req.model_version_chars, source_names)
    key_chars = precomputed_key_chars(req.users, req.model_version_chars)
    per_key = redis_bytes_per_key(value, key_chars)
    versions = req.precomputed_versions
    out.add(
        "precomputed store",
        versions * req.users * per_key / 1e9,
        "GB",
        f"{versions} model version(s) x {req.users:,} users x {per_key:,} B a key: the "
        f"{value:,} B value in {REDIS_OBJECT_BYTES + sds_bytes(value):,} B (jemalloc's size "
        f"class), the {key_chars}-character key in {sds_bytes(key_chars)} B, "
        f"{REDIS_KEY_ENTRY_BYTES} B of Redis's dicts; {req.list_length} items a list. Keys are "
        "per version with a TTL, and a new version's batch is written beside the champion's "
        "([plan].precomputed_versions). Not counted: the consumed-items key of each user "
        f"active within the TTL ({PRECOMPUTED_PREFIX}/consumed:<user>, at most "
        f"{MAX_CONSUMED:,} int64 ids: {CONSUMED_KEY_BYTES_AT_WORST:,} B in Redis at worst, so "
        f"at worst {req.daily_active_users:,} active users x {CONSUMED_KEY_BYTES_AT_WORST:,} B "
        f"= {req.daily_active_users * CONSUMED_KEY_BYTES_AT_WORST / 1e9:.1f} GB). Redis's "
        "used_memory: provision more for fragmentation and a save's copy-on-write",
    )


def _source_memory(req: Requirements, sources: Mapping[str, SourceMemory], out: _Lines) -> None:
    total = 0.0
    for name, source in sources.items():
        parts, warnings = source.sized(name, req)
        for part in parts:
            total += out.add(part.name, part.bytes / 1e9, "GB", part.how)
        out.warnings.extend(warnings)
    out.add(
        "memory per replica",
        total,
        "GB",
        f"the arrays of {len(sources)} candidate source(s), loaded in every replica (the "
        "ranker, the catalog snapshot and the process itself apart)",
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
    replicas = _replicas(req, busy, cores, out)
    for name, online_ms, pre_ms in (
        ("Redis", online.redis_cpu_ms, pre.redis_cpu_ms),
        ("balancer", online.balancer_cpu_ms, pre.balancer_cpu_ms),
    ):
        planned_cores = out.add(
            f"{name} cores at peak",
            busy_at_peak(online_ms, pre_ms) / req.cpu_utilization,
            "cores",
            f"{online_ms:.3f} ms online, {pre_ms:.3f} ms precomputed a request",
        )
        if name == "Redis" and planned_cores > 1:
            out.warnings.append(
                f"Redis cores at peak is {planned_cores:.2f}: Redis runs commands on one "
                "thread, so one instance cannot carry that load at the "
                f"[plan].cpu_utilization of {req.cpu_utilization:g}; shard the keys over "
                f"{math.ceil(planned_cores)} or more instances (Redis Cluster), or serve the "
                "reads from read replicas"
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
    _load_warnings(busy, replicas, measured, out)
    _catalog_warning(req, measured, out)


def _replicas(req: Requirements, busy: float, cores: float, out: _Lines) -> float:
    """The replicas for ``busy`` cores at peak (``cores`` at the headroom's load), one more
    than they need at full load; the line says the load a lost replica leaves the others."""
    count = max(
        req.min_replicas,
        math.ceil(cores / req.cores_per_replica),
        math.ceil(busy / req.cores_per_replica) + 1,
    )
    left = (
        f"a lost replica leaves {count - 1} at {busy / (count - 1) / req.cores_per_replica:.0%} "
        "load at peak"
        if count > 1
        else "no replica is left when one is lost"
    )
    return out.add(
        "service replicas",
        count,
        "replicas",
        f"cores / {req.cores_per_replica:g} a replica; one more than the peak's busy cores "
        f"need, so {left}; at least {req.min_replicas}",
    )


def _load_warnings(busy: float, replicas: float, measured: Measured, out: _Lines) -> None:
    """A warning when a replica at peak, or one left after a replica is lost, would be busier
    than the run measured one (the heavier of its phases): its p99 there is not measured."""
    phases = {"online": measured.online, "precomputed": measured.precomputed}
    loads = {k: c.rps * c.service_cpu_ms / 1000.0 / measured.replicas for k, c in phases.items()}
    heaviest = max(loads, key=loads.__getitem__)
    planned = busy / replicas
    if planned > loads[heaviest]:
        out.warnings.append(
            f"each replica would be busy {planned:.2f} of a core at peak, more than the "
            f"{loads[heaviest]:.2f} the run measured one at (its {heaviest} phase): the p99 at "
            "that load is not measured"
        )
    elif replicas > 1 and busy / (replicas - 1) > loads[heaviest]:
        out.warnings.append(
            f"with one of the {replicas:g} replicas lost, each left would be busy "
            f"{busy / (replicas - 1):.2f} of a core at peak, more than the {loads[heaviest]:.2f} "
            f"the run measured one at (its {heaviest} phase): the p99 after a loss is not "
            "measured; re-run bench/serving.py at that load per replica, or raise "
            "[plan].min_replicas"
        )


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
