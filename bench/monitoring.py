"""Monitoring benchmark: what the service log costs serving, and how long monitoring takes.

Prints one JSON document (progress goes to stderr). Two parts:

1. **Logging overhead** (``overhead``). A feed system is built with the project's CLI as
   ``make demo`` builds it (``mlsd data synth`` → validate → split → ``mlsd feed features
   apply/materialize`` → ``mlsd feed train --config configs/feed-demo.toml``) on a smaller world
   (20k items, 5k users, 500k events by default), cached under ``--cache`` per step in
   bench/serving.py's layout, so either benchmark reuses the other's build (the train step
   takes ~10 min on 2 cores). For each ``--runs`` MODEL:RATE pair two services run as separate
   processes, one logging and one not: for ``feed``, ``mlsd feed serve --model DIR --log-dir
   DIR`` and ``... --no-log`` (the flagship pipeline; the service also logs the sampled
   ``candidates``); for ``popular``, the app with the world's popularity model, which answers
   in well under a millisecond, so the log's share of the latency is as large as it can be.
   This process drives the ONLINE path, ``GET /v1/recommendations/{user}?k=10&
   precomputed=false`` for users with history, open loop at RATE requests/s over at most
   ``--connections`` keep-alive connections (a slow answer never delays the next send; latency
   counts from the SCHEDULED send time, so queueing is measured; a request not answered within
   5 s of its scheduled time counts as infinitely slow, ``null`` in the JSON, and a round whose
   answers fall behind the sends is ``saturated``). About ``--clicks-per-s`` answers are
   followed by a ``POST /v1/events`` click naming the request (not timed), so the feedback
   table is written too. Rounds alternate off / on, each after ``--warmup`` untimed seconds, so
   drift of the machine's load hits both modes alike; each mode's figure is the median of its
   rounds' p99. ``--writer`` picks what writes the log: a child process (``process``, the
   default of ``[service_log] writer``) or a thread of the service (``thread``). Also measured
   in process, for both writers: the calling thread's time to log one answer (``log_request``
   + ``log_exposures`` of 10 items, µs) and the service process's CPU per answer until it is
   written.
   Target: median p99 with the log < 1.1 x without.
2. **Monitor time** (``monitor``). ``--exposures`` (10M) exposures of ``--k`` items per request
   over ``--days`` days are generated in the service log layout under /tmp, with their
   requests, clicks on ~5% of exposures (half name their request, half are attributed by the
   ASOF join) and a ``candidates`` table of every candidate of a ``--candidate-frac`` sample of
   requests, whose ``f_``/``c_`` columns are the demo ranker's features drawn from the same
   generator as the reference profile. Part files hold ``--flush-rows`` exposures each and their
   requests, as the service's log thread writes them. Then ``mlsd feed monitor --log-dir
   --reference --window --end --json`` runs as a subprocess over a window covering all of it
   (wall time, exit code: 0 none fired, 1 a rule fired, both fine) and ``run_monitor`` in
   process. Target: under 60 s. The data is deleted unless ``--keep``.

Latencies are noisy on a shared machine: the load average is reported at the start and end.

    .venv/bin/python bench/monitoring.py --out monitoring.json   # ~15 min once built
    .venv/bin/python bench/monitoring.py --runs feed:40,popular:200 --skip-monitor
    .venv/bin/python bench/monitoring.py --runs popular:200 --skip-monitor --writer thread
    .venv/bin/python bench/monitoring.py --rounds 1 --duration 5 --exposures 200000  # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import uvloop  # the load generator's own overhead is part of every latency it measures

from mlsd.config import ServiceLogSection
from mlsd.serving.process import ServiceFailedError, free_port, running_service

CONFIG = Path("configs/feed-demo.toml")
TARGET_P99_RATIO = 1.10
TARGET_MONITOR_S = 60.0
PERCENTILES = (50, 95, 99, 100)
REQUEST_TIMEOUT_S = 5.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------- build (bench/serving.py's cache)


def build(args: argparse.Namespace) -> dict[str, Any]:
    """The world and the model: bench/serving.py's cached build (same steps, same cache)."""
    from serving import build as build_system  # the sibling benchmark, as it imports its own

    return build_system(argparse.Namespace(**vars(args), skip_build=False))


def mlsd() -> str:
    return str(Path(sys.executable).with_name("mlsd"))


def warm_users(world: Path) -> list[int]:
    """Users with at least one event: the online path ranks their candidates."""
    import pyarrow.parquet as pq

    users = pq.read_table(world / "events.parquet", columns=["user_id"])["user_id"]
    return [int(u) for u in np.unique(users.to_numpy())]


# ---------------------------------------------------------------- the two services


def serve_popular(dataset: Path, port: int, log_dir: Path | None, writer: str) -> None:
    """``--serve-popular``: the app with the world's popularity model (answers in well under a
    millisecond, so the log's share of the latency is as large as it can be)."""
    import uvicorn

    from mlsd.serving.app import create_app
    from mlsd.serving.popular import PopularRecommender
    from mlsd.serving.settings import ServiceSettings

    model = PopularRecommender.from_dataset(dataset, version="popular:bench")
    section = ServiceLogSection(writer=writer)  # type: ignore[arg-type]
    service_log = None if log_dir is None else section.open(log_dir)
    app = create_app(lambda: model, settings=ServiceSettings(), log=service_log)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


@contextlib.contextmanager
def service(
    built: dict[str, Any], model: str, log_dir: Path | None, out: Path, writer: str
) -> Iterator[int]:
    """The service in its own process (``model`` "feed": ``mlsd feed serve --model`` with
    ``--log-dir`` or ``--no-log``; "popular": :func:`serve_popular`), its log written by
    ``writer`` ([service_log] writer); yields its port once ``/readyz`` answers 200, stops it
    (the app flushes the log) on exit."""
    port = free_port()
    if model == "feed":
        config = CONFIG
        if writer != ServiceLogSection().writer:  # the demo config has no [service_log]
            config = out.with_suffix(".toml")
            config.write_text(f'{CONFIG.read_text()}\n[service_log]\nwriter = "{writer}"\n')
        command = [
            *(mlsd(), "feed", "serve", "--dataset", built["world"], "--config", str(config)),
            *("--model", built["model"], "--port", str(port)),
            *(("--no-log",) if log_dir is None else ("--log-dir", str(log_dir))),
        ]
    else:
        command = [sys.executable, __file__, "--serve-popular", built["world"], "--port", str(port),
                   "--writer", writer]  # fmt: skip
        command += [] if log_dir is None else ["--log-dir", str(log_dir)]
    log(f"  {' '.join(command)}")
    start = time.perf_counter()
    try:
        with running_service(
            command, url=f"http://127.0.0.1:{port}", output=out, ready_timeout_s=900
        ):
            log(f"  ready on port {port} after {time.perf_counter() - start:.1f} s")
            yield port
    except ServiceFailedError as exc:
        sys.exit(str(exc))


# ---------------------------------------------------------------- open-loop load


class Connection:
    """One keep-alive HTTP/1.1 connection (a minimal client: httpx costs far more CPU)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def call(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += "Content-Type: application/json\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        payload = await self.reader.readexactly(length)
        return int(status_line.split()[1]), payload


async def load(
    port: int, args: argparse.Namespace, users: list[int], seconds: float, seed: int
) -> dict[str, Any]:
    """Open-loop GETs of the online path at ``args.rate``/s for ``seconds``; latency in ms from
    each request's scheduled send time (``inf`` when it failed or timed out)."""
    rng = random.Random(seed)
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(args.connections):
        pool.put_nowait(Connection(*await asyncio.open_connection("127.0.0.1", port)))
    n = int(args.rate * seconds)
    latencies = np.full(n, np.inf)
    last_answer = 0.0
    counts = {"errors": 0, "late": 0, "clicks_sent": 0}
    click_share = args.clicks_per_s / args.rate
    start = time.perf_counter() + 0.2

    async def one(i: int, user: int, click: bool) -> None:
        deadline = start + i / args.rate + REQUEST_TIMEOUT_S
        try:  # a saturated service: give up on a request no connection freed up for in time
            conn = await asyncio.wait_for(pool.get(), deadline - time.perf_counter())
        except TimeoutError:
            counts["late"] += 1
            return
        target = f"/v1/recommendations/{user}?k={args.k}&precomputed=false"
        try:
            timeout = max(deadline - time.perf_counter(), 0.001)
            status, body = await asyncio.wait_for(conn.call("GET", target), timeout)
            if status != 200:
                counts["errors"] += 1
                return
            nonlocal last_answer
            last_answer = time.perf_counter()
            latencies[i] = (last_answer - (start + i / args.rate)) * 1000.0
            answer = json.loads(body)
            if click and answer["items"]:
                event = [{"user_id": user, "item_id": answer["items"][0]["item_id"],
                          "event": "click", "request_id": answer["request_id"]}]  # fmt: skip
                status, _ = await conn.call("POST", "/v1/events", json.dumps(event).encode())
                counts["errors"] += status != 200
                counts["clicks_sent"] += 1
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
            counts["errors"] += 1
            conn.writer.close()  # its stream state is unknown: replace it
            conn = Connection(*await asyncio.open_connection("127.0.0.1", port))
        finally:
            pool.put_nowait(conn)

    tasks = []
    for i in range(n):
        delay = start + i / args.rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        user, click = rng.choice(users), rng.random() < click_share
        tasks.append(asyncio.create_task(one(i, user, click)))
    await asyncio.gather(*tasks)
    while not pool.empty():
        pool.get_nowait().writer.close()
    answered = int(np.isfinite(latencies).sum())
    achieved = answered / max(last_answer - start, 1e-9)
    return {
        "requests": n,
        **counts,
        "achieved_rps": round(achieved, 1),
        "saturated": achieved < 0.95 * args.rate,  # answers fell behind the sends
        "latency_ms": percentiles_ms(latencies),
    }


def percentiles_ms(latencies: np.ndarray) -> dict[str, float | None]:
    """Nearest-rank percentiles, so an unanswered (infinite) request stays out of the others;
    ``None`` where the percentile is an unanswered request."""
    points = np.percentile(latencies, PERCENTILES, method="inverted_cdf")
    names = [f"p{p}" for p in PERCENTILES[:-1]] + ["max"]
    return {
        n: round(float(v), 3) if np.isfinite(v) else None
        for n, v in zip(names, points, strict=True)
    }


# ---------------------------------------------------------------- part 1: logging overhead


def append_cost(log_dir: Path, writer: str, n: int = 50_000, k: int = 10) -> dict[str, Any]:
    """In-process cost of logging one answer of ``k`` items with ``writer`` ("thread" or
    "process"): the calling thread's time per answer, and the CPU time of the whole serving
    process per answer from the first call until everything is written (for "thread": the
    calls plus the log thread's conversion and writing; for "process": the calls plus the
    queue's pickling; the writer process's CPU is not the service's)."""
    items, scores, sources = list(range(k)), [0.5] * k, ["als"] * k
    section = ServiceLogSection(
        writer=writer,  # type: ignore[arg-type]
        flush_rows=20_000,
        flush_interval_s=3600,
        max_buffered_rows=10**9,
        retention_days=None,
    )
    service_log = section.open(log_dir)
    try:
        service_log.flush()  # the writer process has started
        cpu = time.process_time()
        start = time.perf_counter()
        for i in range(n):
            now = time.time()
            service_log.log_request(str(i), now, i, "m:1", path="online", latency_ms=1.0,
                                    status=200, k=k, fallbacks=())  # fmt: skip
            service_log.log_exposures(str(i), now, i, "m:1", items, scores, sources=sources,
                                      path="online")  # fmt: skip
        append_s = time.perf_counter() - start
        service_log.flush()
        cpu = time.process_time() - cpu
    finally:
        service_log.close()
    return {
        "writer": writer,
        "answers": n,
        "items_per_answer": k,
        "append_us_per_answer": round(append_s / n * 1e6, 2),
        "service_cpu_us_per_answer": round(cpu / n * 1e6, 2),
        "written_rows": service_log.written_rows,
    }


def log_contents(log_dir: Path) -> dict[str, Any]:
    from mlsd.monitoring.log_reader import read_table
    from mlsd.monitoring.logs import TABLES

    files = list(log_dir.rglob("*.parquet"))
    return {
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
        "rows": {t: read_table(log_dir, t, columns=["ts"]).num_rows for t in TABLES},
    }


def measure_overhead(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    built = build(args)
    users = warm_users(Path(built["world"]))
    cost = {w: append_cost(work / f"append-cost-{w}", w) for w in ("thread", "process")}
    for w, c in cost.items():
        log(f"in process, {w} writer: {c['append_us_per_answer']:.1f} us per answer of 10 items "
            f"in the calling thread, {c['service_cpu_us_per_answer']:.1f} us of the service's "
            "CPU")  # fmt: skip
    runs = {}
    for model, rate in args.runs:
        runs[f"{model}@{rate:g}"] = compare_modes(args, built, users, model, rate, work)
    return {
        "build": built,
        "setup": {
            "path": "online (precomputed=false)",
            **{k: getattr(args, k) for k in ("duration", "warmup", "rounds", "k")},
            **{k: getattr(args, k) for k in ("connections", "clicks_per_s")},
            "users": len(users),
        },
        "in_process": cost,
        "runs": runs,
    }


def compare_modes(
    args: argparse.Namespace,
    built: dict[str, Any],
    users: list[int],
    model: str,
    rate: float,
    work: Path,
) -> dict[str, Any]:
    """Rounds off / on against two services of ``model`` at ``rate`` requests/s."""
    log(f"{model} model at {rate:g} requests/s, {args.rounds} rounds per mode")
    run_args = argparse.Namespace(**{**vars(args), "rate": rate})
    log_dir = work / f"service-log-{model}-{rate:g}"
    rounds: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    with (
        service(built, model, None, work / f"serve-{model}-off.log", args.writer) as port_off,
        service(built, model, log_dir, work / f"serve-{model}-on.log", args.writer) as port_on,
    ):
        for r in range(args.rounds):
            for mode, port in (("off", port_off), ("on", port_on)):
                uvloop.run(load(port, run_args, users, args.warmup, seed=1000 + r))
                result = uvloop.run(load(port, run_args, users, args.duration, seed=r))
                result["load_avg"] = load_average()
                rounds[mode].append(result)
                lat = result["latency_ms"]
                log(f"  round {r + 1} log {mode}: p50 {lat['p50']} ms, p99 {lat['p99']} ms, "
                    f"{result['achieved_rps']}/s, errors {result['errors']}, "
                    f"load {result['load_avg'][0]}")  # fmt: skip

    def median(p: str) -> dict[str, float | None]:
        """The median over rounds; None when it is an unanswered request (None in a round)."""
        out: dict[str, float | None] = {}
        for mode, results in rounds.items():
            value = np.median([np.inf if x["latency_ms"][p] is None else x["latency_ms"][p]
                               for x in results])  # fmt: skip
            out[mode] = round(float(value), 3) if np.isfinite(value) else None
        return out

    p99 = median("p99")
    on, off = p99["on"], p99["off"]
    ratio = on / off if on is not None and off is not None else None
    return {
        "model": model,
        "rate": rate,
        "writer": args.writer,
        "p99_ms_by_round": {m: [x["latency_ms"]["p99"] for x in rs] for m, rs in rounds.items()},
        "median_p50_ms": median("p50"),
        "median_p99_ms": p99,
        # None when p99 is an unanswered request (a saturated service): no ratio to speak of
        "p99_ratio_on_over_off": None if ratio is None else round(ratio, 3),
        "p99_increase_pct": None if ratio is None else round(100.0 * (ratio - 1.0), 1),
        "target_ratio": TARGET_P99_RATIO,
        "met": ratio is not None and ratio < TARGET_P99_RATIO,
        "saturated_rounds": sum(x["saturated"] for rs in rounds.values() for x in rs),
        "log_written": log_contents(log_dir),
        "rounds": rounds,
    }


# ---------------------------------------------------------------- part 2: monitor time
# The ranker's inputs of the demo model (its ranking/bundle.json layout), each with a plausible
# distribution: (family, parameter); codes of categorical features are Zipf-like, 0 = unknown.
NUMERIC: dict[str, tuple[str, float]] = {
    "session_events": ("poisson", 3), "events_1d": ("poisson", 5), "events_7d": ("poisson", 25),
    "events_30d": ("poisson", 90), "item_events_1d": ("gamma", 20),
    "item_events_7d": ("gamma", 120), "item_events_30d": ("gamma", 500),
    "item_mean_value": ("beta", 0.7), "user_known": ("flag", 0.95), "item_known": ("flag", 0.98),
    "seconds_since_last_event": ("gamma", 3600), "session_events_now": ("poisson", 2),
    "item_age_days": ("gamma", 40), "category_affinity": ("beta", 0.1),
    "seen_recently": ("flag", 0.05), "merged_position": ("uniform", 200),
    "n_proposers": ("poisson", 1.3), "rrank_popularity": ("beta", 0.05),
    "score_popularity": ("beta", 0.3), "rrank_covisitation": ("beta", 0.05),
    "score_covisitation": ("gamma", 2), "rrank_als": ("beta", 0.05), "score_als": ("beta", 0.4),
    "user_events_all": ("gamma", 100), "item_users_all": ("gamma", 300),
    "item_created_days": ("gamma", 400), "affinity_mean_30d": ("beta", 0.1),
}  # fmt: skip
CATEGORICAL = {"age_bucket": 7, "gender": 3, "occupation": 21, "region": 10, "category": 21,
               "claimed_source": 4}  # fmt: skip
MODEL_VERSIONS = ("b17bfcd8-bf4d8bd1", "b17bfcd8-5e1f0a77")
PATHS, PATH_SHARES = ("online", "precomputed", "fallback:popular"), (0.70, 0.29, 0.01)
SOURCES = ("popularity", "covisitation", "als")
SCORE_BETA = (1.0, 19.0)  # served scores are click probabilities: mean 0.05, ~5% clicked
N_CANDIDATES = 200
START = datetime(2024, 5, 1, tzinfo=UTC)


def candidate_features(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """``n`` rows of the ranker's inputs: ``f_<name>`` float32 and ``c_<name>`` int32 columns."""
    out: dict[str, np.ndarray] = {}
    for name, (family, p) in NUMERIC.items():
        x: np.ndarray
        if family == "poisson":
            x = rng.poisson(p, n)
        elif family == "gamma":
            x = rng.gamma(1.5, p / 1.5, n)
        elif family == "beta":
            x = rng.beta(5 * p, 5 * (1 - p), n)
        elif family == "flag":
            x = rng.random(n) < p
        else:
            x = rng.uniform(0, p, n)
        out[f"f_{name}"] = x.astype(np.float32)
    for name, cardinality in CATEGORICAL.items():
        weights = 1.0 / np.arange(1, cardinality + 1)
        out[f"c_{name}"] = rng.choice(cardinality, n, p=weights / weights.sum()).astype(np.int32)
    return out


def reference_profile(path: Path, seed: int, n: int = 200_000) -> Path:
    """The profile of ``n`` rows of the same generator the candidates table is drawn from."""
    import pandas as pd

    from mlsd.monitoring.profile import ReferenceProfile

    rng = np.random.default_rng(seed)
    rows = pd.DataFrame({k[2:]: v for k, v in candidate_features(rng, n).items()})
    profile = ReferenceProfile.build(
        rows, rng.beta(*SCORE_BETA, n), numeric=list(NUMERIC), categorical=list(CATEGORICAL),
        label_metrics={"ctr": SCORE_BETA[0] / sum(SCORE_BETA)},
    )  # fmt: skip
    return profile.save(path)


def choice_column(values: tuple[str, ...], codes: np.ndarray) -> Any:
    import pyarrow as pa

    return pa.array(values).take(pa.array(codes))


def generate_day(
    rng: np.random.Generator, day: int, n_requests: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One UTC day of the four tables (Arrow, contract schemas), requests in time order."""
    import pyarrow as pa

    from mlsd.monitoring.logs import SCHEMAS

    k, day_us = args.k, 86_400_000_000
    t0 = int((START + timedelta(days=day)).timestamp() * 1e6)
    ts_us = np.sort(t0 + rng.integers(0, day_us, n_requests))
    ts = pa.array(ts_us, pa.timestamp("us", tz="UTC"))
    users = rng.integers(1, args.log_users + 1, n_requests)
    ids = pa.array([f"{day:04d}{i:028x}" for i in range(n_requests)])  # 32 chars, as uuid4().hex
    arm_code = users % 2
    per_request = {
        "request_id": ids, "ts": ts, "user_id": users,
        "model_version": choice_column(MODEL_VERSIONS, arm_code),
        "experiment": choice_column(("feed-ranker",), np.zeros(n_requests, np.int64)),
        "arm": choice_column(("control", "treatment"), arm_code),
        "path": choice_column(PATHS, rng.choice(len(PATHS), n_requests, p=PATH_SHARES)),
    }  # fmt: skip
    fallback = pa.compute.equal(per_request["path"], "fallback:popular")
    requests = pa.table(
        {**per_request, "fallbacks": pa.compute.if_else(fallback, "model", ""),
         "latency_ms": rng.gamma(2.0, 4.0, n_requests).astype(np.float32),
         "status": np.where(rng.random(n_requests) < 0.001, 503, 200).astype(np.int16),
         "k": np.full(n_requests, k, np.int16)},
        schema=SCHEMAS["requests"],
    )  # fmt: skip
    n = n_requests * k
    rep = pa.array(np.repeat(np.arange(n_requests), k))
    items = (np.repeat(rng.integers(0, args.log_items, n_requests), k)
             + np.tile(np.arange(k) * 997, n_requests)) % args.log_items  # fmt: skip
    scores = rng.beta(*SCORE_BETA, n).astype(np.float32)
    exposures = pa.table(
        {**{name: column.take(rep) for name, column in per_request.items()},
         "item_id": items, "position": np.tile(np.arange(k, dtype=np.int16), n_requests),
         "score": scores, "source": choice_column(SOURCES, rng.integers(0, len(SOURCES), n))},
        schema=SCHEMAS["exposures"],
    )  # fmt: skip
    # calibrated clicks, 1 s to 10 min after the exposure; half name their request
    clicked = np.flatnonzero(rng.random(n) < scores)
    click_ts = np.minimum(np.repeat(ts_us, k)[clicked] + rng.integers(1, 600, len(clicked)) * 10**6,
                          t0 + day_us - 1)  # fmt: skip
    order = np.argsort(click_ts, kind="stable")
    clicked, click_ts = clicked[order], click_ts[order]
    named = pa.array(rng.random(len(clicked)) < 0.5)
    feedback = pa.table(
        {"ts": pa.array(click_ts, pa.timestamp("us", tz="UTC")),
         "user_id": np.repeat(users, k)[clicked], "item_id": items[clicked],
         "event": choice_column(("click",), np.zeros(len(clicked), np.int64)),
         "value": np.ones(len(clicked)),
         "request_id": pa.compute.if_else(named, ids.take(rep).take(pa.array(clicked)), "")},
        schema=SCHEMAS["feedback"],
    )  # fmt: skip
    sampled = np.flatnonzero(rng.random(n_requests) < args.candidate_frac)
    crep = pa.array(np.repeat(sampled, N_CANDIDATES))
    m = len(sampled) * N_CANDIDATES
    candidates = pa.table(
        {**{c: per_request[c].take(crep) for c in ("request_id", "ts", "user_id", "model_version")},
         "item_id": rng.integers(0, args.log_items, m), "score": rng.beta(*SCORE_BETA, m),
         **candidate_features(rng, m)}
    )  # fmt: skip
    fixed = SCHEMAS["candidates"]
    candidates = candidates.cast(
        pa.schema([fixed.field(f.name) if f.name in fixed.names else f for f in candidates.schema])
    )
    return {
        "requests": requests,
        "exposures": exposures,
        "feedback": feedback,
        "candidates": candidates,
        "candidate_request": np.repeat(sampled, N_CANDIDATES),
    }


def write_day(log_dir: Path, day: int, tables: dict[str, Any], flush_rows: int, k: int) -> int:
    """The day's tables as part files, as the log thread flushes them: each flush holds about
    ``flush_rows`` exposures, their requests and sampled candidates, and the clicks of that
    stretch of time. Returns the files written."""
    import pyarrow.parquet as pq

    n_requests = tables["requests"].num_rows
    flushes = max(1, round(n_requests * k / flush_rows))
    bounds = np.linspace(0, n_requests, flushes + 1).round().astype(np.int64)
    click_bounds = np.linspace(0, tables["feedback"].num_rows, flushes + 1).round().astype(int)
    cand_bounds = np.searchsorted(tables["candidate_request"], bounds)
    date = f"date={START + timedelta(days=day):%Y-%m-%d}"
    slices = {
        "requests": bounds,
        "exposures": bounds * k,
        "feedback": click_bounds,
        "candidates": cand_bounds,
    }
    written = 0
    for table, cuts in slices.items():
        part_dir = log_dir / table / date
        part_dir.mkdir(parents=True, exist_ok=True)
        for j in range(flushes):
            rows = tables[table].slice(cuts[j], cuts[j + 1] - cuts[j])
            if rows.num_rows:
                pq.write_table(rows, part_dir / f"part-0-{j:06d}.parquet", compression="zstd")
                written += 1
    return written


def generate_log(log_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    n_requests = args.exposures // args.k
    per_day = np.diff(np.linspace(0, n_requests, args.days + 1).round().astype(np.int64))
    rows = dict.fromkeys(("requests", "exposures", "feedback", "candidates"), 0)
    files = 0
    for day, n in enumerate(per_day.tolist()):
        tables = generate_day(rng, day, n, args)
        files += write_day(log_dir, day, tables, args.flush_rows, args.k)
        for name in rows:
            rows[name] += tables[name].num_rows
        log(f"  day {day + 1}/{args.days}: {tables['exposures'].num_rows:,} exposures")
    size = sum(p.stat().st_size for p in log_dir.rglob("*.parquet"))
    return {
        "rows": rows,
        "files": files,
        "bytes": size,
        "days": args.days,
        "seconds": round(time.perf_counter() - start, 1),
    }


def measure_monitor(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from mlsd.monitoring.alerts import MonitoringSection
    from mlsd.monitoring.monitor import run_monitor
    from mlsd.monitoring.profile import ReferenceProfile

    log_dir, profile_path = work / "logs", work / "reference_profile.json"
    log(f"generating {args.exposures:,} exposures over {args.days} days in {log_dir}")
    reference_profile(profile_path, seed=args.seed + 1)
    generated = generate_log(log_dir, args)
    log(f"  {generated}")
    end = START + timedelta(days=args.days)
    command = [
        *(mlsd(), "feed", "monitor", "--log-dir", str(log_dir), "--reference", str(profile_path)),
        *("--window", f"{args.days}d", "--end", end.isoformat(), "--json"),
    ]
    log(f"  {' '.join(command)}")
    began = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    cli_s = time.perf_counter() - began
    if proc.returncode not in (0, 1):
        sys.exit(f"mlsd feed monitor failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout)
    log(f"  CLI: {cli_s:.1f} s, exit {proc.returncode}, fired {result['fired']}")
    began = time.perf_counter()
    in_process = run_monitor(
        log_dir,
        ReferenceProfile.load(profile_path),
        start=end - timedelta(days=args.days),
        end=end,
        rules=MonitoringSection().alerts,
    )
    in_process_s = time.perf_counter() - began
    log(f"  run_monitor: {in_process_s:.1f} s")
    drift = result["drift"] or {}
    return {
        "generated": generated | {"candidate_frac": args.candidate_frac},
        "cli": {
            "command": " ".join(command),
            "wall_seconds": round(cli_s, 2),
            "exit_code": proc.returncode,
            "run_seconds_reported": result["seconds"],
            "counts": result["counts"],
            "metrics": result["metrics"],
            "fired": result["fired"],
            "drifted_features": [r["name"] for r in drift.get("features", []) if r["drifted"]],
        },
        "run_monitor": {
            "wall_seconds": round(in_process_s, 2),
            "fired": [o.rule.name for o in in_process.outcomes if o.fired],
        },
        "target_seconds": TARGET_MONITOR_S,
        "met": cli_s < TARGET_MONITOR_S,
    }


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    part1 = parser.add_argument_group("logging overhead")
    part1.add_argument("--skip-overhead", action="store_true")
    part1.add_argument("--items", type=int, default=20_000, help="items of the built world")
    part1.add_argument("--users", type=int, default=5_000, help="users of the built world")
    part1.add_argument("--events", type=int, default=500_000, help="events of the built world")
    part1.add_argument("--cache", type=Path, default=Path("/tmp/mlsd-bench-serving"),
                       help="build cache (shared with bench/serving.py)")  # fmt: skip
    part1.add_argument(
        "--runs",
        type=parse_runs,
        default=parse_runs("feed:200,popular:200"),
        help="MODEL:RATE pairs, comma-separated; MODEL feed (the built pipeline, the flagship) "
        "or popular (the world's popularity model: the log's largest share)",
    )
    part1.add_argument("--duration", type=float, default=30.0, help="timed seconds per round")
    part1.add_argument("--warmup", type=float, default=5.0, help="untimed seconds per round")
    part1.add_argument("--rounds", type=int, default=3, help="rounds per mode (off, on)")
    part1.add_argument("--clicks-per-s", type=float, default=4.0, help="clicks sent per second")
    part1.add_argument("--connections", type=int, default=32, help="keep-alive connections")
    part1.add_argument("--writer", choices=("process", "thread"), default="process",
                       help="what writes the log: a child process (the default of "
                       "[service_log] writer) or a thread of the service")  # fmt: skip
    part2 = parser.add_argument_group("monitor time")
    part2.add_argument("--skip-monitor", action="store_true")
    part2.add_argument("--exposures", type=int, default=10_000_000)
    part2.add_argument("--days", type=int, default=7, help="days the log spans")
    part2.add_argument("--flush-rows", type=int, default=5_000, help="exposures per part file")
    part2.add_argument("--candidate-frac", type=float, default=None,
                       help=f"requests whose {N_CANDIDATES} candidates are logged (default: the "
                       "service's [service_log] candidates_sample_rate)")  # fmt: skip
    part2.add_argument("--log-users", type=int, default=100_000)
    part2.add_argument("--log-items", type=int, default=20_000)
    part2.add_argument("--keep", action="store_true", help="keep the generated data")
    parser.add_argument("--k", type=int, default=10, help="items per answer")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--serve-popular", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--log-dir", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def parse_runs(text: str) -> list[tuple[str, float]]:
    runs = []
    for pair in text.split(","):
        model, _, rate = pair.partition(":")
        if model not in ("feed", "popular") or not rate:
            raise argparse.ArgumentTypeError(f"{pair!r}: expected feed:RATE or popular:RATE")
        runs.append((model, float(rate)))
    return runs


def main() -> None:
    args = parse_args()
    if args.candidate_frac is None:
        args.candidate_frac = ServiceLogSection().candidates_sample_rate
    if args.serve_popular is not None:
        serve_popular(args.serve_popular, args.port, args.log_dir, args.writer)
        return
    if not CONFIG.exists():
        sys.exit(f"{CONFIG} not found: run from the repository root")
    report: dict[str, Any] = {
        "benchmark": "monitoring",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_start": load_average(),
        },
    }
    work = Path(tempfile.mkdtemp(prefix="mlsd-bench-monitoring-"))
    try:
        if not args.skip_overhead:
            report["overhead"] = measure_overhead(args, work)
            report["machine"]["load_avg_after_overhead"] = load_average()
        if not args.skip_monitor:
            report["monitor"] = measure_monitor(args, work)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report["machine"]["load_avg_end"] = load_average()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
