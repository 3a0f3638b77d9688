"""Precomputed-predictions benchmark: batch write throughput and read latency against Redis.

Prints one JSON document (the progress bar goes to stderr). A ``redis-server`` is started on a
free loopback port (nothing persisted) and stopped at the end. Top-``k`` lists for ``--users``
users are random ids and scores: this measures the store (serialisation, pipelining, Redis),
not a model.

Reported: write users/s end to end (validation, serialisation and the pipelined SETs), bytes
per value and Redis ``used_memory``; latency of single ``lookup`` calls and of ``lookup_many``
of ``--batch`` users (one MGET + decode), p50/p99 in ms over ``--reads`` calls after a warm-up.
The target of 2,000 users/s is batch prediction's, model included (``bench/serving.py``
measures it end to end); this bench reports the share of that budget the store's writes take.

    .venv/bin/python bench/batch_predict.py                   # 200K users x top-100, ~1 min
    .venv/bin/python bench/batch_predict.py --users 20000 --reads 500
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import redis

from mlsd.serving.precomputed import PrecomputedStore

TARGET_USERS_PER_S = 2_000.0
"""Batch prediction's target, model included; the store's writes take a share of it."""
MODEL_VERSION = "bench-ranker:1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@contextlib.contextmanager
def redis_server() -> Iterator[redis.Redis]:
    """A throwaway redis-server on a free loopback port; yields a client; stops it on exit."""
    binary = os.environ.get("MLSD_REDIS_SERVER") or shutil.which("redis-server")
    if not binary:
        sys.exit("redis-server not found: install it or set MLSD_REDIS_SERVER to its path")
    port = free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([binary, *args, "--daemonize", "no"], stdout=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        deadline = time.monotonic() + 10.0
        while True:
            with contextlib.suppress(redis.exceptions.ConnectionError):
                if client.ping():
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"redis-server on port {port} did not answer PING")
            time.sleep(0.02)
        yield client
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)


def random_lists(n_users: int, k: int, seed: int) -> tuple[Any, Any, Any]:
    """(n,) user ids, (n, k) item ids and (n, k) float32 scores sorted best first."""
    rng = np.random.default_rng(seed)
    user_ids = np.arange(n_users, dtype=np.int64)
    item_ids = rng.integers(0, 1_000_000, size=(n_users, k), dtype=np.int64)
    scores = -np.sort(-rng.random((n_users, k), dtype=np.float32), axis=1)
    return user_ids, item_ids, scores


def latency_ms(call: Callable[[], object], repeats: int, warmup: int = 50) -> dict[str, float]:
    """p50/p99/mean wall-clock milliseconds of ``call`` over ``repeats`` runs."""
    for _ in range(warmup):
        call()
    times = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        call()
        times[i] = time.perf_counter() - start
    times *= 1e3
    p50, p99 = np.percentile(times, [50, 99])
    return {"p50_ms": float(p50), "p99_ms": float(p99), "mean_ms": float(times.mean())}


def run(args: argparse.Namespace) -> dict[str, Any]:
    user_ids, item_ids, scores = random_lists(args.users, args.k, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    with redis_server() as client:
        store = PrecomputedStore(client, prefix="bench:top")
        stats = store.write(
            user_ids, item_ids, scores, model_version=MODEL_VERSION, chunk=args.chunk, progress=True
        )
        memory = client.info("memory")
        singles = iter(rng.choice(user_ids, size=args.reads + 50).tolist())
        batches = iter(rng.choice(user_ids, size=(args.reads + 50, args.batch)))
        single = latency_ms(
            lambda: store.lookup(next(singles), model_version=MODEL_VERSION), args.reads
        )
        many = latency_ms(
            lambda: store.lookup_many(next(batches), model_version=MODEL_VERSION), args.reads
        )
        reasons = {
            f.reason for f in store.lookup_many(user_ids[:1000], model_version=MODEL_VERSION)
        }
    return {
        "users": args.users,
        "k": args.k,
        "chunk": args.chunk,
        "write": {
            "seconds": round(stats.seconds, 3),
            "users_per_s": round(stats.users_per_s, 1),
            "bytes_per_user": round(stats.n_bytes / stats.n_users, 1),
            "redis_used_memory_mb": round(int(memory["used_memory"]) / 2**20, 1),  # type: ignore[index]
        },
        "read_single": {k: round(v, 4) for k, v in single.items()},
        f"read_many_{args.batch}": {k: round(v, 4) for k, v in many.items()},
        "all_hits": reasons == {"hit"},
        "batch_prediction_budget": {
            "users_per_s": TARGET_USERS_PER_S,
            # of each second of a batch job at the target rate, the store's writes take this
            "store_share": round(TARGET_USERS_PER_S / stats.users_per_s, 4),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--chunk", type=int, default=10_000, help="users per pipeline round trip")
    parser.add_argument("--reads", type=int, default=2_000, help="timed calls per read kind")
    parser.add_argument("--batch", type=int, default=100, help="users per lookup_many")
    parser.add_argument("--seed", type=int, default=0)
    print(json.dumps(run(parser.parse_args()), indent=2))


if __name__ == "__main__":
    main()
