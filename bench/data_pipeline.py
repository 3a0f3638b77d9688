"""Data pipeline benchmark: simulated-world throughput and peak RSS; MovieLens import and split.

Prints one JSON document. Each simulated world is generated in a fresh subprocess, so its peak
RSS (``ru_maxrss``) is its own. Throughput is end to end: generation plus the Parquet writes.

    .venv/bin/python bench/data_pipeline.py                 # 10M and 100M events
    .venv/bin/python bench/data_pipeline.py --sizes 1000000 # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MLSD_DATA_DIR", REPO.parent / "shared" / "data"))

_CHILD = """
import json, resource, sys, time
from pathlib import Path
from mlsd.data.sources.synthetic import WorldConfig, synthesize
n_events, n_users, n_items, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
config = WorldConfig(n_users=n_users, n_items=n_items, n_events=n_events, seed=1, days=365)
start = time.perf_counter()
info = synthesize(config, Path(out), progress=False)
seconds = time.perf_counter() - start
print(json.dumps({"n_events": info.n_events, "seconds": seconds,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def synth_run(n_events: int, workdir: Path) -> dict[str, Any]:
    """Generate one world in a subprocess; events/s and its peak RSS."""
    n_users = max(1_000, n_events // 1_000)
    n_items = max(500, n_events // 1_000)
    out = workdir / f"world-{n_events}"
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(n_events), str(n_users), str(n_items), str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    result.update(
        n_users=n_users,
        n_items=n_items,
        events_per_second=result["n_events"] / result["seconds"],
        peak_rss_gb=result["peak_rss_bytes"] / 1e9,
        disk_bytes=size,
    )
    return result


def median_seconds(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def movielens_runs(workdir: Path, repeats: int) -> dict[str, Any]:
    from mlsd.data.sources.movielens import import_movielens
    from mlsd.data.split import split_dataset

    results: dict[str, Any] = {}
    for variant in ("movielens-100k", "movielens-latest-small"):
        source = DATA / variant
        if not source.is_dir():
            results[variant] = {"skipped": f"{source} not found (set MLSD_DATA_DIR)"}
            continue
        out = workdir / variant
        imported = median_seconds(
            partial(import_movielens, variant, source=source, out=out, progress=False), repeats
        )
        split = median_seconds(partial(split_dataset, out, val_frac=0.1, test_frac=0.2), repeats)
        results[variant] = {"import": imported, "split": split}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000000,100000000", help="event counts to generate")
    parser.add_argument("--repeats", type=int, default=3, help="repeats for MovieLens timings")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mlsd-bench-") as tmp:
        workdir = Path(tmp)
        synth = []
        for n_events in args.sizes.split(","):
            synth.append(synth_run(int(n_events), workdir))
            shutil.rmtree(workdir / f"world-{n_events}")  # free the disk before the next size
        report = {
            "benchmark": "data_pipeline",
            "machine": {"cpus": os.cpu_count()},
            "simulated_world": synth,
            "targets": {"events_per_second": 1_000_000, "peak_rss_gb": 4.0},
            "movielens": movielens_runs(workdir, args.repeats),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
