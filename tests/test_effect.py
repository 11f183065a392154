"""The effect table's aggregation over seeds (evaluation.effect)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evaluation.effect import paired_differences, question_outcomes, summarise, table


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


def _predictions(path, base: dict[str, list[bool]], dpo: dict[str, list[bool]]):
    rows = [{"policy": p, "condition": c, "file": "f", "index": i, "task": "vqa", "correct": ok}
            for p, by_cond in (("base", base), ("dpo", dpo)) for c, oks in by_cond.items() for i, ok in enumerate(oks)]
    rows.append({"policy": "base", "condition": "no_rag", "file": "f", "index": 99, "task": "vqa", "correct": True})  # unpaired
    rows.append({"policy": "dpo", "condition": "no_rag", "file": "r", "index": 0, "task": "report", "correct": None})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_question_outcomes_pair_questions_and_derive_over_reliance(tmp_path):
    path = _predictions(tmp_path / "p.jsonl",
                        {"no_rag": [True, True, False, False], "rag_fixed": [True, False, True, False], "noised_rag": [1, 1, 0, 0]},
                        {"no_rag": [True, True, True, False], "rag_fixed": [True, True, True, False], "noised_rag": [0, 0, 0, 0]})
    got = question_outcomes(path)
    assert len(got["base"]["copy_rate"]) == 4  # index 99 (base only) and the report row left out
    np.testing.assert_array_equal(got["base"]["over_reliance_rate"], [0, 1, 0, 0])
    d = paired_differences(got)
    assert d["copy_rate"]["diff"] == pytest.approx(-0.5) and d["accuracy_rag_fixed"]["diff"] == pytest.approx(0.25)
    assert d["over_reliance_rate"]["diff"] == pytest.approx(-0.25)
    for m in d.values():
        assert m["low"] <= m["diff"] <= m["high"] and m["n"] == 4


def test_bootstrap_interval_shrinks_with_questions_and_excludes_zero_for_a_clear_gain():
    rng = np.random.default_rng(1)
    def outcomes(n, p_base, p_dpo):
        b, d = (rng.random(n) < p_base).astype(float), (rng.random(n) < p_dpo).astype(float)
        return {"base": {m: b for m in ("accuracy_no_rag", "accuracy_rag_fixed", "copy_rate", "over_reliance_rate")},
                "dpo": {m: d for m in ("accuracy_no_rag", "accuracy_rag_fixed", "copy_rate", "over_reliance_rate")}}
    small = paired_differences(outcomes(100, 0.5, 0.5))["copy_rate"]
    large = paired_differences(outcomes(4000, 0.5, 0.6))["copy_rate"]
    assert large["high"] - large["low"] < (small["high"] - small["low"]) / 3
    assert large["low"] > 0  # a 0.1 gain over 4000 questions is not noise
    assert paired_differences({"base": {}}) == {}
    md = table(summarise({0: {"base": {"copy_rate": 0.5}}}), [0], {0: paired_differences(outcomes(100, 0.5, 0.5))})
    assert "paired bootstrap interval over 100 questions" in md and "| 0 | " in md
