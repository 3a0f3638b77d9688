"""The bundle's score → probability chain: the same score gets the same probability in any
batch, and only rankers whose scores are probabilities skip the sigmoid."""

from __future__ import annotations

import numpy as np
import pytest

from mlsd.data.sampling import recalibrate_downsampled
from mlsd.models.ranking.base import ScoreKind, as_probability, sigmoid
from mlsd.models.ranking.bundle import calibration_input, prior_corrected
from mlsd.models.ranking.calibration import Calibrator
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


def test_the_calibrator_reads_log_odds_shifted_by_the_keep_rate() -> None:
    p = np.array([0.1, 0.5, 0.9])
    logit = np.log(p / (1 - p))
    np.testing.assert_allclose(calibration_input(p, 1.0, "probability"), logit)
    np.testing.assert_array_equal(calibration_input(logit, 1.0, "log_odds"), logit)
    np.testing.assert_array_equal(calibration_input([-3.0, 7.0], 1.0, "score"), [-3.0, 7.0])
    # the downsampling correction is prior_corrected's, in log-odds
    shifted = calibration_input(logit, 0.25, "log_odds")
    np.testing.assert_allclose(sigmoid(shifted), prior_corrected(logit, 0.25, "log_odds"))
    assert np.isfinite(calibration_input([0.0, 1.0], 1.0, "probability")).all()  # clipped
    np.testing.assert_array_equal(
        calibration_input(p, 0.5, "probability", scale="prior_corrected"),
        prior_corrected(p, 0.5, "probability"),
    )


def test_platt_leaves_a_calibrated_rankers_probabilities_as_they_are() -> None:
    """A ranker whose probabilities are already right (a deep ranker's output): Platt on their
    log-odds is about the identity, where Platt on the probabilities themselves cannot be
    and put the top 1% of rows at a click rate far above their own."""
    rng = np.random.default_rng(0)

    def world(n: int) -> tuple[np.ndarray, np.ndarray]:
        p = sigmoid(rng.normal(-2.5, 1.5, n))
        return p, (rng.random(n) < p).astype(float)

    (p_fit, y_fit), (p_test, y_test) = world(20_000), world(200_000)
    top = p_test > np.quantile(p_test, 0.99)
    platt = Calibrator("platt").fit(calibration_input(p_fit, 1.0, "probability"), y_fit)
    assert platt.a_ == pytest.approx(1.0, abs=0.05)
    assert platt.b_ == pytest.approx(0.0, abs=0.1)
    calibrated = platt.transform(calibration_input(p_test, 1.0, "probability"))
    assert calibrated[top].mean() == pytest.approx(y_test[top].mean(), abs=0.03)
    on_probs = Calibrator("platt").fit(p_fit, y_fit).transform(p_test)
    assert on_probs[top].mean() - y_test[top].mean() > 0.05  # the old input's distortion
