from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from mlsd.models.ranking.base import Ranker, RankingData
from mlsd.models.ranking.deep import DCNv2, DeepRanker, DeepRankerConfig, multitask_loss
from mlsd.models.ranking.registry import RANKERS
from tests.models.ranking.contract import RankerContract, contract_data

SMALL = DeepRankerConfig(
    embedding_dim=8,
    n_cross_layers=2,
    mlp_dims=(32,),
    dropout=0.0,
    lr=3e-3,
    batch_size=256,
    max_epochs=30,
    patience=4,
)


def small(**changes: object) -> DeepRanker:
    return DeepRanker(dataclasses.replace(SMALL, **changes), progress=False)  # type: ignore[arg-type]


class TestDeepRanker(RankerContract):
    min_auc = 0.75

    def make_ranker(self) -> Ranker:
        return small()

    def test_load_ranker_dispatches_on_kind(self, fitted: Ranker, tmp_path: Path) -> None:
        if DeepRanker.name not in RANKERS:
            pytest.skip("registry.py does not list DeepRanker yet")
        super().test_load_ranker_dispatches_on_kind(fitted, tmp_path)


def with_rating(data: RankingData, *, seed: int) -> RankingData:
    """Add a [0, 1] rating observed on clicked rows only (NaN elsewhere), driven by x3."""
    rng = np.random.default_rng(seed)
    x3 = data.features["x3"].to_numpy()
    rating = 1.0 / (1.0 + np.exp(-(2.0 * x3 + rng.normal(0, 0.3, len(x3)))))
    rating = np.where(data.label == 1, rating, np.nan)
    return RankingData(data.features, {**data.labels, "rating": rating}, data.groups, data.schema)


def test_focal_loss_trains_a_ranker() -> None:
    data = contract_data()
    focal = small(loss="focal").fit(data.train, data.valid)
    bce = small().fit(data.train, data.valid)
    scores = focal.predict(data.test.features)
    assert roc_auc_score(data.test.label, scores) > 0.75
    assert not np.allclose(scores, bce.predict(data.test.features))


def test_multitask_heads_learn_their_own_targets(tmp_path: Path) -> None:
    data = contract_data()
    train, valid = with_rating(data.train, seed=1), with_rating(data.valid, seed=2)
    ranker = small(tasks={"click": 1.0, "rating": 1.0}).fit(train, valid)
    test = data.test.features
    heads = ranker.predict_tasks(test)
    assert list(heads) == ["click", "rating"]
    np.testing.assert_array_equal(heads["click"], ranker.predict(test))
    assert roc_auc_score(data.test.label, heads["click"]) > 0.75
    # The rating head follows x3 (its driver); the click head does not care about x3.
    assert spearmanr(heads["rating"], test["x3"]).statistic > 0.8
    assert abs(spearmanr(heads["click"], test["x3"]).statistic) < 0.3
    ranker.save(tmp_path)
    loaded = DeepRanker.load(tmp_path)
    assert loaded.config.tasks == {"click": 1.0, "rating": 1.0}
    np.testing.assert_array_equal(loaded.predict_tasks(test)["rating"], heads["rating"])


def test_unobserved_extra_targets_do_not_contribute_to_the_loss() -> None:
    config = DeepRankerConfig(tasks={"click": 1.0, "rating": 2.0})
    logits = torch.tensor([[0.3, -1.0], [2.0, 5.0]])
    observed = multitask_loss(logits, torch.tensor([[1.0, 0.7], [0.0, float("nan")]]), config)
    only_first = multitask_loss(logits[:1], torch.tensor([[1.0, 0.7]]), config)
    click = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[:, 0], torch.tensor([1.0, 0.0])
    )
    rating = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[:1, 1], torch.tensor([0.7])
    )
    torch.testing.assert_close(observed, click + 2.0 * rating)
    assert not torch.isclose(observed, only_first)


def test_save_writes_safe_files_with_the_standardisation(tmp_path: Path) -> None:
    data = contract_data()
    ranker = small(max_epochs=3).fit(data.train, data.valid)
    ranker.save(tmp_path)
    meta = json.loads((tmp_path / "ranker.json").read_text())
    assert meta["kind"] == "deep"
    numeric = data.train.features[["x1", "x2", "x3"]].to_numpy()
    np.testing.assert_allclose(meta["numeric_mean"], numeric.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(meta["numeric_std"], numeric.std(0), rtol=1e-5)
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert {"numeric_mean", "numeric_std", "heads.weight"} <= set(state)
    loaded = DeepRanker.load(tmp_path)
    features = data.test.features
    np.testing.assert_array_equal(loaded.predict(features), ranker.predict(features))
    (tmp_path / "ranker.json").write_text(json.dumps({**meta, "kind": "lightgbm"}))
    with pytest.raises(ValueError, match="lightgbm"):
        DeepRanker.load(tmp_path)


def test_early_stopping_keeps_the_best_epoch() -> None:
    data = contract_data()
    ranker = small(max_epochs=40, patience=2, lr=2e-2).fit(data.train, data.valid)
    log = ranker.training_log_
    aucs = [entry["valid_auc"] for entry in log]
    assert ranker.best_epoch_ == int(np.argmax(aucs)) + 1
    assert len(log) == min(40, ranker.best_epoch_ + 2)
    valid_auc = roc_auc_score(data.valid.label, ranker.predict(data.valid.features))
    assert valid_auc == pytest.approx(max(aucs), abs=1e-6)


def test_without_valid_the_last_requests_are_held_out() -> None:
    data = contract_data()
    held_out = small(max_epochs=5).fit(data.train)
    assert "valid_auc" in held_out.training_log_[0]
    plain = small(max_epochs=5, val_frac=0.0).fit(data.train)
    assert "valid_auc" not in plain.training_log_[0]
    assert plain.best_epoch_ == len(plain.training_log_) == 5


def test_fit_restores_the_thread_count_and_the_callers_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    before = torch.get_num_threads()
    small(max_epochs=2, threads=1).fit(contract_data().train, contract_data().valid)
    assert torch.get_num_threads() == before
    torch.testing.assert_close(torch.rand(3), expected)


def test_network_shapes_and_raw_feature_standardisation() -> None:
    model = DCNv2(SMALL, n_numeric=3, cardinalities=[6, 4]).eval()
    dense, sparse = torch.randn(5, 3), torch.randint(0, 4, (5, 2))
    assert model(dense, sparse).shape == (5, 1)
    model.numeric_mean.fill_(10.0)
    shifted = model(dense + 10.0, sparse)
    model.numeric_mean.fill_(0.0)
    torch.testing.assert_close(shifted, model(dense, sparse))


def test_config_round_trip_and_errors() -> None:
    config = dataclasses.replace(SMALL, tasks={"click": 1.0, "rating": 0.5}, loss="focal")
    raw = json.loads(json.dumps(config.to_dict()))
    assert DeepRankerConfig.from_dict(raw) == config
    assert config.task_names == ("click", "rating")
    with pytest.raises(ValueError, match="unknown fields"):
        DeepRankerConfig.from_dict({**raw, "n_layers": 2})
    with pytest.raises(ValueError, match="click"):
        DeepRankerConfig(tasks={"rating": 1.0})
    with pytest.raises(ValueError, match="loss"):
        DeepRankerConfig(loss="hinge")  # type: ignore[arg-type]


def test_missing_task_label_is_named() -> None:
    with pytest.raises(ValueError, match="rating"):
        small(tasks={"click": 1.0, "rating": 1.0}).fit(contract_data().train)


def test_predict_before_fit_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        small().predict(contract_data().test.features)


def test_a_code_absent_from_training_gets_the_columns_mean_vector() -> None:
    """Code 0 (unknown) never occurs in rows coded by the vocabulary: its vector stayed the
    random initial one, and a value first seen at serving scored by the seed."""
    data = contract_data()
    features = data.train.features.copy()
    features.loc[features["cat"] == 0, "cat"] = 3
    train = RankingData(features, data.train.labels, data.train.groups, data.train.schema)
    ranker = small().fit(train, data.valid)  # every train row trains: no inner holdout
    table = next(ranker.model_.embeddings.parameters()).detach()  # the one column's table
    counts = np.bincount(features["cat"].to_numpy(), minlength=table.shape[0])
    expected = (counts / counts.sum()) @ table.numpy()
    np.testing.assert_allclose(table[0].numpy(), expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(table[1].numpy(), expected)  # trained codes keep their own
