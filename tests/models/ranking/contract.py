"""The shared contract every ``Ranker`` must meet; a new ranker's tests are a few lines.

class TestMyRanker(RankerContract):
    def make_ranker(self) -> Ranker:
        return MyRanker(seed=0)

Hooks:
    make_ranker: a fresh, unfitted ranker with fixed seeds (required).
    fit_kwargs: extra keyword arguments for ``fit``; by default ``{"valid": valid}`` so the
        early-stopping path runs too. Return ``{}`` to fit on ``train`` alone.
    min_auc: the held-out AUC the ranker must beat (class attribute, 0.7).

The data is synthetic with a known signal: ``click ~ Bernoulli(sigmoid(1.5 x1 - x2 + effect[cat]
- 1))``, 200 requests × 20 candidates, split by request into train / valid / test (140/30/30). A
noise column ``x3`` and a non-feature column ``item_id`` ride along, so rankers must read the
schema's columns by name and ignore the rest.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from mlsd.models.ranking.base import FeatureSchema, Ranker, RankingData
from mlsd.models.ranking.registry import load_ranker

N_GROUPS = 200
GROUP_SIZE = 20
CAT_CARDINALITY = 6
# Code 0 is "unknown"; the other codes move the click log-odds by these amounts.
CAT_EFFECT = np.array([0.0, -1.5, -0.5, 0.0, 0.8, 1.8])
PICKLE_SUFFIXES = {".pkl", ".pickle", ".joblib"}

SCHEMA = FeatureSchema(
    numeric=("x1", "x2", "x3"),
    categorical=("cat",),
    cardinalities={"cat": CAT_CARDINALITY},
)


class ContractData(NamedTuple):
    train: RankingData
    valid: RankingData
    test: RankingData


def synthetic_ranking_data(
    n_groups: int = N_GROUPS, group_size: int = GROUP_SIZE, *, seed: int = 0
) -> RankingData:
    """Requests of ``group_size`` candidates whose clicks follow a known logistic model."""
    rng = np.random.default_rng(seed)
    n = n_groups * group_size
    x1, x2, x3 = rng.normal(size=(3, n))
    cat = rng.integers(0, CAT_CARDINALITY, size=n).astype(np.int64)
    logit = 1.5 * x1 - 1.0 * x2 + CAT_EFFECT[cat] - 1.0
    click = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float64)
    features = pd.DataFrame(
        {
            "item_id": rng.integers(0, 10_000, size=n).astype(np.int64),
            "x1": x1,
            "x2": x2,
            "x3": x3,
            "cat": cat,
        }
    )
    groups = np.repeat(np.arange(n_groups, dtype=np.int64), group_size)
    return RankingData(features, {"click": click}, groups, SCHEMA)


@cache
def contract_data() -> ContractData:
    """The shared train / valid / test split by request (cached: tests must not mutate it)."""
    data = synthetic_ranking_data()
    rows = np.arange(N_GROUPS * GROUP_SIZE)
    cut_valid, cut_test = 140 * GROUP_SIZE, 170 * GROUP_SIZE
    return ContractData(
        data.take(rows[:cut_valid]),
        data.take(rows[cut_valid:cut_test]),
        data.take(rows[cut_test:]),
    )


class RankerContract:
    """Inherit and implement :meth:`make_ranker`; every test here then runs for it."""

    min_auc: float = 0.7

    def make_ranker(self) -> Ranker:
        raise NotImplementedError

    def fit_kwargs(self, valid: RankingData) -> dict[str, Any]:
        return {"valid": valid}

    def _fit(self) -> Ranker:
        data = contract_data()
        ranker = self.make_ranker()
        assert ranker.fit(data.train, **self.fit_kwargs(data.valid)) is ranker
        return ranker

    @pytest.fixture(scope="class")
    @classmethod
    def fitted(cls) -> Ranker:
        # Class-scoped: one fit serves every read-only test below.
        return cls()._fit()

    def test_fit_returns_self(self) -> None:
        data = contract_data()
        ranker = self.make_ranker()
        assert ranker.fit(data.train, **self.fit_kwargs(data.valid)) is ranker

    def test_predict_shape_dtype_finite(self, fitted: Ranker) -> None:
        features = contract_data().test.features
        scores = fitted.predict(features)
        assert isinstance(scores, np.ndarray)
        assert scores.dtype == np.float64
        assert scores.shape == (len(features),)
        assert np.isfinite(scores).all()
        assert np.ptp(scores) > 0, "constant scores cannot rank"

    def test_beats_random_on_held_out_requests(self, fitted: Ranker) -> None:
        test = contract_data().test
        auc = roc_auc_score(test.label, fitted.predict(test.features))
        assert auc > self.min_auc, f"held-out AUC {auc:.3f} <= {self.min_auc}"

    def test_learns_the_categorical_signal(self, fitted: Ranker) -> None:
        """Changing only ``cat`` from the worst to the best code must raise the score."""
        features = contract_data().test.features.copy()
        worst, best = int(np.argmin(CAT_EFFECT)), int(np.argmax(CAT_EFFECT))
        low = fitted.predict(features.assign(cat=np.int64(worst)))
        high = fitted.predict(features.assign(cat=np.int64(best)))
        assert (high > low).mean() > 0.9

    def test_deterministic_given_the_seed(self, fitted: Ranker) -> None:
        features = contract_data().test.features
        again = self._fit()
        np.testing.assert_allclose(
            again.predict(features), fitted.predict(features), rtol=1e-6, atol=1e-9
        )

    def test_scores_do_not_depend_on_the_batch(self, fitted: Ranker) -> None:
        """A row's score is the same alone, reordered, or with a non-default index."""
        features = contract_data().test.features
        full = fitted.predict(features)
        shuffled = np.random.default_rng(1).permutation(len(features))
        np.testing.assert_allclose(
            fitted.predict(features.iloc[shuffled]), full[shuffled], rtol=1e-6, atol=1e-9
        )
        np.testing.assert_allclose(
            fitted.predict(features.iloc[[7]]), full[[7]], rtol=1e-6, atol=1e-9
        )

    def test_column_order_does_not_matter(self, fitted: Ranker) -> None:
        features = contract_data().test.features
        reversed_columns = features[list(reversed(features.columns))]
        np.testing.assert_allclose(
            fitted.predict(reversed_columns), fitted.predict(features), rtol=1e-6, atol=1e-9
        )

    def test_save_load_round_trip_without_pickle(self, fitted: Ranker, tmp_path: Path) -> None:
        features = contract_data().test.features
        fitted.save(tmp_path)
        pickles = [p.name for p in tmp_path.rglob("*") if p.suffix in PICKLE_SUFFIXES]
        assert not pickles, f"pickle files in the saved ranker: {pickles}"
        loaded = type(fitted).load(tmp_path)
        assert type(loaded) is type(fitted)
        np.testing.assert_array_equal(loaded.predict(features), fitted.predict(features))

    def test_load_ranker_dispatches_on_kind(self, fitted: Ranker, tmp_path: Path) -> None:
        features = contract_data().test.features
        fitted.save(tmp_path)
        meta = json.loads((tmp_path / "ranker.json").read_text())
        assert meta["kind"] == fitted.name
        loaded = load_ranker(tmp_path)
        assert type(loaded) is type(fitted)
        np.testing.assert_array_equal(loaded.predict(features), fitted.predict(features))

    def test_compile_keeps_the_scores(self, fitted: Ranker, tmp_path: Path) -> None:
        # What serving loads: a saved ranker, compiled (native trees where it has them).
        features = contract_data().test.features
        fitted.save(tmp_path)
        loaded = load_ranker(tmp_path)
        assert loaded.compile() is loaded
        np.testing.assert_allclose(
            loaded.predict(features), fitted.predict(features), rtol=0, atol=1e-9
        )
        np.testing.assert_allclose(
            loaded.predict_matrix(SCHEMA.matrix(features), SCHEMA),
            fitted.predict(features),
            rtol=0,
            atol=1e-9,
        )

    def test_missing_column_is_named(self, fitted: Ranker) -> None:
        features = contract_data().test.features.drop(columns=["x2"])
        with pytest.raises(ValueError, match="x2"):
            fitted.predict(features)

    @pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
    def test_non_finite_value_is_named(self, fitted: Ranker, bad: float) -> None:
        features = contract_data().test.features.copy()
        features.loc[3, "x1"] = bad
        with pytest.raises(ValueError, match="x1"):
            fitted.predict(features)

    def test_out_of_range_category_is_named(self, fitted: Ranker) -> None:
        features = contract_data().test.features.copy()
        features.loc[5, "cat"] = CAT_CARDINALITY
        with pytest.raises(ValueError, match="cat"):
            fitted.predict(features)

    def test_predict_matrix_scores_what_predict_scores(self, fitted: Ranker) -> None:
        # The request path hands rankers the float block (FeatureSchema.matrix), not a frame.
        features = contract_data().test.features
        expected = fitted.predict(features)
        np.testing.assert_array_equal(
            fitted.predict_matrix(SCHEMA.matrix(features), SCHEMA), expected
        )
        flipped = FeatureSchema(
            tuple(reversed(SCHEMA.numeric)), SCHEMA.categorical, SCHEMA.cardinalities
        )
        np.testing.assert_array_equal(
            fitted.predict_matrix(flipped.matrix(features), flipped), expected
        )

    @pytest.mark.parametrize(
        ("column", "bad"),
        [("x1", np.nan), ("x2", np.inf), ("cat", CAT_CARDINALITY), ("cat", -1.0), ("cat", 2.5)],
    )
    def test_predict_matrix_names_a_bad_value(
        self, fitted: Ranker, column: str, bad: float
    ) -> None:
        matrix = SCHEMA.matrix(contract_data().test.features)
        matrix[4, SCHEMA.columns.index(column)] = bad
        with pytest.raises(ValueError, match=f"column '{column}' row 4"):
            fitted.predict_matrix(matrix, SCHEMA)
