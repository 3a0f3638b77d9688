"""mlsd beside RecBole on RecBole's own ML-100K splits: one run, JSON.

RecBole's figures (1.2.1, CPU, default hyperparameters, early stopping on validation NDCG@10,
models fit on the train split only) were measured on the split files kept beside the data
(``$MLSD_PEERS_DIR/recbole-ml100k``, default ``../shared/peers``): protocol A shuffles each
user's ratings 8:1:1, protocol B orders them by time (the last 10% of each user is test). This
bench evaluates mlsd on the same files with ``mlsd feed evaluate --protocol splits`` (fit on
train only, train and validation items excluded at test, full ranking, k = 10) and prints, per
protocol:

- every mlsd baseline, ranker and the full pipeline: NDCG@10 and Recall@10 with 95% bootstrap
  intervals, and the pipeline against each of its baselines (paired intervals);
- RecBole's table, and the pipeline's NDCG@10 over RecBole's best model's;
- a reproduction check: mlsd's EASE at RecBole's ``reg_weight`` (250) against RecBole's EASE,
  which should agree to the 4 decimals RecBole reports if the two protocols are the same.

RecBole's table (``mlsd.evaluation.report.PEER_SPLITS``, which the HTML report shows too)
applies only to the files it was measured on, found by their SHA-256: the bench says so when
the files differ.

    MLSD_DATA_DIR=../shared/data .venv/bin/python bench/peers.py [--out DIR]

``--out DIR`` also writes each split's ``metrics.json`` and ``report.html`` (the report shows
RecBole's table beside mlsd's methods) under ``DIR/protoA`` and ``DIR/protoB``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from mlsd.config import load_feed_config
from mlsd.data.sources.movielens import import_movielens
from mlsd.evaluation.given_split import read_splits
from mlsd.evaluation.metrics import ndcg_at_k_score, recall_at_k_score
from mlsd.evaluation.offline import PIPELINE, OfflineReport, evaluate_pipeline
from mlsd.evaluation.report import peer_numbers, write_report
from mlsd.evaluation.retrieval import ProtocolConfig, load_dataset
from mlsd.evaluation.stages import retrieve
from mlsd.models.retrieval.ease import EASERetriever

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MLSD_DATA_DIR", REPO.parent / "shared" / "data"))
PEERS = Path(os.environ.get("MLSD_PEERS_DIR", REPO.parent / "shared" / "peers"))
SPLITS = ("protoA", "protoB")
RECBOLE_EASE_REG = 250.0
"""RecBole's default ``reg_weight`` for EASE."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def methods(report: OfflineReport) -> dict[str, dict[str, list[float]]]:
    out = {}
    for method in report.methods:
        cells = {}
        for metric in ("ndcg@10", "recall@10"):
            estimate = method.metrics["all"][metric]
            if estimate is not None:
                cells[metric] = [estimate.mean, estimate.low, estimate.high]
        out[method.name] = cells
    return out


def ease_reproduction(contract: Path, prefix: Path, protocol: ProtocolConfig) -> dict[str, float]:
    """mlsd's EASE at RecBole's ``reg_weight`` through the protocol's own tasks."""
    events, users, items = load_dataset(contract)
    _, test, _ = read_splits(prefix, events).tasks(users, items, protocol)
    retrieved = retrieve(
        test.train,
        test.user_ids,
        {"ease": lambda: EASERetriever(l2=RECBOLE_EASE_REG)},
        k=10,
        exclude=test.exclude,
    )
    lists = retrieved.lists.items["ease"]
    return {
        "ndcg@10": float(np.mean(ndcg_at_k_score(lists, test.relevant, k=10))),
        "recall@10": float(np.mean(recall_at_k_score(lists, test.relevant, k=10))),
    }


def run_split(contract: Path, prefix: Path, config: Path, out: Path | None) -> dict[str, Any]:
    feed = load_feed_config(config)
    start = time.perf_counter()
    report = evaluate_pipeline(
        contract,
        feed.retrieval.factories(),
        feed.ranking.factories(),
        protocol=feed.retrieval.protocol,
        pipeline=feed.ranking.pipeline(feed.retrieval.merge),
        protocol_name="splits",
        splits=prefix,
        progress=True,
    )
    seconds = time.perf_counter() - start
    scored = methods(report)
    if out is not None:  # metrics.json and report.html, RecBole's table beside mlsd's
        write_report(report, out / prefix.name)
    result: dict[str, Any] = {
        "files": report.cut_points,
        "counts": report.counts,
        "mlsd": scored,
        "pipeline_vs_baselines": {
            c.baseline: {"ratio": e.ratio, "ratio_ci": [e.ratio_low, e.ratio_high]}
            for c in report.comparisons
            if (e := c.segments["all"]) is not None
        },
        "seconds": seconds,
    }
    reproduced = ease_reproduction(contract, prefix, feed.retrieval.protocol)
    peer = peer_numbers(report.cut_points)
    if peer is None:
        result["recbole"] = None
        result["recbole_note"] = f"{prefix}: not the files RecBole's figures were measured on"
        result["ease_reg250"] = reproduced
        return result
    table = peer["rows"]
    best = max(table, key=lambda name: table[name]["ndcg@10"])
    pipeline = scored[PIPELINE]["ndcg@10"][0]
    result["recbole"] = table
    result["pipeline_over_recbole_best"] = {
        "recbole_best": best,
        "ratio": pipeline / table[best]["ndcg@10"],
        "ratio_of_ci": [
            bound / table[best]["ndcg@10"] for bound in scored[PIPELINE]["ndcg@10"][1:]
        ],
    }
    result["ease_reg250"] = {
        **reproduced,
        "recbole": table["EASE"],
        "agrees_to_4_decimals": all(
            abs(reproduced[m] - table["EASE"][m]) < 5e-5 for m in ("ndcg@10", "recall@10")
        ),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", default=",".join(SPLITS), help="comma-separated")
    parser.add_argument("--config", default=str(REPO / "configs" / "feed.toml"))
    parser.add_argument("--out", type=Path, help="also write OUT/<split>/report.html")
    args = parser.parse_args()
    source, peers = DATA / "movielens-100k", PEERS / "recbole-ml100k"
    for path, variable in ((source, "MLSD_DATA_DIR"), (peers, "MLSD_PEERS_DIR")):
        if not path.is_dir():
            sys.exit(f"{path} not found; set {variable}")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mlsd-peers-") as tmp:
        contract = Path(tmp) / "movielens-100k"
        import_movielens("movielens-100k", source=source, out=contract, progress=False)
        for split in args.splits.split(","):
            log(f"movielens-100k, RecBole's {split}")
            results[split] = run_split(contract, peers / split, Path(args.config), args.out)
    print(
        json.dumps(
            {
                "benchmark": "peers",
                "peer": "RecBole 1.2.1, ML-100K",
                "machine": {"cpus": os.cpu_count()},
                "config": args.config,
                "splits": results,
            },
            indent=2,
            default=str,
        )
    )


if __name__ == "__main__":
    main()
