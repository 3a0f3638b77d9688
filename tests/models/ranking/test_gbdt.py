"""LightGBMRanker: the contract for both objectives, early stopping, and feature importance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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


def _category_sets(ranker: LightGBMRanker) -> list[str]:
    """The category set of every categorical split of the trees ("1||3||5")."""
    sets: list[str] = []

    def walk(node: dict[str, object]) -> None:
        if "split_index" not in node:
            return
        if node["decision_type"] == "==":
            sets.append(str(node["threshold"]))
        walk(node["left_child"])  # type: ignore[arg-type]
        walk(node["right_child"])  # type: ignore[arg-type]

    for tree in ranker.booster_.dump_model()["tree_info"]:
        walk(tree["tree_structure"])
    return sets


def test_max_cat_to_onehot_splits_one_category_against_the_rest(tmp_path: Path) -> None:
    """Above max_cat_to_onehot values, LightGBM splits a categorical into any two sets; at or
    below, one value against the rest (what the feed config asks for user attributes)."""
    data = contract_data()
    many = small().fit(data.train)
    assert any("||" in s for s in _category_sets(many))
    onehot = LightGBMRanker(
        n_estimators=60, learning_rate=0.1, num_leaves=7, max_cat_to_onehot=64
    ).fit(data.train)
    sets = _category_sets(onehot)
    assert sets
    assert not any("||" in s for s in sets)
    onehot.save(tmp_path)
    assert LightGBMRanker.load(tmp_path).get_params() == onehot.get_params()


def test_row_and_feature_sampling_change_the_trees_and_are_checked() -> None:
    data = contract_data()
    sampled = LightGBMRanker(n_estimators=20, feature_fraction=0.5, bagging_fraction=0.7)
    plain = LightGBMRanker(n_estimators=20).fit(data.train)
    first = sampled.fit(data.train).predict(data.test.features)
    assert not np.allclose(first, plain.predict(data.test.features))
    # Seeded: the same draws every fit.
    np.testing.assert_array_equal(sampled.fit(data.train).predict(data.test.features), first)
    with pytest.raises(ValueError, match=r"bagging_fraction 0.0 is not in \(0, 1\]"):
        LightGBMRanker(bagging_fraction=0.0).fit(data.train)
    with pytest.raises(ValueError, match="max_cat_to_onehot 0 < 1"):
        LightGBMRanker(max_cat_to_onehot=0).fit(data.train)
