import pytest

from policy.answers import (
    corpus_report_scores,
    is_correct,
    report_correct,
    report_score,
    vqa_correct,
    words,
    yes_no,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes.", "yes"),
        ("yes", "yes"),
        ("Yes, there is pleural effusion in this image.", "yes"),
        ("  YES!", "yes"),
        ("No", "no"),
        ("no.", "no"),
        ("No, there is no pleural effusion.", "no"),
        ("No, there is no evidence of cardiomegaly in this image.", "no"),
        ("Cardiomegaly.", "other"),
        ("There is no pleural effusion.", "other"),
        ("Not sure.", "other"),
        ("Nodule in the left lung.", "other"),
        ("Yesterday", "other"),
        ("", "other"),
    ],
)
def test_yes_no_normalises_real_phrasings(text, expected):
    assert yes_no(text) == expected


@pytest.mark.parametrize(
    "pred, ref, expected",
    [
        ("Yes.", "Yes.", True),
        ("yes, there is a nodule", "Yes.", True),
        ("No, there is no pleural effusion.", "No", True),
        ("no.", "No, there is no edema.", True),
        ("Yes.", "No, there is no edema.", False),
        ("There is no edema.", "No", False),  # no leading yes/no: not an answer to a yes/no question
        ("Cardiomegaly.", "Cardiomegaly.", True),
        ("cardiomegaly", "Cardiomegaly.", True),
        ("The image shows cardiomegaly.", "Cardiomegaly.", True),
        ("Pleural effusion.", "Cardiomegaly.", False),
        ("Left lung.", "Right lung.", False),
        ("anything", "", False),
    ],
)
def test_vqa_correct(pred, ref, expected):
    assert vqa_correct(pred, ref) is expected


def test_words_drop_case_and_punctuation():
    assert words("No, there is NO pleural effusion.") == ["no", "there", "is", "no", "pleural", "effusion"]


REF = "The heart size is normal. There is a small left pleural effusion. No pneumothorax."


def test_report_scores_order_by_overlap():
    same = report_score(REF, REF)
    close = report_score("The heart size is normal. There is a left pleural effusion.", REF)
    far = report_score("Optic disc cupping, enlarged.", REF)
    assert same == pytest.approx(1.0)
    assert 0.3 < close < 1.0
    assert far == 0.0
    assert report_score(REF.lower().replace(".", ""), REF) == pytest.approx(1.0)  # case/punct ignored
    assert report_score("", REF) == 0.0


def test_rouge_l_value_by_hand():
    # LCS of "a b c d" and "a c d e f" is 3: P = 3/4, R = 3/5, F = (1+b^2)PR / (R + b^2 P), b = 1.2
    p, r, b2 = 3 / 4, 3 / 5, 1.2**2
    assert report_score("a b c d", "a c d e f") == pytest.approx((1 + b2) * p * r / (r + b2 * p))


def test_bleu_sentence_score():
    assert report_score(REF, REF, metric="bleu") == pytest.approx(1.0, abs=1e-6)
    partial = report_score("The heart size is normal.", REF, metric="bleu")
    assert 0.0 < partial < 0.5  # brevity penalty
    with pytest.raises(ValueError):
        report_score(REF, REF, metric="meteor")


def test_report_correct_threshold_and_dispatch():
    pred = "The heart size is normal. There is a left pleural effusion."
    score = report_score(pred, REF)
    assert report_correct(pred, REF, threshold=score)
    assert not report_correct(pred, REF, threshold=score + 1e-6)
    assert is_correct(pred, REF, "report", threshold=0.5) is (score >= 0.5)
    assert is_correct("No, there is no edema.", "No", "vqa")
    with pytest.raises(ValueError):
        is_correct("a", "b", "caption")


def test_corpus_scores():
    out = corpus_report_scores([REF, "Optic disc cupping."], [REF, REF])
    assert set(out) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l"}
    assert out["rouge_l"] == pytest.approx(0.5)  # mean of 1.0 and 0.0
    assert 0.0 < out["bleu_4"] < 1.0
    assert corpus_report_scores([""], [REF])["rouge_l"] == 0.0
