"""EnsembleRanker: the contract (with and without a deep member), the z-score mean, persistence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from mlsd.models.ranking.base import Ranker
from mlsd.models.ranking.deep import DeepRanker, DeepRankerConfig
from mlsd.models.ranking.ensemble import EnsembleRanker, default_members
from mlsd.models.ranking.gbdt import LightGBMRanker
from mlsd.models.ranking.logistic import LogisticRanker
from mlsd.models.ranking.registry import load_ranker
from tests.models.ranking.contract import RankerContract, contract_data


def small_trees(objective: str = "binary") -> LightGBMRanker:
    return LightGBMRanker(
        objective=objective,  # type: ignore[arg-type]
        n_estimators=60,
        learning_rate=0.1,
        num_leaves=7,
        early_stopping_rounds=10,
    )


def small_members() -> list[tuple[str, Ranker]]:
    return [
        ("logistic", LogisticRanker()),
        ("lightgbm", small_trees()),
        ("lambdarank", small_trees("lambdarank")),
    ]


class TestEnsembleRanker(RankerContract):
    def make_ranker(self) -> Ranker:
        return EnsembleRanker(small_members(), weights={"logistic": 2.0})


class TestDefaultEnsembleWithoutDeep(RankerContract):
    def make_ranker(self) -> Ranker:
        return EnsembleRanker(default_members(deep=False))

    def fit_kwargs(self, valid):
        return {}  # the standardisation then comes from the training rows


def test_a_deep_member_round_trips_through_load_ranker(tmp_path: Path) -> None:
    # Not the whole contract: DCN-v2 computes in float32, so a row's score moves by ~1e-7 with
    # the batch, which the z-scores of rows near the mean turn into a large relative change.
    data = contract_data()
    deep = DeepRanker(
        DeepRankerConfig(embedding_dim=8, n_cross_layers=1, mlp_dims=(16,), max_epochs=10),
        progress=False,
    )
    ensemble = EnsembleRanker([("logistic", LogisticRanker()), ("deep", deep)])
    ensemble.fit(data.train, data.valid).save(tmp_path)
    loaded = load_ranker(tmp_path)
    assert isinstance(loaded, EnsembleRanker)
    assert isinstance(loaded.members_["deep"], DeepRanker)
    features = data.test.features
    np.testing.assert_array_equal(loaded.predict(features), ensemble.predict(features))
    assert roc_auc_score(data.test.label, ensemble.predict(features)) > 0.7


def test_score_is_the_weighted_mean_of_the_members_z_scores() -> None:
    data = contract_data()
    ensemble = EnsembleRanker(small_members(), weights={"logistic": 2.0}).fit(
        data.train, data.valid
    )
    features = data.test.features
    expected = np.zeros(len(features))
    for name, member in ensemble.members_.items():
        reference = member.predict(data.valid.features)
        z = (member.predict(features) - reference.mean()) / reference.std()
        expected += ensemble.weights_[name] * z
    expected /= sum(ensemble.weights_.values())
    np.testing.assert_allclose(ensemble.predict(features), expected, rtol=1e-9, atol=1e-12)
    assert ensemble.weights_ == {"logistic": 2.0, "lightgbm": 1.0, "lambdarank": 1.0}


def test_one_member_ranks_as_that_member() -> None:
    data = contract_data()
    alone = LogisticRanker().fit(data.train)
    ensemble = EnsembleRanker([("logistic", LogisticRanker())]).fit(data.train)
    features = data.test.features
    rho = spearmanr(ensemble.predict(features), alone.predict(features)).statistic
    assert rho == pytest.approx(1.0)


def test_fit_leaves_the_given_members_unfitted() -> None:
    member = LogisticRanker()
    EnsembleRanker([("logistic", member)]).fit(contract_data().train)
    assert not hasattr(member, "schema_")


@pytest.mark.parametrize(
    ("members", "weights", "message"),
    [
        ([], None, "unique names"),
        ([("a", LogisticRanker()), ("a", LogisticRanker())], None, "unique names"),
        ([("a", LogisticRanker())], {"b": 1.0}, "unknown members"),
        ([("a", LogisticRanker())], {"a": 0.0}, "> 0"),
    ],
)
def test_bad_members_or_weights_are_explained(
    members: list[tuple[str, Ranker]], weights: dict[str, float] | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        EnsembleRanker(members, weights=weights).fit(contract_data().train)


def test_predict_before_fit_is_explained() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        EnsembleRanker(small_members()).predict(contract_data().test.features)


def test_saved_members_live_in_their_own_directories(tmp_path: Path) -> None:
    ensemble = EnsembleRanker(small_members()).fit(contract_data().train)
    ensemble.save(tmp_path)
    meta = json.loads((tmp_path / "ranker.json").read_text())
    assert [m["name"] for m in meta["members"]] == ["logistic", "lightgbm", "lambdarank"]
    for entry in meta["members"]:
        member_meta = json.loads((tmp_path / entry["dir"] / "ranker.json").read_text())
        assert member_meta["kind"] == entry["kind"]


def test_load_refuses_a_member_outside_the_directory(tmp_path: Path) -> None:
    EnsembleRanker(small_members()).fit(contract_data().train).save(tmp_path / "model")
    meta_path = tmp_path / "model" / "ranker.json"
    meta = json.loads(meta_path.read_text())
    meta["members"][0]["dir"] = "../elsewhere"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="outside"):
        EnsembleRanker.load(tmp_path / "model")


def test_feature_importance_combines_the_tree_members() -> None:
    data = contract_data()
    importance = EnsembleRanker(small_members()).fit(data.train, data.valid).feature_importance()
    assert set(importance) == {"x1", "x2", "x3", "cat"}
    assert sum(importance.values()) == pytest.approx(2.0)  # two tree members, weight 1 each
    assert importance["x1"] > importance["x3"]
