"""Batch prediction: every user's top ``k`` through the request path, into Redis.

The offline path of the serving design: the lists the service answers from when a fresh one
exists (:mod:`mlsd.serving.precomputed`), computed by the same
:class:`~mlsd.serving.feed.FeedRecommender` as an online answer, so a precomputed list is what
the online path would have said at batch time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from mlsd.models.ranking.gbdt import predict_threads
from mlsd.serving.feed import FeedRecommender
from mlsd.serving.precomputed import PrecomputedStore


def batch_predict(
    recommender: FeedRecommender,
    store: PrecomputedStore,
    user_ids: Sequence[int],
    *,
    k: int,
    chunk: int = 500,
    workers: int = 2,
    now: float | None = None,
    progress: bool = False,
    on_chunk: Callable[[int], None] | None = None,
) -> tuple[int, float]:
    """The offline path: each user's top ``k`` by :meth:`FeedRecommender.recommend_many`,
    written to Redis with the model version and time; returns (users written, users per
    second). Every list is computed as of one time, ``now`` (default: the start).

    Users go ``chunk`` at a time to ``workers`` threads; each takes a chunk through the whole
    path: reads the online store, retrieves and merges its candidates, builds the ranker rows
    (:meth:`~FeedRecommender.prepare_many`), scores them on one thread, re-ranks
    (:meth:`~FeedRecommender.rank_many`) and writes the lists in one pipelined round trip.
    Faiss, the compiled trees, SQLite, Redis I/O and most numpy calls release the GIL; the
    Python between them does not, so two workers keep about 1.75 of two cores busy: at 1M
    items, 200 candidates and 200 compiled trees, about 1.2 ms of CPU per user and 1,490
    users/s, against 780 users/s (before the exact ALS search) with one thread preparing
    chunks and the other ranking them. Processes do not share a GIL:
    :func:`batch_predict_processes` forks one-thread workers from one loaded model (about
    0.8-0.9 ms of CPU per user: the candidate sources ~0.3, the trees ~0.15 when compiled
    with inlining, the online-store read ~0.13; 2,270-2,420 users/s on two quiet cores),
    and ``mlsd feed batch-predict --shard I/N`` splits the users among machines. One request
    path for both answers means a precomputed list is what the online path would have said at
    batch time.

    ``on_chunk(n)`` is called after each chunk's ``n`` users are written.
    """
    from concurrent.futures import ThreadPoolExecutor

    from rich.progress import Progress

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 users, got {chunk}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    start = time.perf_counter()
    now = time.time() if now is None else now

    def one_chunk(lo: int) -> int:
        batch = recommender.prepare_many([int(u) for u in user_ids[lo : lo + chunk]], now=now)
        with predict_threads(1):  # the other worker has the other core
            items, scores = recommender.rank_many(batch, k=k)
        store.write(
            batch.user_ids,
            items,
            scores.astype(np.float32),
            model_version=recommender.version,
            computed_at=now,  # the time the lists are as of, not the time they were written
            k=k,
            sources=batch.claimed(items),  # what the online answer names as each item's source
            source_names=batch.source_names,
        )
        return len(batch.user_ids)

    written = 0
    with (
        Progress(disable=not progress, transient=True) as bar,
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="batch") as pool,
    ):
        task = bar.add_task("batch predictions", total=len(user_ids))
        for done in pool.map(one_chunk, range(0, len(user_ids), chunk)):
            written += done
            bar.advance(task, done)
            if on_chunk is not None:
                on_chunk(done)
    seconds = time.perf_counter() - start
    return written, written / max(seconds, 1e-9)


def batch_predict_processes(
    recommender: FeedRecommender,
    store: PrecomputedStore,
    user_ids: Sequence[int],
    *,
    k: int,
    processes: int,
    chunk: int = 500,
    now: float | None = None,
    progress: bool = False,
) -> tuple[int, float]:
    """:func:`batch_predict` in ``processes`` forked children of this process, each taking
    every ``processes``-th user on one thread; returns (users written, users per second from
    the fork to the last child's exit).

    Threads in one process share the GIL, and separate processes (``--shard I/N``) each load
    the model (at 1M items about a minute of CPU and 1.5 GB apiece) and start predicting when
    their own load ends, so they overlap for only part of the run. Children forked from one
    loaded model share its pages copy-on-write (``gc.freeze`` first keeps the collector from
    touching, and so copying, them) and start together. Each child drops the inherited SQLite
    connection (:meth:`~mlsd.features.online.OnlineFeatures.after_fork`); Redis clients
    reconnect on their own.
    Linux and macOS only (``fork``). A child that fails makes this raise, naming it.
    """
    import gc
    import multiprocessing

    from rich.progress import Progress

    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    now = time.time() if now is None else now
    features = recommender.features
    if features is not None:
        features.wait_for_refresh()
    context = multiprocessing.get_context("fork")
    done: multiprocessing.queues.SimpleQueue[int] = context.SimpleQueue()

    def child(part: int) -> None:
        if features is not None:
            features.after_fork()
        batch_predict(
            recommender,
            store,
            user_ids[part::processes],
            k=k,
            chunk=chunk,
            workers=1,
            now=now,
            on_chunk=done.put,
        )

    start = time.perf_counter()
    gc.freeze()
    try:
        children = [
            context.Process(target=child, args=(part,), name=f"batch-{part}")
            for part in range(processes)
        ]
        for process in children:
            process.start()
    finally:
        gc.unfreeze()
    written = 0
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("batch predictions", total=len(user_ids))
        while any(process.is_alive() for process in children) or not done.empty():
            while not done.empty():
                n = done.get()
                written += n
                bar.advance(task, n)
            time.sleep(0.05)
    seconds = time.perf_counter() - start
    for part, process in enumerate(children):
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(
                f"batch worker {part}/{processes} (pid {process.pid}) exited with code "
                f"{process.exitcode}; its error is above"
            )
    return written, written / max(seconds, 1e-9)
