"""Serving benchmark: the feed service under open-loop load, online and precomputed paths.

Prints one JSON document (progress goes to stderr). Everything runs as separate processes on
loopback, as in production:

1. **Build** a feed system on a simulated catalog (1M items by default) with the project's CLI,
   exactly as ``make demo`` does (``mlsd data synth`` → validate → split → ``mlsd feed features
   apply/materialize`` → ``mlsd feed train --config configs/feed-demo.toml``, or ``--config``;
   no registry: the service gets ``--model``). Each step's wall and CPU seconds and peak
   memory are reported.
   The build is cached under ``--cache`` keyed by its parameters and the config's hash; a failed
   build stops with its command, time and output tail and resumes at that step next time. The
   JSON's ``pipeline`` records that config (path, hashes, sources, ranker, the ranker served),
   which ``mlsd plan capacity`` compares with the config it plans for.
2. **Batch prediction** into a throwaway ``redis-server`` (``bench/batch_predict.py``'s):
   ``mlsd feed batch-predict --users N --processes P`` (``--batch-processes``, default 2: one
   model load, P one-thread workers forked from it; 1: one process with two threads), as
   ``--batch-shards`` such commands at once (``--shard i/N``, each loading the model); users/s
   over the time from the first shard's first prediction to the last one's last, with the
   shards' overlap. Before it, on the same idle server, what the online feature store costs a
   user and an item in Redis (``mlsd.features.footprint``: 5,000 of each written from the
   world's feature repository through Feast, ``used_memory`` over the second half written; the
   keys are deleted): ``feature_store`` in the JSON, which ``mlsd plan capacity`` reads.
3. **The service**: ``mlsd feed serve --model --redis --port --base-dir RUN`` in its own process
   (its service log goes to the run directory), ready when ``/readyz`` answers 200 from a socket
   that process holds (a port another process answers on is not mistaken for ours). With
   ``--replicas N``, N such processes, each with its own model, log directory and core; CPU is
   their sum. ``--balancer reuse-port`` (default): they share the port and the kernel spreads
   the connections; ``nginx``: each listens on a port of its own behind nginx on the service
   port (``mlsd.serving.balancer``: each request to the replica with the fewest in flight),
   whose CPU is reported as ``balancer``.
4. **Load** from another process (this file with ``--load-worker``, a minimal HTTP/1.1 client on
   asyncio streams over ``--connections`` keep-alive connections opened first):
   ``GET /v1/recommendations/{user}?k=10&precomputed=`` sent at times ``i / rate`` whatever the
   answers (open loop), at most ``--max-inflight`` at once; a request that finds no free
   connection within ``--timeout`` is an error (``late``), as is a timeout or a non-200. Latency
   is the answer's arrival minus the SCHEDULED send time (no coordinated omission; a thread
   keeps the schedule, so the event loop's millisecond timers do not make the client late);
   requests without an answer count as infinitely slow, so a percentile they reach is ``null``.
   After each phase the harness waits until an online request is fast again (:func:`drain`):
   requests the client gave up on still run in the server's threads.

Phases (``--phases``, default all), each after ``--warmup`` seconds at the same rate: the
precomputed path at ``--rate`` (users batch-predict wrote; every answer should say path
``precomputed``), the online path at ``--rate`` (``precomputed=false``; users with events
plus ``--unknown-frac`` unknown ids), then the online path at each of ``--max-rate-steps``
until one fails and ``--bisect`` rates between: the highest rate with p99 <= 50 ms and fewer
than 0.1% of the requests failed or degraded (answered by another path or a fallback) is the
maximum throughput (a lower bound when no step failed: ``bounded`` false). Each phase reports
p50/p95/p99/max latency, offered and achieved requests/s, errors by kind, the answers' ``path``
and ``fallbacks``, p50/p99 of each stage of their ``stage_ms``, the CPU cores used over the
schedule by the server (with its log writer and monitor children, also shown apart), Redis,
the balancer and the load generator, the whole machine's (busy, stolen by the hypervisor, and
busy in no measured process), and the client's lag behind its schedule: a reader can tell
whether the client or the machine distorted the result.

Targets (2 CPU cores): online p99 <= 10 ms at 200 requests/s with 0 errors and every answer
online, without a fallback; precomputed p99 <= 3 ms; batch prediction >= 2,000 users/s.
Latencies depend on what else the machine runs: the load average at the start and the end is
reported. httpx (``--client httpx``) measured
about 2 ms of client CPU per request against ~0.3 ms for the raw client, and fell behind its
schedule on a busy machine, hence the raw client by default.

    .venv/bin/python bench/serving.py --out serving.json      # 1M items, 20K users, 4M events
    # the build: ~50 min once (cached; train is 45 of them); then ~8 min per run
    .venv/bin/python bench/serving.py --items 20000 --users 5000 --events 500000 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import contextlib
import dataclasses
import gc
import hashlib
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, Protocol

import numpy as np
import uvloop

from mlsd.config import load_feed_config
from mlsd.features.footprint import redis_bytes_per_entity
from mlsd.plan.pipeline import Pipeline
from mlsd.serving.balancer import Nginx

CONFIG = Path("configs/feed-demo.toml")
TARGETS = {"online_p99_ms": 10.0, "precomputed_p99_ms": 3.0, "batch_users_per_s": 2_000.0}
MAX_THROUGHPUT_P99_MS = 50.0
MAX_ERRORS = 0.001
PERCENTILES = (50, 95, 99, 100)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- open-loop load (worker side)


def schedule(rate: float, seconds: float, *, poisson: bool = False, seed: int = 0) -> np.ndarray:
    """Send times in seconds from the start for ``rate`` requests/s over ``seconds``: evenly
    spaced, or a Poisson process (exponential gaps) with ``poisson``."""
    n = round(rate * seconds)
    if not poisson:
        return np.arange(n, dtype=np.float64) / rate
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=2 * n + 100)
    times: np.ndarray = np.cumsum(gaps) - gaps[0]
    return times[times < seconds]


class Sender(Protocol):
    async def get(self, target: str) -> tuple[int, bytes]: ...

    async def close(self) -> None: ...


class RawSender:
    """HTTP/1.1 GETs over keep-alive asyncio streams; a connection is used by one request at a
    time (the caller bounds concurrency) and dropped after any error or cancellation.

    Idle connections are reused oldest first, so the load spreads over every connection
    opened (as over many clients) instead of riding the one or two most recent: with
    ``--replicas`` the kernel assigns each connection to one replica, and a few busy
    connections could put most of the load on one of them."""

    IDLE_S = 3.0  # uvicorn closes a keep-alive connection idle for 5 s: never reuse one that old

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._idle: collections.deque[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]]
        self._idle = collections.deque()

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while self._idle:
            reader, writer, since = self._idle.popleft()
            if time.monotonic() - since < self.IDLE_S:
                return reader, writer
            writer.close()
        return await asyncio.open_connection(self.host, self.port)

    async def open(self, n: int) -> None:
        """Open ``n`` connections before the load starts, as ``n`` clients would hold: each
        replica gets the connections the kernel hashes to it, so a handful of connections
        (what a load this light opens on demand) can split the requests 60/40 or worse."""
        for _ in range(n):
            reader, writer = await asyncio.open_connection(self.host, self.port)
            self._idle.append((reader, writer, time.monotonic()))

    async def get(self, target: str) -> tuple[int, bytes]:
        reader, writer = await self._connection()
        try:
            writer.write(f"GET {target} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            found = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            if found is None:
                raise ValueError(f"response without Content-Length: {head[:200]!r}")
            body = await reader.readexactly(int(found.group(1)))
        except BaseException:
            writer.close()
            raise
        if re.search(rb"(?i)\r\nconnection:\s*close", head):
            writer.close()
        else:
            self._idle.append((reader, writer, time.monotonic()))
        return int(head[9:12]), body

    async def close(self) -> None:
        for _, writer, _ in self._idle:
            writer.close()


class HttpxSender:
    """The same through ``httpx.AsyncClient`` (to compare the client's own overhead)."""

    def __init__(self, host: str, port: int, connections: int) -> None:
        import httpx

        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self.client = httpx.AsyncClient(base_url=f"http://{host}:{port}", limits=limits)

    async def get(self, target: str) -> tuple[int, bytes]:
        response = await self.client.get(target)
        return response.status_code, response.content

    async def close(self) -> None:
        await self.client.aclose()


async def drive(spec: dict[str, Any]) -> dict[str, Any]:
    """Send the schedule in ``spec`` open loop; one record per request (offsets in seconds)."""
    host, port = spec["host"], spec["port"]
    sender: Sender = (
        RawSender(host, port)
        if spec["client"] == "raw"
        else HttpxSender(host, port, spec["max_inflight"])
    )
    if isinstance(sender, RawSender):
        await sender.open(min(spec.get("connections", 0), spec["max_inflight"]))
    send_at = schedule(spec["rate"], spec["seconds"], poisson=spec["poisson"], seed=spec["seed"])
    users = np.random.default_rng(spec["seed"]).choice(spec["users"], size=len(send_at))
    slots = asyncio.Semaphore(spec["max_inflight"])
    timeout = spec["timeout"]
    records: list[dict[str, Any]] = []
    clock = time.perf_counter  # not loop.time(): uvloop's clock ticks in whole milliseconds
    # the CPU of the measured processes over the schedule itself, not this process's start-up
    roots: dict[str, list[int]] = spec.get("cpu_pids", {})
    cpu0, ticks0 = cpu_by_process(roots), machine_ticks()
    self0, wall0 = time.process_time(), clock()
    start = clock() + 0.05
    steal = StealSampler(clock)
    steal.start()

    async def one(at: float, user: int) -> None:
        # the client's own lag (event loop busy or starved of CPU), not the wait for a connection
        record: dict[str, Any] = {"at": at, "lag_ms": (clock() - start - at) * 1e3}
        records.append(record)
        try:
            await asyncio.wait_for(slots.acquire(), start + at + timeout - clock())
        except TimeoutError:
            record["error"] = "late"
            return
        try:
            target = f"/v1/recommendations/{user}?k={spec['k']}&precomputed={spec['precomputed']}"
            status, body = await asyncio.wait_for(
                sender.get(target), start + at + timeout - clock()
            )
            record["done"] = clock() - start
            record["latency_ms"] = (record["done"] - at) * 1e3
            if status != 200:
                record["error"] = f"status {status}"
            else:
                answer = json.loads(body)
                record["path"], record["stage_ms"] = answer["path"], answer["stage_ms"]
                record["fallbacks"] = answer["fallbacks"]
        except TimeoutError:
            record["error"] = "timeout"
        except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
            record["error"] = type(exc).__name__
        finally:
            slots.release()

    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []
    launched = asyncio.Event()

    def launch(at: float, user: int) -> None:
        tasks.append(loop.create_task(one(at, user)))

    def tick() -> None:
        """The schedule in a thread: ``time.sleep`` wakes within tens of microseconds, while
        the event loop's timers (``asyncio.sleep``) fire up to a millisecond late (epoll's
        timeout is in whole milliseconds, rounded up), which every latency would include."""
        for at, user in zip(send_at.tolist(), users.tolist(), strict=True):
            delay = start + at - clock()
            if delay > 0:
                time.sleep(delay)
            loop.call_soon_threadsafe(launch, at, user)
        loop.call_soon_threadsafe(launched.set)

    ticker = threading.Thread(target=tick, name="schedule", daemon=True)
    ticker.start()
    await launched.wait()
    await asyncio.gather(*tasks)
    ticker.join()
    wall, own = clock() - wall0, time.process_time() - self0
    steal.stop()
    cpu1, ticks1 = cpu_by_process(roots), machine_ticks()
    await sender.close()
    for record in records:
        if "done" in record:
            record["steal_ticks"] = steal.during(start + record["at"], start + record["done"])
    return {
        "records": records,
        "client_cpu_s": own,
        "client_wall_s": wall,
        "cpu_s": {name: cpu_used(cpu0[name], cpu1[name], pids) for name, pids in roots.items()},
        "machine_ticks": [ticks0, ticks1],
    }


class StealSampler:
    """The machine's steal counter (``/proc/stat``: time a vCPU was ready to run while the
    hypervisor ran something else) every ``interval_s`` in a thread, so each request can be
    told whether the host took the machine away during it. The counter moves in clock ticks
    (10 ms), so a shorter theft may show only in a later sample; ~50 µs of CPU a sample."""

    def __init__(self, clock: Callable[[], float], interval_s: float = 0.005) -> None:
        self.clock, self.interval_s = clock, interval_s
        self.times: list[float] = []
        self.ticks: list[int] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steal", daemon=True)

    def _run(self) -> None:
        while not self._done.is_set():
            self.times.append(self.clock())
            self.ticks.append(machine_ticks()["steal"])
            time.sleep(self.interval_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def during(self, begin: float, end: float) -> int:
        """Steal ticks counted from the last sample before ``begin`` to the first after
        ``end`` (0 when the samples do not cover the span)."""
        if not self.times:
            return 0
        first = max(bisect.bisect_right(self.times, begin) - 1, 0)
        last = min(bisect.bisect_left(self.times, end), len(self.times) - 1)
        return self.ticks[last] - self.ticks[first]


def load_worker() -> None:
    """``--load-worker``: read a spec (JSON) on stdin, drive it, write the records (JSON) to
    the spec's ``out`` file. Not stdout: that pipe was seen to lose whatever did not fit its
    64 KiB buffer when the records were written after the event loop had run.

    The garbage collector is off while it drives: a collection over the growing records
    paused this process for about 60 ms once a phase, and every request scheduled in the
    pause carried it as latency. Against a trivial server, 200 requests/s for 35 s: client
    lag max 63.6 ms and latency max 69 ms with the collector, 3.2 and 8.3 ms without (a
    separate process timing its own sleeps saw no gap over 5 ms in either run)."""
    spec = json.loads(sys.stdin.read())
    gc.collect()
    gc.disable()  # a 35 s run makes few cycles; its records are freed when it exits
    records = uvloop.run(drive(spec))  # the client's overhead is in every latency
    Path(spec["out"]).write_text(json.dumps(records))


# ---------------------------------------------------------------- the report of one phase


def percentiles_ms(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99/max of ``values`` (ms); ``inf`` (no answer) makes a percentile ``None``."""
    if not values:
        return {}
    # nearest rank, not interpolation: an infinite value (no answer) stays out of the others
    points = np.percentile(np.asarray(values, dtype=np.float64), PERCENTILES, method="inverted_cdf")
    names = ("p50", "p95", "p99", "max")
    return {
        n: (round(float(v), 3) if np.isfinite(v) else None)
        for n, v in zip(names, points, strict=True)
    }


def summarize(
    records: list[dict[str, Any]], warmup: float, seconds: float, *, path: str = "online"
) -> dict[str, Any]:
    """Latency, throughput, errors, paths and stages of the requests scheduled after
    ``warmup``; ``degraded`` counts the answers not on ``path`` or with a fallback."""
    measured = [r for r in records if r["at"] >= warmup]
    latencies = [r["latency_ms"] if "path" in r else float("inf") for r in measured]
    ok = [r for r in measured if "path" in r]
    window = seconds - warmup
    completed = sum(1 for r in ok if warmup <= r["done"] < seconds)
    stages: dict[str, list[float]] = {}
    for r in ok:
        for stage, ms in r["stage_ms"].items():
            stages.setdefault(stage, []).append(ms)
    lags = [r["lag_ms"] for r in measured if "lag_ms" in r]
    return {
        "requests": len(measured),
        "offered_rps": round(len(measured) / window, 1),
        "achieved_rps": round(completed / window, 1),
        "latency_ms": percentiles_ms(latencies),
        "errors": len(measured) - len(ok),
        "error_kinds": dict(Counter(r["error"] for r in measured if "error" in r)),
        "paths": dict(Counter(r["path"] for r in ok)),
        "fallbacks": dict(Counter(f for r in ok for f in r["fallbacks"])),
        "degraded": sum(1 for r in ok if r["path"] != path or r["fallbacks"]),
        "host_steal": _steal_summary(ok),
        "stage_ms": {
            s: {k: v for k, v in percentiles_ms(ms).items() if k in ("p50", "p99")}
            for s, ms in stages.items()
        },
        "client_lag_ms": {k: v for k, v in percentiles_ms(lags).items() if k != "p95"},
    }


def _steal_summary(answered: list[dict[str, Any]]) -> dict[str, Any]:
    """How many answers the hypervisor's steal touched (a steal tick counted between their
    send and their answer), their p99, and the p99 of the others: what the service did
    when it had its vCPUs."""
    touched = [r["latency_ms"] for r in answered if r.get("steal_ticks", 0) > 0]
    clean = [r["latency_ms"] for r in answered if r.get("steal_ticks", 0) <= 0]
    return {
        "answers_touched": len(touched),
        "touched_p99_ms": percentiles_ms(touched).get("p99"),
        "untouched_p99_ms": percentiles_ms(clean).get("p99"),
    }


def passes(phase: dict[str, Any], p99_ms: float, error_rate: float) -> bool:
    """p99 within ``p99_ms``, and fewer than ``error_rate`` of the requests failed or were
    answered degraded (another path, a fallback: the popular items answering for a failing
    model are no answer of the path measured); none at all when ``error_rate`` is 0."""
    p99 = phase["latency_ms"].get("p99")
    bad = phase["errors"] + phase["degraded"]
    few = bad == 0 if error_rate == 0 else bad < error_rate * phase["requests"]
    return p99 is not None and p99 <= p99_ms and few


# ---------------------------------------------------------------- build


def run_step(name: str, command: list[str], log_path: Path) -> dict[str, float]:
    """Run one CLI step (output to ``log_path``): its wall and CPU seconds and peak memory, or
    exit with a JSON report of the failure (command, seconds, the output's tail)."""
    return run_steps(name, [command], [log_path])[0]


def run_steps(
    name: str, commands: list[list[str]], log_paths: list[Path]
) -> list[dict[str, float]]:
    """:func:`run_step` for several processes at once (e.g. batch-prediction shards): each
    one's wall seconds (from the common start), CPU seconds and peak memory."""
    procs = []
    start = time.perf_counter()
    for command, log_path in zip(commands, log_paths, strict=True):
        log(f"  {name}: {' '.join(command)}")
        with log_path.open("w") as out:
            procs.append(
                subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=_env())
            )
    costs = []
    for proc, command, log_path in zip(procs, commands, log_paths, strict=True):
        _, status, usage = os.wait4(proc.pid, 0)  # wait4: this child's own rusage
        seconds = time.perf_counter() - start
        code = proc.returncode = os.waitstatus_to_exitcode(status)
        cost = {
            "seconds": round(seconds, 1),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),  # ru_maxrss is in KiB on Linux
        }
        if code != 0:
            for other in procs:
                other.kill()
            why = f"killed by signal {-code}" if code < 0 else f"exit {code}"
            fail(
                f"build step {name!r} failed ({why}) after {seconds:.1f} s",
                {"step": name, "command": command, **cost, **tail(log_path)},
            )
        log(f"  {name}: {cost}")
        costs.append(cost)
    return costs


WORLD_STEPS = ("synth", "validate", "split")
FEATURE_STEPS = ("features_apply", "features_materialize")


def _steps_record(path: Path) -> dict[str, dict[str, float]]:
    saved = json.loads(path.read_text()) if path.exists() else {}
    return {  # an early version saved bare seconds
        n: cost if isinstance(cost, dict) else {"seconds": cost} for n, cost in saved.items()
    }


def build(args: argparse.Namespace) -> dict[str, Any]:
    """The world, its feature store and the model, from the cache when built there before.

    Each step is recorded where what it builds is shared: the world's steps (synth, validate,
    split) once per world, for every config; the feature store's under the hash of the
    config's ``[features]`` and ``[feature_store]`` (another config's re-materializes it; the
    same settings reuse it); the model per config hash. So a second ``--config`` trains on the
    cached world instead of rebuilding it, and a rebuilt world drops every record on it.
    """
    config_hash = hashlib.sha256(args.config.read_bytes()).hexdigest()[:10]
    feed = load_feed_config(args.config)
    feature_settings = {
        "features": dataclasses.asdict(feed.features),
        "feature_store": {  # how the service pushes is not what is stored
            k: v
            for k, v in dataclasses.asdict(feed.feature_store).items()
            if k not in ("push_process", "push_timeout_s")
        },
    }
    features_hash = hashlib.sha256(
        json.dumps(feature_settings, sort_keys=True, default=str).encode()
    ).hexdigest()[:10]
    key = f"items{args.items}-users{args.users}-events{args.events}-seed{args.seed}"
    root = args.cache / key
    world, model = root / "world", root / f"model-{config_hash}"
    records = {
        "world": root / "steps-world.json",
        "features": root / "steps-features.json",
        "train": root / f"steps-{config_hash}.json",
    }
    done = _steps_record(records["train"])  # a cache from before the split kept all here
    world_done = _steps_record(records["world"])
    done |= {n: world_done[n] for n in WORLD_STEPS if n in world_done}
    if records["features"].exists():
        saved = json.loads(records["features"].read_text())
        for n in FEATURE_STEPS:
            done.pop(n, None)
            if saved.get("hash") == features_hash and n in saved.get("steps", {}):
                done[n] = saved["steps"][n]
    mlsd = str(Path(sys.executable).with_name("mlsd"))
    feature = ["--dataset", str(world), "--config", str(args.config)]
    steps = {
        "synth": [
            *("data", "synth", "--items", str(args.items), "--users", str(args.users)),
            *("--events", str(args.events), "--seed", str(args.seed), "--days", "60"),
            *("--drift-at", "2024-02-15", "--out", str(world)),
        ],
        "validate": ["data", "validate", str(world)],
        "split": ["data", "split", str(world), "--val-frac", "0.1", "--test-frac", "0.1"],
        "features_apply": ["feed", "features", "apply", *feature],
        "features_materialize": ["feed", "features", "materialize", *feature],
        "train": ["feed", "train", *feature, "--out", str(model)],
    }
    missing = [name for name in steps if name not in done]
    if "synth" in missing:  # a new world: nothing recorded on the old one holds
        missing, done = list(steps), {}
    if missing and args.skip_build:
        sys.exit(f"--skip-build: {root} lacks the steps {missing}; run once without --skip-build")
    root.mkdir(parents=True, exist_ok=True)
    log(f"build in {root} ({'cached' if not missing else 'to run: ' + ', '.join(missing)})")
    for name in missing:
        if name == "synth":
            shutil.rmtree(world, ignore_errors=True)
            for stale in root.glob("steps-*.json"):
                stale.unlink()
        done[name] = run_step(name, [mlsd, *steps[name]], root / f"{name}.log")
        _save_steps(records, done, features_hash)
    return {
        "dir": str(root),
        "config": str(args.config),
        "world": str(world),
        "model": str(model),
        "cached_steps": [n for n in steps if n not in missing],
        "steps": {n: done[n] for n in steps},
        "total_seconds": round(sum(d["seconds"] for d in done.values()), 1),
    }


def _save_steps(
    records: Mapping[str, Path], done: Mapping[str, dict[str, float]], features_hash: str
) -> None:
    """Each finished step into its record (:func:`build`)."""
    records["world"].write_text(
        json.dumps({n: done[n] for n in WORLD_STEPS if n in done}, indent=2)
    )
    features = {n: done[n] for n in FEATURE_STEPS if n in done}
    records["features"].write_text(json.dumps({"hash": features_hash, "steps": features}, indent=2))
    records["train"].write_text(json.dumps({"train": done["train"]} if "train" in done else {}))


# ---------------------------------------------------------------- processes


def _env() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}


def fail(message: str, detail: dict[str, Any]) -> NoReturn:
    """Print the failure as the JSON document (the reader gets where and why) and exit 1."""
    print(json.dumps({"benchmark": "serving", "failed": message, **detail}, indent=2))
    sys.exit(1)


def batch_predict(
    built: dict[str, Any],
    redis_url: str,
    n_users: int,
    run_dir: Path,
    shards: int,
    processes: int,
) -> dict[str, Any]:
    """``mlsd feed batch-predict`` over the first ``n_users``, ``shards`` commands at once
    (``--shard i/N``, each loading the model), each forking ``processes`` one-thread workers
    from its loaded model (``--processes``; 1: two worker threads in the process, or one when
    there are several shards). The rate is the users over the time from the first shard's
    start of prediction to the last one's end (model loads excluded, as in a one-process
    run)."""
    base = [
        str(Path(sys.executable).with_name("mlsd")),
        *("feed", "batch-predict", "--dataset", built["world"], "--config", built["config"]),
        *("--model", built["model"], "--redis", redis_url, "--users", str(n_users)),
        *("--processes", str(processes), "--workers", "2" if shards == 1 else "1"),
    ]
    commands = (
        [base] if shards == 1 else [[*base, "--shard", f"{i}/{shards}"] for i in range(shards)]
    )
    logs = [run_dir / f"batch_predict-{i}.log" for i in range(len(commands))]
    costs = run_steps("batch_predict", commands, logs)
    parts = [_batch_output(path) for path in logs]
    start = min(part["start"] for part in parts)
    seconds = (max(part["end"] for part in parts) - start).total_seconds()
    common = (min(p["end"] for p in parts) - max(p["start"] for p in parts)).total_seconds()
    users = sum(part["users"] for part in parts)
    rate = users / max(seconds, 1e-9)
    # CPU per user moves much less with the machine's load than users/s: 2,000 users/s on 2 cores
    # needs <= 1 ms per user whatever else runs.
    cpu_ms = sum(part["cpu_ms"] * part["users"] for part in parts) / max(users, 1)
    return {
        "users": users,
        "model_version": parts[0]["model_version"],
        "shards": shards,
        "processes_per_shard": processes,
        "users_per_s": round(rate, 1),
        "cpu_ms_per_user": round(cpu_ms, 3),
        "users_per_s_on_2_free_cores_at_most": round(2000 / cpu_ms) if cpu_ms else None,
        "per_shard": [{k: part[k] for k in ("users", "users_per_s", "cpu_ms")} for part in parts],
        # The part of the run during which every shard predicted (1: they ran side by side):
        # shards load the model for different times, so the window's rate above understates
        # what they do together, and the sum of their own rates overstates it a little (each
        # ran alone for a while).
        "shards_overlap": round(max(common, 0.0) / max(seconds, 1e-9), 3),
        "users_per_s_sum_of_shards": round(sum(part["users_per_s"] for part in parts), 1),
        "wall_seconds_with_model_load": max(cost["seconds"] for cost in costs),
        "target_users_per_s": TARGETS["batch_users_per_s"],
        "met": rate >= TARGETS["batch_users_per_s"],
    }


def _batch_output(path: Path) -> dict[str, Any]:
    """What one batch-predict process printed: users, model version, rate, CPU per user and
    the time window of its predictions."""
    text = path.read_text()
    found = re.search(r"([\d,]+) users written for model (\S+) \(([\d,.]+) users/s\)", text)
    cpu = re.search(r"CPU: ([\d.]+) ms per user", text)
    window = re.search(r"predicted from (\S+) to (\S+)", text)
    if found is None or cpu is None or window is None:
        fail("batch-predict printed no rate or window", {"output": text.splitlines()[-20:]})
    assert found is not None
    assert cpu is not None
    assert window is not None
    return {
        "users": int(found.group(1).replace(",", "")),
        "model_version": found.group(2),
        "users_per_s": float(found.group(3).replace(",", "")),
        "cpu_ms": float(cpu.group(1)),
        "start": datetime.fromisoformat(window.group(1)),
        "end": datetime.fromisoformat(window.group(2)),
    }


@contextlib.contextmanager
def service(
    built: dict[str, Any],
    redis_url: str,
    port: int,
    run_dir: Path,
    *,
    wait_s: float,
    replicas: int = 1,
    balancer: str = "reuse-port",
    extra: Sequence[str] = (),
) -> Iterator[tuple[Server, float]]:
    """``mlsd feed serve`` in its own process (``replicas`` > 1: that many, each with its own
    log directory, sharing ``port`` with ``--reuse-port`` or behind nginx on it, each on a
    port of its own), yielded once ``/readyz`` answers 200 on ``port`` and every replica
    listens."""
    procs: list[subprocess.Popen[bytes]] = []
    log_paths: list[Path] = []
    nginx = balancer == "nginx" and replicas > 1
    ports = [port] * replicas
    if nginx:  # a port of its own for each replica, none of them nginx's
        taken = {port}
        for i in range(replicas):
            while ports[i] in taken:
                ports[i] = service_port()
            taken.add(ports[i])
    front: Nginx | None = None
    try:
        for replica, replica_port in enumerate(ports):
            base = run_dir if replicas == 1 else run_dir / f"replica-{replica}"
            base.mkdir(parents=True, exist_ok=True)
            command = [
                str(Path(sys.executable).with_name("mlsd")),
                *("feed", "serve", "--dataset", built["world"], "--config", built["config"]),
                *("--model", built["model"], "--redis", redis_url, "--port", str(replica_port)),
                *("--base-dir", str(base)),  # where the service writes its log: not the repo
                *(["--reuse-port"] if replicas > 1 and not nginx else []),
                *extra,
            ]
            log_path = base / "serve.log"
            log(f"  serve: {' '.join(command)} (log: {log_path})")
            with log_path.open("w") as out:
                procs.append(
                    subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=_env())
                )
            log_paths.append(log_path)
        start = time.perf_counter()
        # uvicorn listens after the model loaded: until then another process could answer here
        while not all(
            _ready(p) and listens(proc.pid, p) for proc, p in zip(procs, ports, strict=True)
        ):
            for proc, log_path in zip(procs, log_paths, strict=True):
                if proc.poll() is not None or time.perf_counter() - start > wait_s:
                    fail("the service did not become ready", {"pid": proc.pid, **tail(log_path)})
            time.sleep(0.25)
        if nginx:
            front = Nginx(("127.0.0.1", port), [("127.0.0.1", p) for p in ports], run_dir / "nginx")
            front.start()
        balancer_pids = front.pids() if front is not None else []
        yield Server(procs, port, log_paths, balancer_pids), time.perf_counter() - start
    finally:
        if front is not None:
            front.stop()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


@dataclasses.dataclass(frozen=True)
class Server:
    procs: list[subprocess.Popen[bytes]]
    port: int
    log_paths: list[Path]
    balancer_pids: list[int] = dataclasses.field(default_factory=list)

    def check_alive(self) -> None:
        for proc, log_path in zip(self.procs, self.log_paths, strict=True):
            if proc.poll() is not None:
                fail(f"the service exited ({proc.returncode})", tail(log_path))


def tail(log_path: Path, lines: int = 40) -> dict[str, Any]:
    return {
        "log": str(log_path),
        "output": log_path.read_text(errors="replace").splitlines()[-lines:],
    }


def service_port() -> int:
    """A free loopback port below the ephemeral range (32768+), where outgoing connections of
    other processes cannot take it while the service loads its model."""
    rng = np.random.default_rng()
    for port in rng.integers(20_000, 32_768, size=200).tolist():
        with (
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock,
            contextlib.suppress(OSError),
        ):
            sock.bind(("127.0.0.1", port))
            return int(port)
    sys.exit("no free port in 20000-32767 on 127.0.0.1")


def listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds the listening socket of ``port`` (/proc/net/tcp)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:  # 0A: LISTEN
            inodes.add(f"socket:[{fields[9]}]")
    with contextlib.suppress(OSError):
        return any(os.readlink(fd) in inodes for fd in Path(f"/proc/{pid}/fd").iterdir())
    return False


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _proc_stats() -> dict[int, tuple[int, float]]:
    """Every process's (parent pid, CPU seconds: user + system, its own and its reaped
    children's) from ``/proc/<pid>/stat``."""
    hz = os.sysconf("SC_CLK_TCK")
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):  # a process that just ended
            fields = stat.read_text().rsplit(")", 1)[1].split()
            ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
            out[int(stat.parent.name)] = (int(fields[1]), ticks / hz)
    return out


def cpu_by_process(roots: Mapping[str, Sequence[int]]) -> dict[str, dict[int, float]]:
    """Each group's processes and their descendants (the service's log writer and monitor
    children), pid → CPU seconds so far: the CPU of a group over a span is
    :func:`cpu_used` of two of these."""
    stats = _proc_stats()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in stats.items():
        children.setdefault(parent, []).append(pid)
    out: dict[str, dict[int, float]] = {}
    for name, pids in roots.items():
        found, todo = {}, [pid for pid in pids if pid in stats]
        while todo:
            pid = todo.pop()
            if pid not in found:
                found[pid] = stats[pid][1]
                todo += children.get(pid, [])
        out[name] = found
    return out


def cpu_used(
    before: Mapping[int, float], after: Mapping[int, float], roots: Sequence[int]
) -> tuple[float, float]:
    """CPU seconds between two :func:`cpu_by_process` samples of one group: (its root
    processes', their descendants'); a process started in between counts from its start."""
    own = sum(after[pid] - before.get(pid, 0.0) for pid in after if pid in roots)
    rest = sum(after[pid] - before.get(pid, 0.0) for pid in after if pid not in roots)
    return own, rest


MACHINE_TICKS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
"""The first eight counters of ``/proc/stat``'s ``cpu`` line, in clock ticks since boot."""


def machine_ticks(stat: str | None = None) -> dict[str, int]:
    """The whole machine's CPU time so far by kind (``/proc/stat``, or ``stat``'s text)."""
    text = Path("/proc/stat").read_text() if stat is None else stat
    line = next(row for row in text.splitlines() if row.startswith("cpu "))
    return dict(zip(MACHINE_TICKS, map(int, line.split()[1:9]), strict=True))


def machine_cores(
    before: dict[str, int], after: dict[str, int], wall: float, accounted_cores: float
) -> dict[str, float]:
    """The machine's cores over a phase: ``busy`` (user, nice, system, irq, softirq),
    ``steal`` (the hypervisor ran something else while a vCPU wanted to run), ``iowait`` and
    ``unaccounted``, the busy cores none of the measured processes (``accounted_cores``, the
    service, Redis, the balancer and the load generator) used: other work on the machine
    competing with the service, which a latency figure alone would hide."""
    hz = os.sysconf("SC_CLK_TCK")
    used = {kind: (after[kind] - before[kind]) / hz / wall for kind in MACHINE_TICKS}
    busy = sum(used[kind] for kind in ("user", "nice", "system", "irq", "softirq"))
    return {
        "busy": round(busy, 3),
        "steal": round(used["steal"], 3),
        "iowait": round(used["iowait"], 3),
        "unaccounted": round(max(busy - accounted_cores, 0.0), 3),
    }


def redis_pids() -> list[int]:
    """The ``redis-server`` this process started (a child of ours), found through /proc."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            comm, rest = stat.read_text().rsplit(")", 1)
            if comm.endswith("(redis-server") and int(rest.split()[1]) == os.getpid():
                return [int(stat.parent.name)]
    return []


# ---------------------------------------------------------------- phases


def request_users(
    world: Path, n_precomputed: int, unknown_frac: float, seed: int
) -> dict[str, Any]:
    """User ids to draw from: ``online`` (warm users, those with events, plus unknown ids in
    the proportion ``unknown_frac``) and ``precomputed`` (the users batch-predict wrote: the
    first ``n_precomputed`` of users.parquet, the order the command reads)."""
    import pyarrow.parquet as pq

    all_users = pq.read_table(world / "users.parquet", columns=["user_id"])["user_id"].to_numpy()
    with_events = pq.read_table(world / "events.parquet", columns=["user_id"])["user_id"]
    warm = np.unique(with_events.to_numpy())
    rng = np.random.default_rng(seed)
    warm = rng.choice(warm, size=min(len(warm), 50_000), replace=False)
    n_unknown = round(len(warm) * unknown_frac / (1.0 - unknown_frac))
    unknown = int(all_users.max()) + 1 + np.arange(n_unknown)
    return {
        "online": np.concatenate([warm, unknown]).tolist(),
        "precomputed": all_users[:n_precomputed].tolist(),
        "n_warm": len(warm),
        "n_unknown": n_unknown,
    }


def load_phase(
    args: argparse.Namespace,
    server: Server,
    pids: dict[str, list[int]],
    users: list[int],
    *,
    rate: float,
    seconds: float,
    precomputed: bool,
) -> dict[str, Any]:
    """One open-loop run from a separate process: ``--warmup`` seconds, then ``seconds``."""
    spec = {
        **{"host": "127.0.0.1", "port": server.port, "client": args.client, "k": args.k},
        **{"rate": rate, "seconds": args.warmup + seconds, "poisson": args.poisson},
        **{"max_inflight": args.max_inflight, "timeout": args.timeout, "seed": args.seed},
        "connections": args.connections,
        **{"users": users, "precomputed": "true" if precomputed else "false"},
    }
    log(
        f"  {'precomputed' if precomputed else 'online'} path at {rate:g} requests/s, "
        f"{args.warmup:g} s warm-up + {seconds:g} s"
    )
    spec["cpu_pids"] = pids
    with tempfile.TemporaryDirectory(prefix="mlsd-load-") as tmp:
        spec["out"] = str(Path(tmp) / "records.json")
        command = [sys.executable, __file__, "--load-worker"]
        subprocess.run(command, input=json.dumps(spec), text=True, check=True)
        server.check_alive()
        out = json.loads(Path(spec["out"]).read_text())
    phase: dict[str, Any] = {"rate": rate, "seconds": seconds, "precomputed": precomputed}
    expected = "precomputed" if precomputed else "online"
    phase |= summarize(out["records"], args.warmup, args.warmup + seconds, path=expected)
    # over the schedule (the worker's samples), each group with its processes' children
    wall = out["client_wall_s"]
    used = {name: sum(parts) for name, parts in out["cpu_s"].items()}
    phase["cpu_cores"] = {
        **{name: round(seconds_used / wall, 3) for name, seconds_used in used.items()},
        "load_generator": round(out["client_cpu_s"] / wall, 3),
    }
    # the service's children (the log writer, the monitor) are in "server"; their share:
    phase["server_children_cores"] = round(out["cpu_s"]["server"][1] / wall, 3)
    accounted = (sum(used.values()) + out["client_cpu_s"]) / wall
    ticks_before, ticks_after = out["machine_ticks"]
    phase["machine_cores"] = machine_cores(ticks_before, ticks_after, wall, accounted)
    # CPU per request (mlsd plan): the CPU and the answers of the same span, warm-up included
    phase["cpu_seconds"] = {name: round(seconds_used, 3) for name, seconds_used in used.items()}
    phase["answered"] = sum(1 for r in out["records"] if "path" in r)
    phase["drain_seconds"] = drain(server, args.timeout)
    log(
        f"    latency {phase['latency_ms']}, errors {phase['error_kinds']}, "
        f"achieved {phase['achieved_rps']}/s, paths {phase['paths']}, "
        f"fallbacks {phase['fallbacks']}, cpu {phase['cpu_cores']}, "
        f"machine {phase['machine_cores']}, host steal {phase['host_steal']}, "
        f"client lag {phase['client_lag_ms']}, "
        f"drained in {phase['drain_seconds']} s"
    )
    return phase


def drain(server: Server, timeout: float, max_seconds: float = 300.0) -> float | None:
    """Seconds until an online request (an unknown user, ``precomputed=false``) is answered
    within 50 ms three times in a row: a request the client gave up on still waits for, or
    runs in, the model's threads, and the next phase must not pay for it. ``/readyz`` would not
    tell: the event loop answers it while requests queue for the model. ``None``: still busy
    after ``max_seconds``."""
    start = time.perf_counter()
    quiet = 0
    while quiet < 3:
        if time.perf_counter() - start > max_seconds:
            return None
        sent = time.perf_counter()
        quiet = (
            quiet + 1 if _online_answer(server.port) and time.perf_counter() - sent < 0.05 else 0
        )
        time.sleep(0.2)
    return round(time.perf_counter() - start, 1)


def _online_answer(port: int) -> bool:
    target = f"http://127.0.0.1:{port}/v1/recommendations/-1?precomputed=false"
    try:
        with urllib.request.urlopen(target, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def precomputed_path(
    args: argparse.Namespace, server: Server, pids: dict[str, list[int]], users: list[int]
) -> dict[str, Any]:
    """``precomputed=true`` at ``--rate`` for users batch-predict wrote: every answer should
    say path ``precomputed``. With ``--rounds N`` the phase runs N times and the round with
    the median p99 (with an even N the upper of the two middle ones) is reported in full,
    beside every round's percentiles: one p99 of a few thousand requests moves with whatever
    else the machine did in those seconds."""
    rounds = [
        load_phase(
            args, server, pids, users, rate=args.rate, seconds=args.duration, precomputed=True
        )
        for _ in range(args.rounds)
    ]
    p99s = [r["latency_ms"]["p99"] for r in rounds]
    ranked = sorted(range(len(rounds)), key=lambda i: math.inf if p99s[i] is None else p99s[i])
    phase = dict(rounds[ranked[len(ranked) // 2]])
    if len(rounds) > 1:
        phase["rounds"] = [
            {**r["latency_ms"], "errors": r["errors"], "achieved_rps": r["achieved_rps"]}
            for r in rounds
        ]
    phase["target_p99_ms"] = TARGETS["precomputed_p99_ms"]
    phase["all_precomputed"] = all(set(r["paths"]) == {"precomputed"} for r in rounds)
    met = passes(phase, TARGETS["precomputed_p99_ms"], 0.0)
    # an answer of another path is degraded: no round may have one, nor an error
    phase["met"] = met and not any(r["errors"] or r["degraded"] for r in rounds)
    return phase


def online_path(
    args: argparse.Namespace, server: Server, pids: dict[str, list[int]], users: list[int]
) -> dict[str, Any]:
    """``precomputed=false`` at ``--rate``: the request path end to end; met only when every
    answer took it whole (path ``online``, no fallback)."""
    phase = load_phase(
        args, server, pids, users, rate=args.rate, seconds=args.duration, precomputed=False
    )
    phase["target_p99_ms"] = TARGETS["online_p99_ms"]
    phase["met"] = passes(phase, TARGETS["online_p99_ms"], 0.0)
    return phase


def max_throughput(
    args: argparse.Namespace, server: Server, pids: dict[str, list[int]], users: list[int]
) -> dict[str, Any]:
    """The online path at each rate of ``--max-rate-steps`` until one fails the criterion, then
    ``--bisect`` rates halfway between the best pass (or 0) and the lowest failure. With no
    step failing, ``max_rate`` is only a lower bound (``bounded`` false): no rate tried was
    too much."""
    curve: list[dict[str, Any]] = []

    def step(rate: float) -> bool:
        phase = load_phase(
            args, server, pids, users, rate=rate, seconds=args.step_duration, precomputed=False
        )
        phase["passed"] = passes(phase, MAX_THROUGHPUT_P99_MS, MAX_ERRORS)
        curve.append(phase)
        return bool(phase["passed"])

    best, worst = 0.0, None
    for rate in args.max_rate_steps:
        if not step(rate):
            worst = rate
            break
        best = rate
    for _ in range(args.bisect if worst is not None else 0):
        middle = round((best + worst) / 2)  # type: ignore[operator]
        if middle in (0, best, worst):
            break
        best, worst = (middle, worst) if step(middle) else (best, middle)
    curve.sort(key=lambda p: p["rate"])
    passed = [p["rate"] for p in curve if p["passed"]]
    failed = [p["rate"] for p in curve if not p["passed"]]
    return {
        "criterion": (
            f"p99 <= {MAX_THROUGHPUT_P99_MS:g} ms, errors and degraded answers (another path, "
            f"a fallback) < {MAX_ERRORS:.1%}"
        ),
        "max_rate": max(passed) if passed else None,
        "lowest_failing_rate": min(failed) if failed else None,
        "bounded": bool(failed),
        "curve": [
            {
                k: p[k]
                for k in (
                    *("rate", "requests", "achieved_rps", "latency_ms", "errors", "error_kinds"),
                    *("passed", "paths", "fallbacks", "degraded", "host_steal", "stage_ms"),
                    *("cpu_cores", "server_children_cores", "machine_cores"),
                    *("client_lag_ms", "drain_seconds"),
                )
            }
            for p in curve
        ],
    }


def replica_requests(run_dir: Path, replicas: int) -> list[int]:
    """Requests each replica logged over the whole run: the kernel spreads connections, not
    requests, so the split shows how evenly the replicas shared the load."""
    import pyarrow.dataset as ds

    counts = []
    for replica in range(replicas):
        path = run_dir / f"replica-{replica}" / "service-log" / "requests"
        counts.append(ds.dataset(path, partitioning="hive").count_rows() if path.is_dir() else 0)
    return counts


def code_version() -> dict[str, Any]:
    """The commit and the files changed since (the request path may be edited between runs);
    ``--no-optional-locks``: reading the status must not write the index."""

    def git(*argv: str) -> str:
        done = subprocess.run(["git", "--no-optional-locks", *argv], capture_output=True, text=True)
        return done.stdout.rstrip()

    changed = [line[3:] for line in git("status", "--porcelain", "--", "src").splitlines()]
    return {"commit": git("rev-parse", "HEAD"), "changed_in_src": changed}


def served_ranker(model: Path) -> str | None:
    """The ranker the built model serves (its ``model.json``; ``[ranking].ranker = "auto"``
    picks one when training), ``None`` before the model is built."""
    try:
        ranker = json.loads((model / "model.json").read_text()).get("ranker")
    except (OSError, ValueError):
        return None
    return ranker if isinstance(ranker, str) else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {
        "benchmark": "serving",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "code": code_version(),
        # the simulated world's size: what the CPU per request was measured at (mlsd plan)
        "world": {"items": args.items, "users": args.users, "events": args.events},
        # the pipeline measured: mlsd plan warns when it plans for another config
        "pipeline": Pipeline.of_config(args.config).to_dict(),
    }
    built = build(args)
    report["build"] = built
    report["pipeline"]["served_ranker"] = served_ranker(Path(built["model"]))
    if args.build_only:
        return report
    from batch_predict import redis_server  # the other benchmark's throwaway Redis

    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=built["dir"]))
    with redis_server() as client:
        port = client.connection_pool.connection_kwargs["port"]
        url = f"redis://127.0.0.1:{port}/0"
        # What the online feature store costs a user and an item in Redis (mlsd plan), on
        # the idle server before anything else writes to it.
        repo = load_feed_config(args.config).feature_store.repo_path(Path(built["world"]))
        report["feature_store"] = redis_bytes_per_entity(repo, f"127.0.0.1:{port}").to_dict()
        n_batch = min(args.batch_users, args.users)
        report["batch_predict"] = batch_predict(
            built, url, n_batch, run_dir, args.batch_shards, args.batch_processes
        )
        users = request_users(Path(built["world"]), n_batch, args.unknown_frac, args.seed)
        with service(
            built,
            url,
            service_port(),
            run_dir,
            wait_s=args.ready_timeout,
            replicas=args.replicas,
            balancer=args.balancer,
            extra=args.serve_args,
        ) as (server, ready_s):
            report["service"] = {
                "replicas": args.replicas,
                "balancer": args.balancer if args.replicas > 1 else None,
                "ready_seconds": round(ready_s, 1),
                "log": str(run_dir),
                # the service's settings from the environment (MLSD_MODEL_THREADS, ...)
                "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MLSD_")},
            }
            pids = {"server": [p.pid for p in server.procs], "redis": redis_pids()}
            if server.balancer_pids:
                pids["balancer"] = server.balancer_pids
            report["load"] = {
                "client": args.client,
                "arrivals": "poisson" if args.poisson else "uniform",
                "warmup_s": args.warmup,
                "max_inflight": args.max_inflight,
                "connections_opened_first": args.connections,
                "timeout_s": args.timeout,
                "k": args.k,
                "users": {"warm": users["n_warm"], "unknown": users["n_unknown"]},
            }
            # the cheap path first: an overloaded online phase leaves the server a backlog
            if "precomputed" in args.phases:
                report["precomputed"] = precomputed_path(args, server, pids, users["precomputed"])
            if "online" in args.phases:
                report["online"] = online_path(args, server, pids, users["online"])
            if "max" in args.phases and args.max_rate_steps:
                report["max_throughput"] = max_throughput(args, server, pids, users["online"])
        if args.replicas > 1:  # the logs are complete once the replicas have stopped
            report["service"]["requests_per_replica"] = replica_requests(run_dir, args.replicas)
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


PHASES = ("precomputed", "online", "max")


def phase_names(text: str) -> set[str]:
    names = {x for x in text.split(",") if x}
    if not names or names - set(PHASES):
        raise argparse.ArgumentTypeError(f"{text!r}: phases are among {', '.join(PHASES)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--events", type=int, default=4_000_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--config",
        type=Path,
        default=CONFIG,
        help=f"the feed config built and measured (default {CONFIG}; mlsd plan capacity warns "
        "when it plans for another)",
    )
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "mlsd-bench-serving"
    )
    parser.add_argument("--skip-build", action="store_true", help="use the cache or stop")
    parser.add_argument("--build-only", action="store_true", help="stop after the build")
    parser.add_argument(
        "--batch-users", type=int, default=10_000, help="users batch-predict writes"
    )
    parser.add_argument(
        "--batch-shards",
        type=int,
        default=1,
        help="batch-predict commands at once (--shard i/N), each loading the model",
    )
    parser.add_argument(
        "--batch-processes",
        type=int,
        default=2,
        help="one-thread workers each batch-predict command forks from its loaded model "
        "(--processes); 1: threads in the process",
    )
    parser.add_argument("--rate", type=float, default=200.0, help="requests/s of the two paths")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds measured per path")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds sent before measuring")
    parser.add_argument(
        "--max-rate-steps",
        type=lambda s: [float(x) for x in s.split(",") if x],
        default=[10.0, 25.0, 50.0, 100.0, 150.0, 200.0, 300.0, 400.0, 600.0, 800.0],
        help="online rates to step through, comma-separated ('' skips the search)",
    )
    parser.add_argument(
        "--phases",
        type=phase_names,
        default=set(PHASES),
        help="which load phases run, comma-separated among precomputed,online,max (default all)",
    )
    parser.add_argument("--step-duration", type=float, default=15.0, help="seconds per rate step")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--unknown-frac", type=float, default=0.02, help="unknown user ids")
    parser.add_argument("--max-inflight", type=int, default=64, help="connections (and requests)")
    parser.add_argument(
        "--connections",
        type=int,
        default=32,
        help="keep-alive connections the raw client opens before the load (clients; the "
        "replicas share them as the kernel hashes them), reused oldest first",
    )
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds a request may take")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw")
    parser.add_argument("--poisson", action="store_true", help="Poisson arrivals, not uniform")
    parser.add_argument("--bisect", type=int, default=2, help="rates tried after a failure")
    parser.add_argument("--ready-timeout", type=float, default=900.0, help="service start, s")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="precomputed-path rounds; the median round's p99 is the result",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="service processes (mlsd feed serve), spread by --balancer",
    )
    parser.add_argument(
        "--balancer",
        choices=("reuse-port", "nginx"),
        default="reuse-port",
        help="how --replicas share the load: reuse-port (the kernel hashes connections to "
        "replicas) or nginx (least_conn: each request to the replica with fewest in flight)",
    )
    parser.add_argument(
        "--serve-args", type=str.split, default=[], help="more serve options, e.g. '--no-log'"
    )
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--load-worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.load_worker:
        load_worker()
        return
    if not args.config.is_file():
        hint = " (run from the repository root)" if args.config == CONFIG else ""
        sys.exit(f"--config {args.config}: not found{hint}")
    document = json.dumps(run(args), indent=2)
    if args.out is not None:
        args.out.write_text(document + "\n")
    print(document)


if __name__ == "__main__":
    main()
