"""Retrieval benchmark: every candidate source and their merge on MovieLens, temporal protocol.

Prints one JSON document (progress goes to stderr). For ML-100K and ML-latest-small (imported
from ``$MLSD_DATA_DIR``, default ``../shared/data``) it runs :func:`evaluate_retrieval` with the
``[retrieval]`` section of ``configs/feed.toml``: sources fit before ``t2`` and scored on the test
window, merge quotas tuned on the validation window only (for warm and cold users apart). Per
dataset and method: recall@{50,100,200,500} and NDCG@10 over all, warm and cold test users (mean
and 95% bootstrap interval), and fit seconds. ``target``: merged recall@200 / best single
source's recall@200 (>= 1.05) per dataset, and the two-tower's fit seconds on ML-100K (< 60).

    .venv/bin/python bench/retrieval.py
    .venv/bin/python bench/retrieval.py --datasets movielens-100k --sources popularity,ease
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mlsd.config import load_feed_config
from mlsd.data.sources.movielens import import_movielens
from mlsd.evaluation.retrieval import MERGED, RetrievalReport, evaluate_retrieval

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MLSD_DATA_DIR", REPO.parent / "shared" / "data"))
DATASETS = ("movielens-100k", "movielens-latest-small")
TARGET_MERGE_RATIO = 1.05
TARGET_TWO_TOWER_FIT_S = 60.0
TARGET_K = 200


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def merged_vs_best(
    methods: dict[str, Any], comparisons: list[dict[str, Any]], segment: str
) -> dict[str, Any]:
    """Merged recall@TARGET_K over the best single source's, on one segment of users, with
    the ratio's paired bootstrap interval."""
    recall = {
        name: (m["metrics"][segment][f"recall@{TARGET_K}"] or {}).get("mean")
        for name, m in methods.items()
    }
    singles = {n: r for n, r in recall.items() if n != MERGED and r is not None}
    if not singles or recall.get(MERGED) is None:
        return {"k": TARGET_K, "ratio": None}
    best = max(singles, key=lambda name: singles[name])
    paired = next(
        (
            c["segments"][segment]
            for c in comparisons
            if c["baseline"] == best and c["metric"] == f"recall@{TARGET_K}"
        ),
        None,
    )
    return {
        "k": TARGET_K,
        "best_single": best,
        "best_single_recall": singles[best],
        "merged_recall": recall[MERGED],
        "ratio": recall[MERGED] / singles[best] if singles[best] else None,
        # Paired bootstrap over the same test users (the report's ``comparisons``).
        "ratio_ci": [paired["ratio_low"], paired["ratio_high"]] if paired else None,
    }


def summarize(report: RetrievalReport) -> dict[str, Any]:
    """The report with the methods keyed by name, and merged vs best single per segment."""
    raw = report.to_dict()
    raw["methods"] = {m["name"]: m for m in raw["methods"]}
    raw["merged_vs_best"] = {
        s: merged_vs_best(raw["methods"], raw["comparisons"], s) for s in ("all", "warm", "cold")
    }
    return raw


def run_dataset(name: str, workdir: Path, sources: list[str] | None) -> dict[str, Any]:
    source = DATA / name
    if not source.is_dir():
        return {"skipped": f"{source} not found (set MLSD_DATA_DIR)"}
    contract = workdir / name
    import_movielens(name, source=source, out=contract, progress=False)
    retrieval = load_feed_config(REPO / "configs" / "feed.toml").retrieval
    if sources is not None:
        retrieval = dataclasses.replace(retrieval, sources=tuple(sources))
    log(f"{name}: {', '.join(retrieval.sources)}")
    start = time.perf_counter()
    report = evaluate_retrieval(
        contract,
        retrieval.factories(),
        protocol=retrieval.protocol,
        merge=retrieval.merge,
        progress=True,
    )
    result = summarize(report)
    result["seconds"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated")
    parser.add_argument("--sources", default=None, help="override [retrieval].sources")
    args = parser.parse_args()
    sources = args.sources.split(",") if args.sources else None
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mlsd-bench-") as tmp:
        for name in args.datasets.split(","):
            results[name] = run_dataset(name, Path(tmp), sources)
    target: dict[str, Any] = {"merged_recall_ratio_min": TARGET_MERGE_RATIO}
    for name, result in results.items():
        ratio = result.get("merged_vs_best", {}).get("all", {}).get("ratio")
        target[name] = {
            "merged_recall_ratio": ratio,
            "met": ratio is not None and ratio >= TARGET_MERGE_RATIO,
        }
    two_tower = results.get("movielens-100k", {}).get("methods", {}).get("two_tower")
    fit = two_tower["fit_seconds"] if two_tower else None
    target["two_tower_fit_seconds_ml100k"] = {
        "seconds": fit,
        "max": TARGET_TWO_TOWER_FIT_S,
        "met": fit is not None and fit < TARGET_TWO_TOWER_FIT_S,
    }
    report = {
        "benchmark": "retrieval",
        "machine": {"cpus": os.cpu_count()},
        "datasets": results,
        "target": target,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
