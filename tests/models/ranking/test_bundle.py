"""The bundle's score → probability chain: the same score gets the same probability in any
batch, and only rankers whose scores are probabilities skip the sigmoid."""

from __future__ import annotations

import numpy as np
import pytest

from mlsd.data.sampling import recalibrate_downsampled
from mlsd.models.ranking.base import ScoreKind, as_probability, sigmoid
from mlsd.models.ranking.bundle import prior_corrected
from mlsd.models.ranking.deep import DeepRanker
from mlsd.models.ranking.ensemble import EnsembleRanker
from mlsd.models.ranking.gbdt import LightGBMRanker
from mlsd.models.ranking.logistic import LogisticRanker


@pytest.mark.parametrize("outputs", ["log_odds", "score"])
def test_a_score_gets_one_probability_whatever_its_batch(outputs: ScoreKind) -> None:
    # Margins that all fall in [0, 1] are still margins: deciding from the batch's values
    # gave the same row a different probability next to a row outside [0, 1].
    alone = prior_corrected([0.2, 0.8], 0.5, outputs)
    beside = prior_corrected([0.2, 0.8, -3.0], 0.5, outputs)
    np.testing.assert_array_equal(alone, beside[:2])
    np.testing.assert_allclose(alone, recalibrate_downsampled(sigmoid([0.2, 0.8]), 0.5))


def test_probabilities_are_corrected_as_they_are() -> None:
    np.testing.assert_allclose(
        prior_corrected([0.2, 0.8], 0.5, "probability"), recalibrate_downsampled([0.2, 0.8], 0.5)
    )
    np.testing.assert_array_equal(prior_corrected([-3.0, 7.0], 1.0, "score"), [-3.0, 7.0])


def test_each_ranker_says_what_its_scores_are() -> None:
    assert LogisticRanker().outputs == "log_odds"
    assert LightGBMRanker(objective="binary").outputs == "log_odds"
    assert LightGBMRanker(objective="lambdarank").outputs == "score"
    assert DeepRanker().outputs == "probability"
    assert EnsembleRanker().outputs == "score"


def test_only_probabilities_and_log_odds_have_a_probability() -> None:
    probabilities = as_probability([0.1, 0.9], "probability")
    from_log_odds = as_probability([0.0, np.log(3.0)], "log_odds")
    assert probabilities is not None
    assert from_log_odds is not None
    np.testing.assert_array_equal(probabilities, [0.1, 0.9])
    np.testing.assert_allclose(from_log_odds, [0.5, 0.75])
    assert as_probability([0.0, 2.0], "score") is None
