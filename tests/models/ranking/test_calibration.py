"""Calibrator: both methods repair miscalibrated scores on held-out data and survive JSON."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
from scipy.special import expit, logit

from mlsd.evaluation.metrics import expected_calibration_error
from mlsd.models.ranking.calibration import Calibrator

N = 20_000

# Each distortion maps the true probability p to a score, and the score to the probability a
# naive reader would take it for (identity for scores already in [0, 1]).
Distortion = tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]
DISTORTIONS: dict[str, Distortion] = {
    "squashed to 0.5": (lambda p: 0.5 + 0.3 * (p - 0.5), lambda s: s),
    "cubed": (lambda p: p**3, lambda s: s),
    "exp'd": (lambda p: np.expm1(2.0 * p) / np.expm1(2.0), lambda s: s),
    "over-confident margins": (lambda p: 3.0 * logit(p), expit),
}


def draw(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """True probabilities spread over (0, 1) and clicks drawn from them."""
    rng = np.random.default_rng(seed)
    p = expit(rng.normal(-0.5, 1.3, size=N))
    return p, (rng.random(N) < p).astype(np.float64)


@pytest.mark.parametrize("method", ["platt", "isotonic"])
@pytest.mark.parametrize("distortion", list(DISTORTIONS))
def test_lowers_held_out_calibration_error(method: str, distortion: str) -> None:
    to_score, as_probability = DISTORTIONS[distortion]
    p_fit, y_fit = draw(0)
    p_test, y_test = draw(1)
    calibrator = Calibrator(method).fit(to_score(p_fit), y_fit)  # type: ignore[arg-type]
    raw = expected_calibration_error(y_test, as_probability(to_score(p_test)))
    calibrated = expected_calibration_error(y_test, calibrator.transform(to_score(p_test)))
    oracle = expected_calibration_error(y_test, p_test)
    assert raw > 0.05, "the distortion must be visible for the test to mean anything"
    assert calibrated < raw / 2, (raw, calibrated)
    # Isotonic undoes any monotone distortion; Platt only one that is linear in log-odds.
    if method == "isotonic" or distortion == "over-confident margins":
        assert calibrated < oracle + 0.01, (oracle, calibrated)


def test_platt_recovers_the_margin_scale() -> None:
    p, y = draw(0)
    calibrator = Calibrator("platt").fit(3.0 * logit(p), y)
    assert calibrator.a_ == pytest.approx(1 / 3, rel=0.1)
    assert calibrator.b_ == pytest.approx(0.0, abs=0.05)


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_monotone_and_bounded(method: str) -> None:
    p, y = draw(2)
    calibrator = Calibrator(method).fit(p**3, y)  # type: ignore[arg-type]
    grid = np.linspace(-1.0, 2.0, 2_001)  # beyond the fitted range on both sides
    out = calibrator.transform(grid)
    assert (np.diff(out) >= 0).all()
    assert out.min() >= 0.0
    assert out.max() <= 1.0


def test_isotonic_thresholds_are_non_decreasing() -> None:
    p, y = draw(3)
    calibrator = Calibrator("isotonic").fit(p, y)
    assert (np.diff(calibrator.x_thresholds_) >= 0).all()
    assert (np.diff(calibrator.y_thresholds_) >= 0).all()
    assert len(calibrator.x_thresholds_) > 5


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_json_round_trip_is_exact(method: str) -> None:
    p, y = draw(4)
    scores = logit(p) * 2.0
    calibrator = Calibrator(method).fit(scores, y)  # type: ignore[arg-type]
    reloaded = Calibrator.from_dict(json.loads(json.dumps(calibrator.to_dict())))
    np.testing.assert_array_equal(reloaded.transform(scores), calibrator.transform(scores))


def test_bad_inputs_are_explained() -> None:
    with pytest.raises(ValueError, match="row 1"):
        Calibrator().fit([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError, match="both"):
        Calibrator().fit([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="method"):
        Calibrator("beta").fit([0.1, 0.2], [0, 1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="method"):
        Calibrator.from_dict({"method": "beta"})
