"""Every ranker by name, and ``load_ranker`` which reopens a saved one without knowing its class.

Each ranker's ``save`` writes ``ranker.json`` holding at least ``{"kind": <Ranker.name>}``;
``load_ranker`` reads that field and dispatches through :data:`RANKERS` (an explicit dict, so a
saved directory can never name an arbitrary class).
"""

from __future__ import annotations

import json
from pathlib import Path

from mlsd.models.compression import OnnxRanker
from mlsd.models.ranking.base import Ranker
from mlsd.models.ranking.deep import DeepRanker
from mlsd.models.ranking.ensemble import EnsembleRanker
from mlsd.models.ranking.gbdt import LightGBMRanker
from mlsd.models.ranking.logistic import LogisticRanker

RANKER_JSON = "ranker.json"

RANKERS: dict[str, type[Ranker]] = {
    LogisticRanker.name: LogisticRanker,
    LightGBMRanker.name: LightGBMRanker,
    DeepRanker.name: DeepRanker,
    OnnxRanker.name: OnnxRanker,
    EnsembleRanker.name: EnsembleRanker,
}


def load_ranker(path: Path) -> Ranker:
    """Load the ranker saved in directory ``path``, whatever its kind.

    Raises:
        ValueError: ``ranker.json`` is missing, unreadable, or names an unknown kind.
    """
    meta_path = Path(path) / RANKER_JSON
    if not meta_path.is_file():
        raise ValueError(f"{path}: no {RANKER_JSON}; is this a directory written by Ranker.save?")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_path}: not valid JSON ({err})") from err
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if kind not in RANKERS:
        raise ValueError(
            f"{meta_path}: unknown ranker kind {kind!r}; expected one of {list(RANKERS)}"
        )
    return RANKERS[kind].load(Path(path))
