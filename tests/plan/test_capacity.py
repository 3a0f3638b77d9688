"""The capacity plan: its arithmetic by hand, its reading of bench/serving.py's JSON, and its
byte counts against a live Redis and serialized Faiss indexes."""

from __future__ import annotations

import ctypes.util
import dataclasses
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
import redis

from mlsd.config import SOURCE_SECTIONS
from mlsd.plan.capacity import (
    CovisitationTable,
    EASEWeights,
    Measured,
    PathCost,
    PopularityList,
    SegmentLists,
    VectorSource,
    capacity_plan,
    covisitation_bytes,
    ease_bytes,
    index_bytes_per_item,
    index_kind,
    jemalloc_size_class,
    precomputed_key_chars,
    precomputed_value_bytes,
    redis_bytes_per_key,
)
from mlsd.plan.pipeline import Pipeline
from mlsd.plan.requirements import Requirements
from mlsd.serving.precomputed import PrecomputedStore

SMALL = Requirements(
    daily_active_users=864_000,
    requests_per_user_per_day=10,
    peak_to_average=2,
    precomputed_share=0.75,
    users=1_000_000,
    catalog_items=1_000,
    list_length=10,
    model_version_chars=5,
    index="auto",  # exact at 1,000 items
    cpu_utilization=0.5,
    min_replicas=2,
    batch_window_hours=1,
)


DEMO = Pipeline("demo.toml", "d" * 64, "e" * 64, ("popularity", "als"), "auto", "lightgbm")
"""The pipeline :func:`measured` ran: the one the plans below are for unless they say."""


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
        "pipeline": DEMO,
    }
    return Measured(**{**values, **changes})


SOURCES = {"als": VectorSource(8, user_vectors=True), "two_tower": VectorSource(16)}
NAMES = tuple(SOURCES)


def test_the_plan_is_the_arithmetic_by_hand() -> None:
    plan = capacity_plan(SMALL, measured(), sources=SOURCES, source_names=NAMES, pipeline=DEMO)
    assert plan.value("mean requests/s") == pytest.approx(100.0)  # 864,000 x 10 / 86,400
    assert plan.value("peak requests/s") == pytest.approx(200.0)
    assert plan.value("peak online requests/s") == pytest.approx(50.0)
    assert plan.value("peak precomputed requests/s") == pytest.approx(150.0)
    # (50/s x 4 ms + 150/s x 1 ms) = 0.35 of a core, at half a core's load: 0.7
    assert plan.value("service cores at peak") == pytest.approx(0.7)
    assert plan.value("service replicas") == 2  # the availability floor
    assert plan.value("batch run CPU") == pytest.approx(1_000_000 * 1.0 / 1000 / 3600)
    assert plan.value("batch cores") == 1
    # header 24 + version 5 + 10 int64 ids + 10 float32 scores = 149 bytes, then the source
    # table (a count, then each name's length and bytes) and a source code per item
    assert precomputed_value_bytes(10, 5) == 149 + 1 + 10
    names = tuple(SOURCE_SECTIONS)
    table = 1 + sum(1 + len(name) for name in names)
    assert precomputed_value_bytes(10, 5, names) == 149 + table + 10
    # the value (sources als, two_tower) is 149 + 15 + 10 = 174 bytes: a 16-byte object and a
    # string of 3 + 174 + 1 bytes in jemalloc's 192-byte class; the key
    # mlsd:feed:top:vvvvv:999999, 26 characters, a string of 1 + 26 + 1 in 32 bytes; and 97
    # bytes of Redis's dicts; for two model versions (the champion's and the next batch's)
    assert precomputed_value_bytes(10, 5, NAMES) == 174
    assert precomputed_key_chars(1_000_000, 5) == len("mlsd:feed:top:vvvvv:999999")
    per_key = 16 + 192 + 32 + 97
    assert plan.value("precomputed store") == pytest.approx(2 * 1_000_000 * per_key / 1e9)
    # the index's vectors and int64 ids; ALS's user vectors and ids; each source's fallback
    # list (int64 id, float32 score); the tower's history embeddings, one row more, and ids
    assert plan.value("als index") == pytest.approx(1_000 * (8 * 4 + 8) / 1e9)
    assert plan.value("als user vectors") == pytest.approx(1_000_000 * (8 * 4 + 8) / 1e9)
    assert plan.value("als item arrays") == pytest.approx(1_000 * 12 / 1e9)
    assert plan.value("two_tower index") == pytest.approx(1_000 * (16 * 4 + 8) / 1e9)
    assert "two_tower user vectors" not in [line.name for line in plan.lines]
    assert plan.value("two_tower item arrays") == pytest.approx(1_000 * 12 / 1e9)
    total = 40_000 + 40_000_000 + 12_000 + 72_000 + 12_000
    assert plan.value("memory per replica") == pytest.approx(total / 1e9)
    # 1,000,000 users x 2,000 B + 1,000 items x 250 B
    assert plan.value("online feature store") == pytest.approx(2_000_250_000 / 1e9)
    assert plan.warnings == []


LARGE = Requirements(catalog_items=1_000_000, users=5_000_000, index="flat")


def memory_plan(
    sources: dict[str, Any], req: Requirements = LARGE
) -> tuple[dict[str, Any], list[str]]:
    plan = capacity_plan(req, sources=sources, source_names=tuple(sources))
    lines = {line.name: line for line in plan.lines}
    return lines, [w for w in plan.warnings if "bench/serving.py" not in w]


def test_ease_is_its_dense_weights_and_a_catalog_above_max_items_cannot_be_built() -> None:
    lines, warnings = memory_plan({"ease": EASEWeights(50_000)})
    # 50,000² float32 weights, the active items' int64 positions; per catalog item its id,
    # its position among the active ones (int64 each) and the fallback list (12 B)
    expected = 4 * 50_000**2 + 8 * 50_000 + 1_000_000 * 28
    assert ease_bytes(1_000_000, 50_000) == expected
    assert lines["ease weights"].value == pytest.approx(expected / 1e9)  # 10.0 GB
    assert "50,000² x 4 B" in lines["ease weights"].how
    assert lines["memory per replica"].value == pytest.approx(expected / 1e9)
    [warning] = warnings
    assert warning.startswith(
        "[retrieval.ease] max_items is 50,000 but the plan's catalog has 1,000,000 items: EASE "
        "refuses to fit when more than max_items items have training events, so the system as "
        "configured cannot be built at this catalog"
    )
    assert "Drop ease from [retrieval].sources" in warning
    assert warning.endswith("1,000,000 items need 4,000 GB of weights in every replica")
    small = dataclasses.replace(LARGE, catalog_items=20_000)
    lines, warnings = memory_plan({"ease": EASEWeights(50_000)}, small)
    assert lines["ease weights"].value == pytest.approx(ease_bytes(20_000, 20_000) / 1e9)
    assert warnings == []


def test_covisitation_is_its_neighbour_table_at_most() -> None:
    lines, warnings = memory_plan({"covisitation": CovisitationTable(200)})
    # 200M float32 weights and int32 columns, a row start an item, its id, two ranked lists
    expected = 200_000_000 * 8 + 1_000_001 * 4 + 1_000_000 * (8 + 24)
    assert lines["covisitation neighbours"].value == pytest.approx(expected / 1e9)  # 1.64 GB
    assert lines["covisitation neighbours"].how.startswith(
        "at most 1,000,000 items x 200 neighbours x 8 B (float32 weight + int32 item)"
    )
    assert warnings == []
    # past 2**31 entries scipy's CSR takes int64 columns and row starts
    assert covisitation_bytes(20_000_000, 4_000_000_000) == (
        4_000_000_000 * 12 + 20_000_001 * 8 + 20_000_000 * 32
    )


def test_a_source_the_plan_cannot_size_is_a_warning_not_a_silent_zero() -> None:
    lines, warnings = memory_plan({"covisitation": CovisitationTable(None)})
    assert "covisitation neighbours" not in lines
    assert warnings == [
        "[retrieval.covisitation] max_neighbours is not set: every co-visited pair is kept, so "
        "the plan cannot size its table and leaves it out of the memory per replica; set "
        "max_neighbours (200: at most 1.64 GB at 1,000,000 items)"
    ]
    plan = capacity_plan(LARGE, sources={"als": VectorSource(64)}, source_names=("als", "x"))
    assert (
        "[retrieval] source 'x': the plan has no model of its memory, which is not in the "
        "memory per replica"
    ) in plan.warnings


def test_the_popularity_lists_and_what_segment_popularity_does_not_say() -> None:
    lines, warnings = memory_plan(
        {"popularity": PopularityList(), "segment_popularity": SegmentLists()}
    )
    assert lines["popularity list"].value == pytest.approx(12_000_000 / 1e9)
    assert lines["segment_popularity lists"].value == pytest.approx(20_000_000 / 1e9)
    assert lines["memory per replica"].value == pytest.approx(32_000_000 / 1e9)
    [warning] = warnings
    assert warning.startswith("segment_popularity: its score tables (a float32 row of the ")
    assert "45 rows, 0.18 GB" in warning
    assert "not in the memory per replica" in warning


def test_the_memory_per_replica_adds_every_sources_lines() -> None:
    sources = {
        "popularity": PopularityList(),
        "covisitation": CovisitationTable(50),
        "als": VectorSource(32, user_vectors=True, fold_in=True),
        "ease": EASEWeights(10_000),
        "two_tower": VectorSource(16, history_embeddings=True),
    }
    lines, _ = memory_plan(sources)
    parts = [v for k, v in lines.items() if k.split()[0] in sources]
    assert len(parts) == 1 + 1 + 3 + 1 + 2
    assert lines["memory per replica"].value == pytest.approx(sum(p.value for p in parts))
    # ALS keeps its item factors again (float32), their ids and a mask to fold users in;
    # the two-tower's user tower embeds history items: (items + 1) x dim float32, and ids
    assert lines["als item arrays"].value == pytest.approx(1_000_000 * (12 + 128 + 8 + 1) / 1e9)
    expected_tower = 1_000_000 * (12 + 64 + 8) + 64
    assert lines["two_tower item arrays"].value == pytest.approx(expected_tower / 1e9)


def test_a_run_without_feature_store_figures_says_it_leaves_them_out() -> None:
    plan = capacity_plan(SMALL, measured(feature_bytes=None), sources=SOURCES, source_names=NAMES)
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


def test_a_lost_replica_that_leaves_more_load_than_measured_is_a_warning() -> None:
    # 0.56 busy cores at peak: 2 replicas at 0.28 each, within the 0.40 measured one at (the
    # online phase: 200/s x 4 ms over 2 replicas), but the one left after a loss carries 0.56
    busier = dataclasses.replace(SMALL, requests_per_user_per_day=16)
    plan = capacity_plan(busier, measured())
    assert plan.value("service replicas") == 2
    line = next(line for line in plan.lines if line.name == "service replicas")
    assert "so a lost replica leaves 1 at 56% load at peak" in line.how
    assert plan.warnings == [
        "with one of the 2 replicas lost, each left would be busy 0.56 of a core at peak, more "
        "than the 0.40 the run measured one at (its online phase): the p99 after a loss is not "
        "measured; re-run bench/serving.py at that load per replica, or raise "
        "[plan].min_replicas"
    ]
    assert capacity_plan(SMALL, measured()).warnings == []  # 0.35 left: within the run


def test_redis_above_one_core_is_a_warning() -> None:
    # Redis runs commands on one thread: 1.5 ms a request at 200/s is 0.3 busy cores, 0.6 at
    # half a core's load; ten times the traffic needs 6 cores of it
    costs = measured(
        online=PathCost(4.0, 12.0, 200.0, redis_cpu_ms=1.5),
        precomputed=PathCost(1.0, 2.0, 200.0, redis_cpu_ms=1.5),
    )
    assert capacity_plan(SMALL, costs).value("Redis cores at peak") == pytest.approx(0.6)
    assert not [w for w in capacity_plan(SMALL, costs).warnings if "Redis" in w]
    busy = dataclasses.replace(SMALL, requests_per_user_per_day=100)
    [warning] = [w for w in capacity_plan(busy, costs).warnings if "Redis" in w]
    assert warning.startswith(
        "Redis cores at peak is 6.00: Redis runs commands on one thread, so one instance cannot "
        "carry that load"
    )
    assert warning.endswith(
        "shard the keys over 6 or more instances (Redis Cluster), or serve "
        "the reads from read replicas"
    )


def test_more_active_users_than_users_with_a_list_is_a_warning() -> None:
    req = dataclasses.replace(SMALL, daily_active_users=4_000_000)
    [warning] = [w for w in capacity_plan(req).warnings if "daily_active_users" in w]
    assert warning.startswith(
        "[plan].daily_active_users (4,000,000) is more than [plan].users (1,000,000), the users "
        "a batch run writes a precomputed list for: 3,000,000 or more active users would have "
        "no list, so at most 25% of the requests can be answered from one (if active users send "
        "alike), not the [plan].precomputed_share of 0.75; raise users"
    )
    assert not [w for w in capacity_plan(SMALL).warnings if "daily_active_users" in w]


def test_an_index_the_feed_does_not_build_is_a_what_if_warning() -> None:
    def index_warnings(**changes: Any) -> list[str]:
        req = dataclasses.replace(LARGE, **changes)
        plan = capacity_plan(req, sources={"als": VectorSource(64)}, source_names=("als",))
        return [w for w in plan.warnings if "what-if" in w]

    assert index_warnings(index="auto") == []  # HNSW at M 32, as the feed's export builds it
    [warning] = index_warnings(index="ivfpq")
    assert warning.startswith(
        "[plan].index is 'ivfpq', but the feed's export builds every vector index with "
        "index='auto' (hnsw at 1,000,000 items): the index lines are a what-if"
    )
    [warning] = index_warnings(index="auto", hnsw_m=8)
    assert warning.startswith(
        "[plan].hnsw_m is 8, but the feed builds HNSW with M = 32 (HNSWConfig's default"
    )
    assert index_warnings(index="auto", hnsw_m=8, catalog_items=1_000) == []  # exact: no M


def test_the_precomputed_store_holds_the_versions_kept_and_says_what_it_leaves_out() -> None:
    one = capacity_plan(dataclasses.replace(SMALL, precomputed_versions=1))
    two = capacity_plan(SMALL)  # the champion's lists and the next version's, until the TTL
    assert two.value("precomputed store") == pytest.approx(2 * one.value("precomputed store"))
    line = next(line for line in two.lines if line.name == "precomputed store")
    assert line.how.startswith("2 model version(s) x 1,000,000 users x 401 B a key")
    # not counted, but bounded: MAX_CONSUMED int64 ids a user active within the TTL
    assert "mlsd:feed:top/consumed:<user>, at most 1,000 int64 ids" in line.how
    assert "at worst 864,000 active users x 8,700 B = 7.5 GB" in line.how


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
        "pipeline": DEMO.to_dict(),
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


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("batch_predict", "cpu_ms_per_user"), -0.88, "cpu_ms_per_user is -0.88; expected a "),
        (("feature_store", "bytes_per_user"), -2514, r"bytes_per_user is -2514; expected .* >= 0"),
        (("service", "replicas"), 0, r"service\.replicas is 0; expected a finite number > 0"),
        (("service", "replicas"), 1.5, r"service\.replicas should be a whole number"),
        (("machine", "cpus"), 0, r"machine\.cpus is 0; expected a finite number > 0"),
        (("online", "latency_ms", "p99"), math.nan, r"online\.latency_ms\.p99 is nan"),
        (("online", "achieved_rps"), math.inf, r"online\.achieved_rps is inf"),
        (("precomputed", "cpu_cores", "server"), -0.2, "expected finite numbers >= 0"),
        (("world", "items"), 0, r"world\.items is 0"),
    ],
)
def test_a_bench_value_out_of_range_is_named(
    path: tuple[str, ...], value: Any, message: str
) -> None:
    report = bench_report()
    parent = report
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    with pytest.raises(ValueError, match=f"run.json: .*{message}"):
        Measured.from_serving_bench(report, "run.json")


def test_no_answered_request_is_an_error_not_one() -> None:
    report = bench_report()
    report["online"] |= {"cpu_seconds": {"server": 36.0}, "answered": 0}
    with pytest.raises(ValueError, match=r"run\.json: online\.answered is 0; expected .* > 0"):
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


@pytest.mark.parametrize(
    ("index", "dim", "m", "tolerance"),
    [
        ("flat", 64, 32, 0.01),
        # HNSW's offsets (int64), levels (int32) and upper layers (4·M/(M-1) B expected) too:
        # 528.1 B at dimension 64, M 32 (layer 0 and the vector alone: 512), 272.3 at 32, 16
        ("hnsw", 64, 32, 0.005),
        ("hnsw", 32, 16, 0.005),
        ("ivfpq", 64, 32, 0.02),
    ],
)
def test_index_bytes_per_item_match_a_serialized_faiss_index(
    index: str, dim: int, m: int, tolerance: float
) -> None:
    n = 3_000
    vectors = np.random.default_rng(0).standard_normal((2 * n, dim)).astype(np.float32)
    built = faiss_index(index, dim, m, vectors)
    built.add(vectors[:n])
    before = len(faiss.serialize_index(built))
    built.add(vectors[n:])
    # what an item more costs (the codebooks and centroids are paid once, whatever the catalog)
    actual = (len(faiss.serialize_index(built)) - before) / n
    assert index_bytes_per_item(index, dim, m) == pytest.approx(actual, rel=tolerance)


def test_the_hnsw_bytes_are_the_ones_serving_counts() -> None:
    from mlsd.serving.index import HNSWConfig, HNSWIndex

    n, dim, m = 5_000, 16, 16
    vectors = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    built = HNSWIndex(HNSWConfig(m=m, ef_construction=40)).build(np.arange(n), vectors)
    # HNSWIndex.memory_bytes: the graph's links, offsets and levels, the vectors, the id map
    planned = index_bytes_per_item("hnsw", dim, m) + 8
    assert built.memory_bytes() / n == pytest.approx(planned, rel=0.005)


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


NALLOCX = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
lib.nallocx.restype, lib.nallocx.argtypes = ctypes.c_size_t, [ctypes.c_size_t, ctypes.c_int]
print(" ".join(str(lib.nallocx(n, 0)) for n in range(1, int(sys.argv[2]) + 1)))
"""


def test_the_size_classes_are_jemallocs() -> None:
    """Against the library's own ``nallocx`` (Debian's redis-server links this one); loaded in
    a process of its own, as it cannot be dlopen-ed into one already running (static TLS)."""
    library = ctypes.util.find_library("jemalloc")
    if library is None:
        reason = "libjemalloc not found (Debian: libjemalloc2, which redis-server depends on)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    top = 1 << 17  # past the 32 KiB a value may take
    env = {**os.environ, "LD_PRELOAD": library}
    done = subprocess.run(
        [sys.executable, "-c", NALLOCX, library, str(top)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    classes = [int(n) for n in done.stdout.split()]
    assert classes == [jemalloc_size_class(n) for n in range(1, top + 1)]
    assert (jemalloc_size_class(1_414), jemalloc_size_class(2_064)) == (1_536, 2_560)


@pytest.mark.parametrize(
    ("list_length", "redis_bytes"),
    [(100, 1_707), (110, 1_953), (119, 1_953), (150, 2_721), (200, 3_233), (300, 4_257)],
)
def test_the_bytes_a_key_follow_the_size_classes_redis_was_measured_at(
    list_length: int, redis_bytes: int
) -> None:
    """used_memory a key measured on redis-server 7.0.15, 5,000 keys of the model version
    ``a22c162c-d03be318`` written by PrecomputedStore for users 1,000,000 to 1,004,999 (the
    live test below measures them again when a server is there)."""
    value = precomputed_value_bytes(list_length, 17, tuple(SOURCE_SECTIONS))
    key = len("mlsd:feed:top:a22c162c-d03be318:1000000")
    assert redis_bytes_per_key(value, key) == pytest.approx(redis_bytes, rel=0.01)


@pytest.fixture
def client(redis_server: str) -> Iterator[redis.Redis]:
    host, port = redis_server.split(":")
    connection = redis.Redis(host=host, port=int(port))
    connection.flushall()
    yield connection
    connection.flushall()
    connection.close()


def used_memory(client: redis.Redis) -> int:
    """Redis's ``used_memory`` but its clients' buffers (a connection's, not the keys')."""
    info = client.info("memory")
    assert isinstance(info, dict)
    return int(info["used_memory"]) - int(info["mem_clients_normal"])


@pytest.mark.integration
@pytest.mark.parametrize("list_length", [10, 100, 110, 150, 200, 300])
def test_the_store_bytes_match_what_redis_uses(client: redis.Redis, list_length: int) -> None:
    n, version = 5_000, "a22c162c-d03be318"
    store = PrecomputedStore(client)
    ids = np.arange(n * list_length, dtype=np.int64).reshape(n, list_length)
    scores = np.ones((n, list_length), dtype=np.float32)
    names = tuple(SOURCE_SECTIONS)

    def write() -> Any:
        return store.write(
            np.arange(1_000_000, 1_000_000 + n), ids, scores, model_version=version,
            sources=np.zeros(ids.shape, dtype=np.int64), source_names=names,
        )  # fmt: skip

    # Once first, so Redis's dicts are as a batch leaves them (the first on a fresh server
    # measured up to 10 B a key more or less: the keyspace's tables mid-rehash)
    write()
    client.flushall()
    before = used_memory(client)
    written = write()
    used = (used_memory(client) - before) / n
    value = precomputed_value_bytes(list_length, len(version), names)
    assert written.n_bytes == n * value  # the plan's value size is the writer's
    key = store.key(1_999_999, version)  # as long as any key written
    assert len(key) == precomputed_key_chars(2_000_000, len(version))
    # jemalloc's size classes: a list of 150 items (2,058 B) costs 39% more a key than one of
    # 119 (1,655 B), for 24% more bytes; a constant beyond the value was 18% under at 150
    assert redis_bytes_per_key(value, len(key)) == pytest.approx(used, rel=0.02)
