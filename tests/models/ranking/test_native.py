"""Compiled trees (lleaves): LightGBM's raw scores from native code, checked before use."""

from __future__ import annotations

from typing import Any
from unittest import mock

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from mlsd.models.ranking.ensemble import EnsembleRanker
from mlsd.models.ranking.gbdt import LightGBMRanker, predict_threads
from mlsd.models.ranking.logistic import LogisticRanker
from mlsd.models.ranking.native import CompiledTrees, compile_booster, probe_rows
from tests.models.ranking.contract import SCHEMA, contract_data


@pytest.fixture(scope="module")
def booster() -> lgb.Booster:
    """Numeric and categorical splits, missing values in training: every branch kind."""
    rng = np.random.default_rng(0)
    n = 4000
    x = rng.normal(size=(n, 4))
    x[:, 3] = rng.integers(0, 12, n)  # categorical
    x[rng.random(n) < 0.1, 1] = np.nan
    logit = x[:, 0] - np.nan_to_num(x[:, 1]) + np.isin(x[:, 3], [2, 5, 7]) * 1.5
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    data = lgb.Dataset(x, label=y, categorical_feature=[3])
    params = {"objective": "binary", "num_leaves": 15, "verbosity": -1, "seed": 0}
    return lgb.train(params, data, num_boost_round=40)


@pytest.mark.parametrize("inline", [False, True])
def test_compiled_scores_are_lightgbms_raw_scores(booster: lgb.Booster, inline: bool) -> None:
    trees = compile_booster(booster, inline=inline)
    assert trees.inline is inline
    assert trees.max_abs_diff <= 1e-9
    assert trees.compile_seconds > 0
    rows = probe_rows(booster.model_to_string(), 4, 2000, seed=7)
    expected = booster.predict(rows, raw_score=True)
    np.testing.assert_allclose(trees.predict(rows), expected, rtol=0, atol=1e-9)
    # Another layout and dtype (the request path's block is a transposed one) and threads.
    np.testing.assert_allclose(trees.predict(np.asfortranarray(rows)), expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(
        trees.predict(rows.T.copy().T, threads=2), expected, rtol=0, atol=1e-9
    )


def test_probe_rows_cover_each_features_range_categories_and_nan(booster: lgb.Booster) -> None:
    rows = probe_rows(booster.model_to_string(), 4, 512)
    assert rows.shape == (512, 4)
    assert 0.05 < np.isnan(rows).mean() < 0.15
    seen = set(np.unique(rows[:, 3][~np.isnan(rows[:, 3])]).tolist())
    assert set(range(12)) <= seen  # every category of training
    assert max(seen) == 12.0  # and one it never saw


def test_a_compiled_model_that_disagrees_is_refused(booster: lgb.Booster) -> None:
    import lleaves

    real = lleaves.Model.predict

    def off(self: Any, data: np.ndarray, n_jobs: int | None = None) -> np.ndarray:
        return np.asarray(real(self, data, n_jobs=n_jobs)) + 1e-6

    with (
        mock.patch.object(lleaves.Model, "predict", off),
        pytest.raises(ValueError, match="differ from LightGBM by 1e-06"),
    ):
        compile_booster(booster)


def test_rows_of_the_wrong_width_are_refused(booster: lgb.Booster) -> None:
    trees = compile_booster(booster)
    with pytest.raises(ValueError, match="rows need 4 columns, got shape"):
        trees.predict(np.zeros((3, 5)))


def test_a_compiled_ranker_scores_as_lightgbm_whatever_the_threads() -> None:
    data = contract_data()
    ranker = LightGBMRanker(n_estimators=30, num_leaves=7).fit(data.train, data.valid)
    features = data.test.features
    expected = ranker.predict(features)
    assert ranker.compiled_ is None
    assert ranker.compile() is ranker
    assert isinstance(ranker.compiled_, CompiledTrees)
    np.testing.assert_allclose(ranker.predict(features), expected, rtol=0, atol=1e-9)
    with predict_threads(2):
        np.testing.assert_allclose(ranker.predict(features), expected, rtol=0, atol=1e-9)
    matrix = SCHEMA.matrix(features)
    np.testing.assert_allclose(ranker.predict_matrix(matrix, SCHEMA), expected, atol=1e-9)
    # The input checks still come first: a bad category is named, not scored.
    matrix[2, SCHEMA.columns.index("cat")] = 2.5
    with pytest.raises(ValueError, match="column 'cat' row 2"):
        ranker.predict_matrix(matrix, SCHEMA)
    # Refitting drops the compiled trees (they would score the old model).
    ranker.fit(data.train)
    assert ranker.compiled_ is None


def test_an_ensemble_compiles_its_tree_members() -> None:
    data = contract_data()
    ensemble = EnsembleRanker(
        [("logistic", LogisticRanker()), ("lightgbm", LightGBMRanker(n_estimators=20))]
    ).fit(data.train, data.valid)
    expected = ensemble.predict(data.test.features)
    assert ensemble.compile() is ensemble
    trees = ensemble.members_["lightgbm"]
    assert isinstance(trees, LightGBMRanker)
    assert trees.compiled_ is not None
    scores = ensemble.predict(pd.DataFrame(data.test.features))
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-9)
