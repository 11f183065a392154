"""The effect table's aggregation over seeds (dpo.effect)."""

from __future__ import annotations

import pytest

from dpo.effect import summarise, table


def test_summarise_means_and_sample_std_per_policy_and_metric():
    runs = {
        0: {"base": {"copy_rate": 0.6, "accuracy_rag_fixed": 0.5}, "dpo": {"copy_rate": 0.4, "accuracy_rag_fixed": 0.7}},
        1: {"base": {"copy_rate": 0.6, "accuracy_rag_fixed": 0.5}, "dpo": {"copy_rate": 0.5, "accuracy_rag_fixed": 0.6}},
        2: {"base": {"copy_rate": 0.6, "accuracy_rag_fixed": 0.5}, "dpo": {"copy_rate": 0.6, "accuracy_rag_fixed": 0.5}},
    }
    s = summarise(runs)
    assert s["dpo"]["copy_rate"]["mean"] == pytest.approx(0.5)
    assert s["dpo"]["copy_rate"]["std"] == pytest.approx(0.1)  # sample std of 0.4, 0.5, 0.6
    assert s["base"]["copy_rate"] == {"mean": pytest.approx(0.6), "std": 0.0, "n": 3}
    assert "accuracy_no_rag" not in s["dpo"]  # not measured: not invented
    md = table(s, [0, 1, 2])
    assert "| dpo | n/a | 0.600 ± 0.100 | 0.500 ± 0.100 | n/a |" in md


def test_one_seed_has_zero_spread():
    s = summarise({3: {"dpo": {"copy_rate": 0.25}}})
    assert s["dpo"]["copy_rate"] == {"mean": 0.25, "std": 0.0, "n": 1}
