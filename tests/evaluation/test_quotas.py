"""MergeConfig's fixed quotas (tune = false); the search itself is tested through the harnesses
in test_retrieval.py and test_offline.py."""

from __future__ import annotations

import pytest

from mlsd.evaluation.quotas import MergeConfig


def test_fixed_quotas_default_to_equal_shares_and_cold_users_to_the_warm_ones() -> None:
    quotas, cold = MergeConfig(tune=False).fixed(["popularity", "als", "ease", "bpr"])
    assert quotas == dict.fromkeys(("popularity", "als", "ease", "bpr"), 0.25)
    assert cold is None  # merge_by_segment then gives cold users the same quotas


def test_fixed_quotas_are_the_configured_ones_for_each_segment() -> None:
    config = MergeConfig(tune=False, quotas={"als": 150, "popularity": 0.25},
                         cold_quotas={"popularity": 1.0})  # fmt: skip
    quotas, cold = config.fixed(["popularity", "als"])
    assert quotas == {"als": 150, "popularity": 0.25}
    assert cold == {"popularity": 1.0}
    quotas["als"] = 1  # a copy: the config is not changed through it
    assert config.quotas["als"] == 150


def test_bad_fixed_quotas_are_refused_when_the_config_is_made() -> None:
    with pytest.raises(ValueError, match=r"quota must be in \[0, 1\], got -1.0"):
        MergeConfig(tune=False, cold_quotas={"popularity": -1.0})


def test_the_merge_in_words_says_whether_it_was_tuned_and_how_it_fuses() -> None:
    tuned = MergeConfig(quota_step=0.2).describe()
    assert "merged with quotas tuned on validation [t1, t2)" in tuned
    assert "grid step 0.2, warm and cold users apart" in tuned
    fused = MergeConfig(tune=False, method="rrf", rank_constant=10.0, quotas={"a": 1.0})
    assert fused.describe() == (
        "the sources' lists fused by reciprocal rank (rank constant 10) with fixed weights "
        "({'a': 1.0}; not tuned)"
    )
