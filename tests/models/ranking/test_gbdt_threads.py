"""LightGBMRanker.predict under ``predict_threads``: the thread count a batch job imposes."""

from __future__ import annotations

import threading
from typing import Any, cast
from unittest import mock

import numpy as np
import pandas as pd
import pytest

from mlsd.models.ranking.gbdt import SERIAL_ROWS, LightGBMRanker, predict_threads
from tests.models.ranking.contract import contract_data


def test_predict_threads_sets_the_threads_not_the_scores() -> None:
    data = contract_data()
    ranker = LightGBMRanker(n_estimators=20, num_leaves=7, num_threads=2).fit(data.train)
    rows = pd.concat([data.valid.features] * (SERIAL_ROWS // len(data.valid.features) + 1))
    asked: list[int] = []
    predict = ranker.booster_.predict

    def spy(*args: Any, **kwargs: Any) -> np.ndarray:
        asked.append(int(kwargs["num_threads"]))
        return cast(np.ndarray, predict(*args, **kwargs))

    with mock.patch.object(ranker.booster_, "predict", side_effect=spy):
        default = ranker.predict(rows)  # large: the ranker's own threads
        with predict_threads(1):
            forced = ranker.predict(rows)
            seen_elsewhere: list[np.ndarray] = []
            other = threading.Thread(target=lambda: seen_elsewhere.append(ranker.predict(rows)))
            other.start()
            other.join()
        after = ranker.predict(rows)
    assert asked == [2, 1, 2, 2]  # the block, in this thread only, and only while it lasts
    np.testing.assert_array_equal(forced, default)
    np.testing.assert_array_equal(seen_elsewhere[0], default)
    np.testing.assert_array_equal(after, default)
    with pytest.raises(ValueError, match="n >= 1"), predict_threads(0):
        pass
