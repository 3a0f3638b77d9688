"""The capacity plan: its arithmetic by hand, its reading of bench/serving.py's JSON, and its
byte counts against a live Redis and serialized Faiss indexes."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
import redis

from mlsd.config import SOURCE_SECTIONS
from mlsd.plan.capacity import (
    REDIS_KEY_OVERHEAD_BYTES,
    Measured,
    PathCost,
    VectorSource,
    capacity_plan,
    index_bytes_per_item,
    index_kind,
    precomputed_value_bytes,
)
from mlsd.plan.requirements import Requirements
from mlsd.serving.precomputed import PrecomputedStore

SMALL = Requirements(
    daily_active_users=864_000,
    requests_per_user_per_day=10,
    peak_to_average=2,
    precomputed_share=0.75,
    users=1_000,
    catalog_items=1_000,
    list_length=10,
    model_version_chars=5,
    index="flat",
    cpu_utilization=0.5,
    min_replicas=2,
    batch_window_hours=1,
)


def measured(**changes: Any) -> Measured:
    values: dict[str, Any] = {
        "online": PathCost(service_cpu_ms=4.0, p99_ms=12.0, rps=200.0),
        "precomputed": PathCost(service_cpu_ms=1.0, p99_ms=2.0, rps=200.0),
        "batch_cpu_ms_per_user": 1.0,
        "replicas": 2,
        "cpus": 2,
        "catalog_items": 1_000,
        "source": "test",
        "feature_bytes": (2_000.0, 250.0),
    }
    return Measured(**{**values, **changes})


SOURCES = {"als": VectorSource(8, user_vectors=True), "two_tower": VectorSource(16)}


def test_the_plan_is_the_arithmetic_by_hand() -> None:
    plan = capacity_plan(SMALL, measured(), sources=SOURCES)
    assert plan.value("mean requests/s") == pytest.approx(100.0)  # 864,000 x 10 / 86,400
    assert plan.value("peak requests/s") == pytest.approx(200.0)
    assert plan.value("peak online requests/s") == pytest.approx(50.0)
    assert plan.value("peak precomputed requests/s") == pytest.approx(150.0)
    # (50/s x 4 ms + 150/s x 1 ms) = 0.35 of a core, at half a core's load: 0.7
    assert plan.value("service cores at peak") == pytest.approx(0.7)
    assert plan.value("service replicas") == 2  # the availability floor
    assert plan.value("batch run CPU") == pytest.approx(1_000 * 1.0 / 1000 / 3600)
    assert plan.value("batch cores") == 1
    # header 24 + version 5 + 10 int64 ids + 10 float32 scores = 149 bytes, then the source
    # table (a count, then each name's length and bytes) and a source code per item
    assert precomputed_value_bytes(10, 5) == 149 + 1 + 10
    names = tuple(SOURCE_SECTIONS)
    table = 1 + sum(1 + len(name) for name in names)
    assert precomputed_value_bytes(10, 5, names) == 149 + table + 10
    expected_store = 1_000 * (149 + table + 10 + REDIS_KEY_OVERHEAD_BYTES) / 1e9
    assert plan.value("precomputed store") == pytest.approx(expected_store)
    assert plan.value("als index") == pytest.approx(1_000 * 8 * 4 / 1e9)
    assert plan.value("als user vectors") == pytest.approx(1_000 * 8 * 4 / 1e9)
    assert plan.value("two_tower index") == pytest.approx(1_000 * 16 * 4 / 1e9)
    assert "two_tower user vectors" not in [line.name for line in plan.lines]
    assert plan.value("vectors per replica") == pytest.approx(1_000 * 32 * 4 / 1e9)
    # 1,000 users x 2,000 B + 1,000 items x 250 B
    assert plan.value("online feature store") == pytest.approx(2_250_000 / 1e9)
    assert plan.warnings == []


def test_a_run_without_feature_store_figures_says_it_leaves_them_out() -> None:
    plan = capacity_plan(SMALL, measured(feature_bytes=None), sources=SOURCES)
    assert "online feature store" not in [line.name for line in plan.lines]
    assert plan.warnings == [
        "test has no feature_store figures (a bench/serving.py run from before they were "
        "measured): the online feature store's memory is left out"
    ]


def test_replicas_follow_the_cores_past_the_floor() -> None:
    busy = dataclasses.replace(SMALL, daily_active_users=86_400_000)
    plan = capacity_plan(busy, measured(online=PathCost(4.0, 12.0, 20_000.0)))
    cores = plan.value("service cores at peak")
    assert cores == pytest.approx(70.0)  # 100x the traffic of the hand-computed plan
    assert plan.value("service replicas") == 70
    two_a_replica = dataclasses.replace(busy, cores_per_replica=2.0)
    assert capacity_plan(two_a_replica, measured()).value("service replicas") == 35


def test_a_lost_replica_leaves_enough_cores() -> None:
    # 1.05 busy cores at full utilisation: 2 replicas would carry them, 1 would not
    full = dataclasses.replace(SMALL, daily_active_users=2_592_000, cpu_utilization=1.0)
    plan = capacity_plan(full, measured())
    assert plan.value("service cores at peak") == pytest.approx(1.05)
    assert plan.value("service replicas") == 3


def test_redis_and_the_balancer_are_planned_apart_from_the_replicas() -> None:
    costs = measured(
        online=PathCost(4.0, 12.0, 200.0, redis_cpu_ms=0.5, balancer_cpu_ms=0.2),
        precomputed=PathCost(1.0, 2.0, 200.0, redis_cpu_ms=0.1, balancer_cpu_ms=0.2),
    )
    plan = capacity_plan(SMALL, costs)
    assert plan.value("service cores at peak") == pytest.approx(0.7)  # as without them
    assert plan.value("Redis cores at peak") == pytest.approx((50 * 0.5 + 150 * 0.1) / 1000 / 0.5)
    assert plan.value("balancer cores at peak") == pytest.approx(200 * 0.2 / 1000 / 0.5)


def test_without_measured_costs_only_the_traffic_and_the_bytes_are_planned() -> None:
    plan = capacity_plan(SMALL)
    names = [line.name for line in plan.lines]
    assert "peak requests/s" in names
    assert "precomputed store" in names
    assert "service cores at peak" not in names
    assert any("bench/serving.py" in w for w in plan.warnings)


def bench_report() -> dict[str, Any]:
    """The fields of bench/serving.py's JSON the plan reads, as a run prints them."""
    return {
        "machine": {"cpus": 2},
        "world": {"items": 1_000_000, "users": 20_000, "events": 4_000_000},
        "batch_predict": {"cpu_ms_per_user": 0.88},
        "feature_store": {"bytes_per_user": 2514.0, "bytes_per_item": 266.2, "users": 5000},
        "service": {"replicas": 2},
        "precomputed": {
            "achieved_rps": 200.0,
            "latency_ms": {"p50": 1.6, "p99": 3.094},
            "cpu_cores": {
                "server": 0.236,
                "redis": 0.012,
                "balancer": 0.025,
                "load_generator": 0.062,
            },
        },
        "online": {
            "achieved_rps": 199.9,
            "latency_ms": {"p50": 5.6, "p99": 14.836},
            "stage_ms": {
                "ranking": {"p50": 1.25, "p99": 4.273},
                "total": {"p50": 3.821, "p99": 8.588},
            },
            "cpu_cores": {
                "server": 0.978,
                "redis": 0.001,
                "balancer": 0.027,
                "load_generator": 0.071,
            },
        },
    }


def test_the_bench_json_gives_cpu_per_request_without_the_load_generator() -> None:
    costs = Measured.from_serving_bench(bench_report(), "run.json")
    assert costs.online.service_cpu_ms == pytest.approx(0.978 / 199.9 * 1000)
    assert costs.online.redis_cpu_ms == pytest.approx(0.001 / 199.9 * 1000)
    assert costs.feature_bytes == (2514.0, 266.2)
    assert costs.online.balancer_cpu_ms == pytest.approx(0.027 / 199.9 * 1000)
    assert costs.precomputed.service_cpu_ms == pytest.approx(0.236 / 200.0 * 1000)
    assert costs.online.p99_ms == 14.836
    assert (costs.batch_cpu_ms_per_user, costs.replicas, costs.cpus) == (0.88, 2, 2)
    assert costs.catalog_items == 1_000_000
    assert costs.online.stages == {"ranking": (1.25, 4.273), "total": (3.821, 8.588)}
    assert costs.precomputed.stages == {}  # a run that reported none


def test_the_online_stages_are_lines_of_the_latency_budget() -> None:
    stages = {"ranking": (1.25, 4.273), "total": (3.821, 8.588)}
    plan = capacity_plan(SMALL, measured(online=PathCost(4.0, 12.0, 200.0, stages=stages)))
    assert plan.value("online stage total p99") == 8.588
    line = next(line for line in plan.lines if line.name == "online stage ranking p99")
    assert "p50 1.25 ms; 0.9% of the budget" in line.how  # 4.273 of 500 ms


def test_cpu_seconds_over_the_answered_requests_are_preferred() -> None:
    report = bench_report()
    report["online"] |= {"cpu_seconds": {"server": 36.0, "redis": 0.05}, "answered": 7_000}
    costs = Measured.from_serving_bench(report, "run.json")
    assert costs.online.service_cpu_ms == pytest.approx(36.0 / 7_000 * 1000)
    assert costs.online.balancer_cpu_ms == 0.0  # a run without a balancer


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("online", "latency_ms", "p99"), None, "online.latency_ms.p99 is null"),
        (("online", "cpu_cores"), 1.5, "online.cpu_cores should be an object"),
        (("machine", "cpus"), None, "machine.cpus is null"),
        (("service", "replicas"), "two", "service.replicas should be a number"),
        (("precomputed", "cpu_cores", "server"), None, r"precomputed\.cpu_cores: not numbers"),
        (("feature_store", "bytes_per_item"), "266", "feature_store.bytes_per_item should be"),
    ],
)
def test_a_malformed_bench_field_is_named(path: tuple[str, ...], value: Any, message: str) -> None:
    report = bench_report()
    parent = report
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    with pytest.raises(ValueError, match=message):
        Measured.from_serving_bench(report, "run.json")


def test_a_bench_json_without_a_field_names_it() -> None:
    report = bench_report()
    del report["online"]["cpu_cores"]
    with pytest.raises(ValueError, match=r"run\.json: no online\.cpu_cores"):
        Measured.from_serving_bench(report, "run.json")
    report = bench_report()
    report["precomputed"]["achieved_rps"] = 0
    with pytest.raises(ValueError, match="nothing was served"):
        Measured.from_serving_bench(report, "run.json")
    report = bench_report()
    del report["world"]  # runs before the world was recorded
    assert Measured.from_serving_bench(report, "run.json").catalog_items is None
    del report["feature_store"]  # ... or the feature store measured
    assert Measured.from_serving_bench(report, "run.json").feature_bytes is None


def test_a_bench_file_that_is_missing_or_not_json_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="file not found"):
        Measured.from_file(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json: not JSON"):
        Measured.from_file(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        Measured.from_file(tmp_path / "list.json")
    (tmp_path / "run.json").write_text(json.dumps(bench_report()))
    assert Measured.from_file(tmp_path / "run.json").source == str(tmp_path / "run.json")


def faiss_index(kind: str, dim: int, m: int, vectors: np.ndarray) -> Any:
    """The index as serving builds it (``serving/index/faiss_index.py``)."""
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        return faiss.IndexHNSWFlat(dim, m)
    quantizer = faiss.IndexFlatIP(dim)
    ivf = faiss.IndexIVFPQ(quantizer, dim, 16, dim // 4, 8, faiss.METRIC_INNER_PRODUCT)
    refined = faiss.IndexRefineFlat(ivf)
    refined.train(vectors)
    return refined


@pytest.mark.parametrize(("index", "tolerance"), [("flat", 0.01), ("hnsw", 0.05), ("ivfpq", 0.02)])
def test_index_bytes_per_item_match_a_serialized_faiss_index(index: str, tolerance: float) -> None:
    n, dim, m = 3_000, 64, 32
    vectors = np.random.default_rng(0).standard_normal((2 * n, dim)).astype(np.float32)
    built = faiss_index(index, dim, m, vectors)
    built.add(vectors[:n])
    before = len(faiss.serialize_index(built))
    built.add(vectors[n:])
    # what an item more costs (the codebooks and centroids are paid once, whatever the catalog)
    actual = (len(faiss.serialize_index(built)) - before) / n
    assert index_bytes_per_item(index, dim, m) == pytest.approx(actual, rel=tolerance)


def test_an_unknown_index_is_refused() -> None:
    with pytest.raises(ValueError, match="'flat', 'hnsw' or 'ivfpq'"):
        index_bytes_per_item("ivf", 64, 32)


@pytest.mark.parametrize(
    ("items", "kind"),
    [(49_999, "flat"), (50_000, "hnsw"), (4_999_999, "hnsw"), (5_000_000, "ivfpq")],
)
def test_auto_is_the_index_serving_picks(items: int, kind: str) -> None:
    from mlsd.serving.index import FlatIndex, HNSWIndex, IVFIndex, VectorIndex, choose_index

    built: dict[type[VectorIndex], str] = {FlatIndex: "flat", HNSWIndex: "hnsw", IVFIndex: "ivfpq"}
    assert built[type(choose_index(items, 64))] == kind
    assert index_kind("auto", items) == kind
    assert index_kind("flat", items) == "flat"


@pytest.fixture
def client(redis_server: str) -> Iterator[redis.Redis]:
    host, port = redis_server.split(":")
    connection = redis.Redis(host=host, port=int(port))
    connection.flushall()
    yield connection
    connection.flushall()
    connection.close()


def used_memory(client: redis.Redis) -> int:
    info = client.info("memory")
    assert isinstance(info, dict)
    return int(info["used_memory"])


@pytest.mark.integration
@pytest.mark.parametrize("list_length", [10, 100])
def test_the_store_bytes_match_what_redis_uses(client: redis.Redis, list_length: int) -> None:
    n, version = 5_000, "a22c162c-d03be318"
    store = PrecomputedStore(client)
    ids = np.arange(n * list_length, dtype=np.int64).reshape(n, list_length)
    scores = np.ones((n, list_length), dtype=np.float32)
    before = used_memory(client)
    names = tuple(SOURCE_SECTIONS)
    written = store.write(
        np.arange(1_000_000, 1_000_000 + n), ids, scores, model_version=version,
        sources=np.zeros(ids.shape, dtype=np.int64), source_names=names,
    )  # fmt: skip
    used = (used_memory(client) - before) / n
    value = precomputed_value_bytes(list_length, len(version), names)
    assert written.n_bytes == n * value  # the plan's value size is the writer's
    assert value + REDIS_KEY_OVERHEAD_BYTES == pytest.approx(used, rel=0.1)
