"""Events benchmark: what one large ``POST /v1/events`` batch does to the recommendations
served meanwhile, with the push in a child process (``[feature_store] push_process``, the
default) and in the serving process.

Prints one JSON document (progress goes to stderr).

1. **Build** (cached under ``--cache``) a feed system with the project's CLI, as
   ``bench/serving.py`` does (its :func:`build`: ``mlsd data synth`` → validate → split →
   features apply/materialize → ``mlsd feed train --config``), on a smaller world by default
   (5,000 items, 20,000 users, 500,000 events: what ``make demo`` serves, with fewer events).
2. **Rounds**: for each of ``--rounds``, each mode in turn (their order alternates between
   rounds, so neither always runs on a warmer machine): ``mlsd feed serve --model`` with
   ``--push-process`` or ``--no-push-process`` in its own process; once ready, an open-loop load
   of online recommendations (``precomputed=false``, users with history) at ``--rate`` for
   ``--seconds``, sent at times ``i / rate`` whatever the answers; ``--post-at`` seconds in, a
   batch of ``--batch`` events for as many new users (so every event is a user's
   read-modify-write) is POSTed from another thread.

Latency is the answer's arrival minus the request's scheduled send time, so a server that
stalls is not hidden by a client waiting for it (no coordinated omission). Per mode and round:
the POST's seconds and answer; the p50/p99/max latency of the requests scheduled before the
POST, after ``--warmup`` seconds in which the client opens its connections ("baseline"), and
of those scheduled while it was in flight ("during"); the ratio of the two medians. The
summary gives each mode's medians over rounds and the ratio of the modes' "during" p50 and max.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow.parquet as pq

from mlsd.serving.process import free_port, mlsd_command, running_service

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import build, log, percentiles_ms  # bench/serving.py: the same build, stats

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "feed-demo.toml"
MODES = {"push_process": "--push-process", "in_process": "--no-push-process"}


def percentiles(latencies: list[float]) -> dict[str, float | None]:
    """p50/p95/p99/max in ms of ``latencies`` (seconds; ``inf`` = no answer), as
    ``bench/serving.py`` reports them, and how many."""
    return {**percentiles_ms([latency * 1000.0 for latency in latencies]), "n": len(latencies)}


def open_loop(
    url: str, users: list[int], *, rate: float, seconds: float, timeout: float
) -> tuple[float, list[tuple[float, float]]]:
    """``GET`` recommendations at times ``start + i / rate`` from a pool of threads (one per
    request in flight, up to 64); returns ``start`` and ``(scheduled, latency)`` per request
    (latency ``inf`` when it failed or timed out)."""
    n = int(rate * seconds)
    records: list[tuple[float, float]] = [(0.0, float("inf"))] * n
    start = time.perf_counter() + 0.2
    next_index = 0
    lock = threading.Lock()

    def worker() -> None:
        nonlocal next_index
        with httpx.Client(timeout=timeout) as client:
            while True:
                with lock:
                    i = next_index
                    next_index += 1
                if i >= n:
                    return
                scheduled = start + i / rate
                time.sleep(max(0.0, scheduled - time.perf_counter()))
                user = users[i % len(users)]
                try:
                    answer = client.get(f"{url}/v1/recommendations/{user}?k=10&precomputed=false")
                    ok = answer.status_code == 200
                except httpx.HTTPError:
                    ok = False
                records[i] = (scheduled, time.perf_counter() - scheduled if ok else float("inf"))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return start, records


def one_round(
    args: argparse.Namespace, built: dict[str, Any], mode: str, users: list[int], first_id: int
) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = mlsd_command(
        "feed", "serve", "--dataset", built["world"], "--config", built["config"],
        "--model", built["model"], "--port", str(port), "--no-log", MODES[mode],
        "--base-dir", str(args.cache / "run"),
    )  # fmt: skip
    output = args.cache / "run" / f"serve-{mode}.log"
    with running_service(command, url=url, output=output):
        for user in users[:20]:  # warm the model's caches
            httpx.get(f"{url}/v1/recommendations/{user}?k=10&precomputed=false", timeout=30)
        now = int(time.time()) - 60
        rng = np.random.default_rng(first_id)
        events = [
            {"user_id": first_id + i, "item_id": int(item), "event": "click", "ts": now}
            for i, item in enumerate(rng.integers(0, args.items, args.batch))
        ]
        posted: dict[str, Any] = {}

        def post() -> None:
            time.sleep(args.post_at)
            begin = time.perf_counter()
            answer = httpx.post(f"{url}/v1/events", json=events, timeout=600)
            posted.update(
                begin=begin, end=time.perf_counter(), status=answer.status_code, body=answer.json()
            )

        # The load generator's own full garbage collections, triggered by the rounds' garbage,
        # paused its threads for ~0.5 s at the same point of every fifth round: a pause of
        # the client's, measured as the server's. Collected and frozen here, they do not run.
        gc.collect()
        gc.freeze()
        poster = threading.Thread(target=post)
        poster.start()
        start, records = open_loop(url, users, rate=args.rate, seconds=args.seconds, timeout=60.0)
        poster.join()
    warm = start + args.warmup  # the client's threads open their connections first
    before = [lat for t, lat in records if warm <= t < posted["begin"]]
    during = [lat for t, lat in records if posted["begin"] <= t < posted["end"]]
    base, hit = percentiles(before), percentiles(during)
    base_p50, hit_p50 = base.get("p50"), hit.get("p50")
    result = {
        "mode": mode,
        "post_seconds": round(posted["end"] - posted["begin"], 3),
        "post_status": posted["status"],
        "post_answer": posted["body"],
        "baseline_ms": base,
        "during_ms": hit,
        "p50_during_over_baseline": (
            round(hit_p50 / base_p50, 2) if hit_p50 and base_p50 else None
        ),
    }
    log(f"  {mode}: {json.dumps(result)}")
    return result


def known_users(world: Path, n: int, seed: int) -> list[int]:
    users = pq.read_table(world / "events.parquet", columns=["user_id"]).column("user_id")
    unique = np.unique(users.to_numpy())
    return [int(u) for u in np.random.default_rng(seed).choice(unique, n, replace=False)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=5_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "mlsd-bench-events"
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=10_000, help="events (new users) POSTed")
    parser.add_argument("--rate", type=float, default=50.0, help="recommendations/s")
    parser.add_argument("--seconds", type=float, default=12.0, help="of load per round")
    parser.add_argument("--post-at", type=float, default=3.0, help="seconds into the load")
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="first seconds of load left out of the baseline"
    )
    args = parser.parse_args(argv)
    args.skip_build = False
    built = build(args)
    users = known_users(Path(built["world"]), 500, args.seed)
    rounds = []
    first_id = 10**9
    for r in range(args.rounds):
        order = list(MODES) if r % 2 == 0 else list(MODES)[::-1]
        for mode in order:
            log(f"round {r + 1}/{args.rounds}: {mode}")
            rounds.append(one_round(args, built, mode, users, first_id))
            first_id += args.batch  # new users every time: each event a read-modify-write
    summary: dict[str, Any] = {}
    for mode in MODES:
        mine = [r for r in rounds if r["mode"] == mode]
        summary[mode] = {
            key: statistics.median(r[part][stat] for r in mine)
            for key, part, stat in (
                ("baseline_p50_ms", "baseline_ms", "p50"),
                ("during_p50_ms", "during_ms", "p50"),
                ("during_p99_ms", "during_ms", "p99"),
                ("during_max_ms", "during_ms", "max"),
            )
            if all(r[part].get(stat) is not None for r in mine)
        } | {"post_seconds": statistics.median(r["post_seconds"] for r in mine)}
    a, b = summary["in_process"], summary["push_process"]
    for stat in ("during_p50_ms", "during_max_ms"):
        if stat in a and stat in b:
            summary[f"{stat}_in_process_over_push_process"] = round(a[stat] / b[stat], 1)
    settings = {k: v for k, v in vars(args).items() if k != "skip_build"}
    print(json.dumps({"settings": settings, "build": built, "rounds": rounds,
                      "summary": summary}, indent=2, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
