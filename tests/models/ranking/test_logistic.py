"""LogisticRanker: the contract, plus checks that it recovers the known linear signal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mlsd.models.ranking.base import Ranker
from mlsd.models.ranking.logistic import LogisticRanker
from tests.models.ranking.contract import CAT_EFFECT, RankerContract, contract_data


class TestLogisticRanker(RankerContract):
    def make_ranker(self) -> Ranker:
        return LogisticRanker(C=1.0)


def test_recovers_the_direction_of_every_signal() -> None:
    ranker = LogisticRanker(C=10.0).fit(contract_data().train)
    x1, x2, x3 = ranker.numeric_coef_
    assert x1 > 0.5, ranker.numeric_coef_
    assert x2 < -0.5, ranker.numeric_coef_
    assert abs(x3) < 0.2, "x3 is noise"
    assert np.argmax(ranker.categorical_coef_["cat"]) == np.argmax(CAT_EFFECT)
    assert np.argmin(ranker.categorical_coef_["cat"]) == np.argmin(CAT_EFFECT)


def test_sigmoid_of_the_score_matches_sklearn_probabilities() -> None:
    """The numpy scorer is the same function scikit-learn fitted (log-odds)."""
    train = contract_data().train
    ranker = LogisticRanker().fit(train)
    p = 1.0 / (1.0 + np.exp(-ranker.predict(train.features)))
    assert p.min() > 0.0
    assert p.max() < 1.0
    # Logistic regression with an intercept matches the base rate on its training data.
    assert abs(p.mean() - train.label.mean()) < 0.01


def test_balanced_class_weight_raises_scores_and_round_trips(tmp_path: Path) -> None:
    train = contract_data().train
    plain = LogisticRanker().fit(train)
    balanced = LogisticRanker(class_weight={0: 1.0, 1: 3.0}).fit(train)
    assert balanced.intercept_ > plain.intercept_
    balanced.save(tmp_path)
    meta = json.loads((tmp_path / "ranker.json").read_text())
    assert meta["params"]["class_weight"] == {"0": 1.0, "1": 3.0}
    assert LogisticRanker.load(tmp_path).class_weight == {0: 1.0, 1: 3.0}


def test_one_class_label_is_explained() -> None:
    train = contract_data().train
    one_class = type(train)(
        train.features, {"click": np.zeros(len(train.label))}, train.groups, train.schema
    )
    with pytest.raises(ValueError, match="one class"):
        LogisticRanker().fit(one_class)


def test_load_refuses_another_kind(tmp_path: Path) -> None:
    (tmp_path / "ranker.json").write_text(json.dumps({"kind": "lightgbm"}))
    with pytest.raises(ValueError, match="lightgbm"):
        LogisticRanker.load(tmp_path)
