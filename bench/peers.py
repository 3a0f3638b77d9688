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

The RecBole table applies only to the files it was measured on: the bench checks their SHA-256
and says so when they differ.

    MLSD_DATA_DIR=../shared/data .venv/bin/python bench/peers.py
"""

from __future__ import annotations

import argparse
import hashlib
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
from mlsd.evaluation.given_split import read_splits, split_files
from mlsd.evaluation.metrics import ndcg_at_k_score, recall_at_k_score
from mlsd.evaluation.offline import PIPELINE, OfflineReport, evaluate_pipeline
from mlsd.evaluation.retrieval import ProtocolConfig, load_dataset
from mlsd.evaluation.stages import retrieve
from mlsd.models.retrieval.ease import EASERetriever

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MLSD_DATA_DIR", REPO.parent / "shared" / "data"))
PEERS = Path(os.environ.get("MLSD_PEERS_DIR", REPO.parent / "shared" / "peers"))
SPLITS = ("protoA", "protoB")
RECBOLE_EASE_REG = 250.0
"""RecBole's default ``reg_weight`` for EASE."""
RECBOLE: dict[str, dict[str, dict[str, float]]] = {
    "protoA": {
        "Pop": {"ndcg@10": 0.1005, "recall@10": 0.0838},
        "ItemKNN": {"ndcg@10": 0.2834, "recall@10": 0.2470},
        "BPR": {"ndcg@10": 0.2931, "recall@10": 0.2502},
        "EASE": {"ndcg@10": 0.3295, "recall@10": 0.2805},
        "LightGCN": {"ndcg@10": 0.3050, "recall@10": 0.2609},
        "MultiVAE": {"ndcg@10": 0.3001, "recall@10": 0.2598},
    },
    "protoB": {
        "Pop": {"ndcg@10": 0.0705, "recall@10": 0.0632},
        "ItemKNN": {"ndcg@10": 0.1136, "recall@10": 0.1089},
        "BPR": {"ndcg@10": 0.1146, "recall@10": 0.1053},
        "EASE": {"ndcg@10": 0.1272, "recall@10": 0.1208},
        "LightGCN": {"ndcg@10": 0.0910, "recall@10": 0.0861},
        "MultiVAE": {"ndcg@10": 0.0937, "recall@10": 0.0886},
    },
}
"""RecBole 1.2.1's test figures on each split (``recbole-ml100k/README.md``)."""
SHA256 = {
    "protoA": {
        "train": "78544dd085e532219b4fd30a1ee8be8d960eabd2b9b7f4a42253dcfa09d96cd4",
        "valid": "a0ab1165f1d46a2f9f7a15969faedea15c15fe05d3fca46ceaf90a1cec5b92c1",
        "test": "cabcc042564b2df161ee442403055642d4155c8b2d4612fafbc487c1d06f7186",
    },
    "protoB": {
        "train": "74cdb41da78428ea687004f07ca29da9dbfcf443e74400e18142fa0208e5c036",
        "valid": "86e2b83bd2b14123b9745febe8db74cc66d997fd1c435dc5ff66693146bd034a",
        "test": "ccdff097062f63c91a5a4110d0dbd1fff2f38b7f8d07a53397c8a1708982f764",
    },
}
"""The files RecBole's figures were measured on."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def same_files(prefix: Path, split: str) -> bool:
    files = split_files(prefix)
    return all(
        hashlib.sha256(files[name].read_bytes()).hexdigest() == digest
        for name, digest in SHA256[split].items()
    )


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


def run_split(contract: Path, prefix: Path, split: str, config: Path) -> dict[str, Any]:
    feed = load_feed_config(config)
    start = time.perf_counter()
    report = evaluate_pipeline(
        contract,
        feed.retrieval.factories(),
        feed.ranking.factories(),
        protocol=feed.retrieval.protocol,
        pipeline=feed.ranking.pipeline(),
        protocol_name="splits",
        splits=prefix,
        progress=True,
    )
    seconds = time.perf_counter() - start
    scored = methods(report)
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
    if not same_files(prefix, split):
        result["recbole"] = None
        result["recbole_note"] = f"{prefix}: not the files RecBole's figures were measured on"
        result["ease_reg250"] = reproduced
        return result
    table = RECBOLE[split]
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
            results[split] = run_split(contract, peers / split, split, Path(args.config))
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
