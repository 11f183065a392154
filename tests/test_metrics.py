import math
import shutil

import pytest

from evaluation.metrics import report_metrics, vqa_metrics
from pairs.rules import copy_rate, over_reliance_rate


def test_vqa_accuracy_f1_by_hand():
    pred = ["yes", "yes", "no", "no", "other", "yes", "no"]
    gold = ["yes", "no", "no", "yes", "yes", "other", "no"]  # one gold row is not yes/no
    m = vqa_metrics(pred, gold)
    assert m["n"] == 6 and m["n_not_yes_no"] == 1 and m["n_pred_other"] == 1
    assert m["accuracy"] == pytest.approx(3 / 6)
    # yes positive: tp=1, fp=1, fn=2 (a "no" and an "other" on gold yes)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    assert vqa_metrics([], [])["accuracy"] == 0.0


def test_report_metrics_identity_and_bleu_by_hand():
    refs = ["the heart is enlarged .", "no focal consolidation is seen ."]
    same = report_metrics(refs, refs)
    assert same["bleu_1"] == pytest.approx(1.0) and same["bleu"] == pytest.approx(1.0, abs=1e-6)
    assert same["rouge_l"] == pytest.approx(1.0)
    # one sentence, hypothesis a strict 3-word prefix of a 5-token reference:
    # BLEU-1 = precision 1 * brevity penalty exp(1 - 5/3)
    m = report_metrics(["the heart is"], ["the heart is enlarged ."])
    assert m["bleu_1"] == pytest.approx(math.exp(1 - 5 / 3), rel=1e-4)
    # ROUGE-L (beta 1.2): lcs 3, precision 1, recall 3/5
    p, r, b = 1.0, 3 / 5, 1.2
    assert m["rouge_l"] == pytest.approx((1 + b * b) * p * r / (r + b * b * p), rel=1e-6)
    assert report_metrics(["", "x"], ["a b", "x"])["n"] == 2  # empty prediction survives


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java")
def test_meteor_runs_and_scores_between_exact_and_unrelated():
    ref = "the heart is enlarged with small effusion ."
    from evaluation.evaluate import MeteorSession

    m = MeteorSession().score([ref, "lungs are clear ."], [ref, ref])  # one JVM start: it loads for ~10 s
    assert 0.2 < m < 0.9


def test_diagnostics():
    assert copy_rate([True, True, False, True]) == 0.75
    assert over_reliance_rate([True, True, False, False], [True, False, True, False]) == 0.25
