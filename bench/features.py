"""Feature benchmark: batch feature throughput, materialization, online read latency.

Prints one JSON document (progress goes to stderr):

- ``batch``: rows/s of :func:`mlsd.features.batch.training_features` for ``--rows`` (user, item,
  label_ts) rows sampled from the views of a simulated world (20K users, 5K items, 10M events).
- ``online.<store>`` for SQLite and Redis (a ``redis-server`` started here on a free loopback
  port): materialization seconds, then p50/p99 in ms of one user's Feast read, of one request's
  full feature assembly (1 user + ``--candidates`` items: user read, item cache, derive), and the
  baseline: the same candidates hydrated through Feast's ``get_online_features`` directly.

    .venv/bin/python bench/features.py                       # the full run
    .venv/bin/python bench/features.py --rows 100000 --events 1000000   # a quick run
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mlsd.data.schema import EVENTS_FILE
from mlsd.data.sources.synthetic import WorldConfig, synthesize
from mlsd.features import batch
from mlsd.features.definitions import FeatureConfig, feature_set
from mlsd.features.online import OnlineFeatures
from mlsd.features.store import FeatureStoreConfig, apply, generate_repo, materialize, open_store

TARGET_ASSEMBLY_P99_MS = 2.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentiles_ms(fn: Callable[[int], object], n: int) -> dict[str, float]:
    """p50/p99/mean of ``fn(i)`` for i in range(n), after 50 warm-up calls; in ms."""
    for i in range(50):
        fn(i)
    times = np.empty(n)
    gc.collect()
    for i in range(n):
        start = time.perf_counter()
        fn(i)
        times[i] = time.perf_counter() - start
    ms = times * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "n": n,
    }


def sample_rows(world: Path, n_rows: int, seed: int) -> pd.DataFrame:
    """``n_rows`` (user_id, item_id, label_ts) drawn from the world's views."""
    table = pq.read_table(world / EVENTS_FILE, columns=["user_id", "item_id", "ts", "event"])
    views = table.filter(pc.equal(table["event"], "view"))
    rng = np.random.default_rng(seed)
    take = rng.choice(views.num_rows, size=min(n_rows, views.num_rows), replace=False)
    rows = views.take(np.sort(take)).select(["user_id", "item_id", "ts"]).to_pandas()
    return rows.rename(columns={"ts": "label_ts"})


def bench_batch(world: Path, config: FeatureConfig, n_rows: int) -> dict[str, Any]:
    rows = sample_rows(world, n_rows, seed=0)
    log(f"batch: training_features for {len(rows):,} rows")
    start = time.perf_counter()
    out = batch.training_features(world, rows, config, progress=False)
    seconds = time.perf_counter() - start
    return {
        "rows": len(out),
        "features": len(feature_set(config).features),
        "seconds": seconds,
        "rows_per_second": len(out) / seconds,
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@contextlib.contextmanager
def redis_server() -> Iterator[str | None]:
    """A throwaway redis-server; yields its connection string (None when not installed)."""
    import redis

    binary = os.environ.get("MLSD_REDIS_SERVER") or shutil.which("redis-server")
    if not binary:
        yield None
        return
    port = free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([binary, *args, "--daemonize", "no"], stdout=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        for _ in range(500):
            with contextlib.suppress(redis.exceptions.ConnectionError):
                if client.ping():
                    break
            time.sleep(0.02)
        yield f"127.0.0.1:{port}"
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)


def bench_online(
    world: Path,
    repo: Path,
    config: FeatureConfig,
    store_config: FeatureStoreConfig,
    *,
    as_of: pd.Timestamp,
    candidates: int,
    requests: int,
    compare_engines: bool = False,
) -> dict[str, Any]:
    features = feature_set(config)
    generate_repo(repo, features, store_config)
    apply(repo)
    log(f"{store_config.online_store}: materializing as of {as_of}")
    report = materialize(world, repo, as_of=as_of, config=config)
    feast_engine: dict[str, float] = {}
    if compare_engines:  # FeatureStore.materialize through Feast's Dask file offline store
        log(f"{store_config.online_store}: materializing again with engine='feast'")
        slow = materialize(world, repo, as_of=as_of, config=config, engine="feast")
        feast_engine = {"feast_engine_load_seconds": slow.materialize_seconds}
    online = OnlineFeatures(repo, config)
    start = time.perf_counter()
    n_items = online.refresh_item_cache()
    refresh_seconds = time.perf_counter() - start

    users = pq.read_table(repo / "data" / "users.parquet", columns=["user_id"])
    user_ids = users.column(0).to_numpy()
    item_ids = pq.read_table(repo / "data" / "items.parquet", columns=["item_id"])
    all_items = item_ids.column(0).to_numpy()
    rng = np.random.default_rng(1)
    request_users = rng.choice(user_ids, size=requests + 50)
    request_items = [rng.choice(all_items, size=candidates, replace=False) for _ in range(20)]

    store = open_store(repo)
    user_refs = [f"user_static:{n}" for n in features.names("user_static")]
    user_refs += [f"user_dynamic:{n}" for n in features.names("user_dynamic")]
    item_refs = [f"item_history:{n}" for n in features.names("item")]

    def user_read(i: int) -> object:
        rows = {"user_id": [int(request_users[i])]}
        return store.get_online_features(features=user_refs, entity_rows=rows).to_dict()

    def assembly(i: int) -> object:
        ids = request_items[i % len(request_items)]
        return online.get_online_features(int(request_users[i]), ids, now=as_of)

    def feast_items(i: int) -> object:
        rows = {"item_id": request_items[i % len(request_items)].tolist()}
        return store.get_online_features(features=item_refs, entity_rows=rows).to_dict()

    log(f"{store_config.online_store}: {requests} requests")
    assembled = percentiles_ms(assembly, requests)
    baseline = percentiles_ms(feast_items, max(requests // 10, 100))
    return {
        "materialize": {
            "users": report.n_users,
            "items": report.n_items,
            "snapshot_seconds": report.snapshot_seconds,
            "load_seconds": report.materialize_seconds,
            "seconds": report.seconds,
            **feast_engine,
        },
        "item_cache_refresh": {"items": n_items, "seconds": refresh_seconds},
        "user_read": percentiles_ms(user_read, requests),
        "request_assembly": {"candidates": candidates, **assembled},
        "baseline_feast_items": {"candidates": candidates, **baseline},
        "baseline_over_assembly_p50": baseline["p50_ms"] / assembled["p50_ms"],
        "assembly_p99_meets_target": assembled["p99_ms"] <= TARGET_ASSEMBLY_P99_MS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="training rows to compute")
    parser.add_argument("--events", type=int, default=10_000_000, help="simulated world events")
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=5_000)
    parser.add_argument("--candidates", type=int, default=500, help="items per request")
    parser.add_argument("--requests", type=int, default=2_000, help="timed requests per store")
    parser.add_argument("--world", type=Path, help="reuse (or keep) the simulated world here")
    parser.add_argument(
        "--compare-engines",
        action="store_true",
        help="also time materialize(engine='feast') (Feast's Dask offline store) on SQLite",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mlsd-bench-features-") as tmp:
        world = args.world or Path(tmp) / "world"
        world_config = WorldConfig(n_users=args.users, n_items=args.items, n_events=args.events)
        synth_seconds = None
        if not (world / EVENTS_FILE).is_file():
            log(f"simulating {args.events:,} events into {world}")
            start = time.perf_counter()
            synthesize(world_config, world, progress=False)
            synth_seconds = time.perf_counter() - start
        config = batch.feature_config_for(world)
        as_of = pd.Timestamp(world_config.end_us, unit="us", tz="UTC")
        result: dict[str, Any] = {
            "benchmark": "features",
            "machine": {"cpus": os.cpu_count()},
            "world": {
                "users": args.users,
                "items": args.items,
                "events": args.events,
                "categories": len(config.categories),
                "history_len": config.history_len,
                "windows_days": list(config.windows_days),
                "synth_seconds": synth_seconds,
            },
            "batch": bench_batch(world, config, args.rows),
            "online": {},
            "targets": {"request_assembly_p99_ms": TARGET_ASSEMBLY_P99_MS},
        }
        kwargs: dict[str, Any] = {
            "as_of": as_of,
            "candidates": args.candidates,
            "requests": args.requests,
        }
        result["online"]["sqlite"] = bench_online(
            world,
            Path(tmp) / "repo-sqlite",
            config,
            FeatureStoreConfig(),
            compare_engines=args.compare_engines,
            **kwargs,
        )
        with redis_server() as connection:
            if connection is None:
                result["online"]["redis"] = {"skipped": "redis-server not found"}
            else:
                store_config = FeatureStoreConfig(online_store="redis", redis_connection=connection)
                result["online"]["redis"] = bench_online(
                    world, Path(tmp) / "repo-redis", config, store_config, **kwargs
                )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
