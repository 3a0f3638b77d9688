"""LightGBMRanker: the contract for both objectives, early stopping, and feature importance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlsd.models.ranking.base import Ranker
from mlsd.models.ranking.gbdt import LightGBMRanker, Objective
from tests.models.ranking.contract import RankerContract, contract_data


def small(objective: Objective = "binary") -> LightGBMRanker:
    """Few small trees: enough for the synthetic signal, fast on two cores."""
    return LightGBMRanker(
        objective=objective,
        n_estimators=60,
        learning_rate=0.1,
        num_leaves=7,
        early_stopping_rounds=10,
    )


class TestBinaryLightGBMRanker(RankerContract):
    def make_ranker(self) -> Ranker:
        return small("binary")


class TestLambdarankLightGBMRanker(RankerContract):
    def make_ranker(self) -> Ranker:
        return small("lambdarank")


class TestLightGBMRankerWithoutValid(RankerContract):
    def make_ranker(self) -> Ranker:
        return small()

    def fit_kwargs(self, valid):
        return {}


@pytest.mark.parametrize(
    ("objective", "metric"), [("binary", "binary_logloss"), ("lambdarank", "ndcg@10")]
)
def test_early_stopping_watches_the_objective_metric(objective: Objective, metric: str) -> None:
    data = contract_data()
    # A high learning rate overfits fast, so early stopping must cut well before 300 rounds.
    ranker = LightGBMRanker(
        objective=objective, n_estimators=300, learning_rate=0.5, early_stopping_rounds=5
    ).fit(data.train, data.valid)
    assert metric in ranker.evals_result_["valid"]
    assert ranker.best_iteration_ < 300
    assert ranker.booster_.current_iteration() == ranker.best_iteration_


def test_without_valid_it_runs_every_round() -> None:
    ranker = LightGBMRanker(n_estimators=25).fit(contract_data().train)
    assert ranker.best_iteration_ == 25
    assert ranker.evals_result_ == {}


def test_feature_importance_ranks_signal_above_noise() -> None:
    data = contract_data()
    ranker = small().fit(data.train, data.valid)
    gain = ranker.feature_importance()
    assert set(gain) == {"x1", "x2", "x3", "cat"}
    assert next(iter(gain)) == "x1", gain  # the strongest coefficient, listed first
    assert gain["cat"] > gain["x3"], gain
    assert gain["x2"] > gain["x3"], gain


def test_categorical_column_is_a_lightgbm_categorical(tmp_path: Path) -> None:
    data = contract_data()
    ranker = small().fit(data.train)
    ranker.save(tmp_path)
    model_text = (tmp_path / "booster.txt").read_text()
    assert "[categorical_feature: 3]" in model_text  # "cat" is the 4th schema column
    assert "cat_boundaries=" in model_text  # and some tree split on it by category set
    meta = json.loads((tmp_path / "ranker.json").read_text())
    assert meta["kind"] == "lightgbm"
    assert meta["params"]["objective"] == "binary"
    assert meta["schema"]["categorical"] == ["cat"]


def test_unknown_objective_is_explained() -> None:
    with pytest.raises(ValueError, match="objective"):
        LightGBMRanker(objective="regression").fit(contract_data().train)  # type: ignore[arg-type]
