"""Answer matching: is a generated answer the ground truth? And the one report-text measure.

The pair builder's rules ("a == y", "c != y") and VQA accuracy rest on these functions:
- yes/no questions compare the leading yes/no of both texts (data.answers.yes_no)
  ("No, there is no effusion." == "No");
- other short answers ("Cardiomegaly.") are right when every word of the reference appears in the
  prediction (LLaVA-Med's open-question recall, required to be complete);
- reports are right when ROUGE-L (or BLEU) against the reference reaches a threshold.
BLEU and ROUGE-L come from pycocoevalcap (the COCO caption scorers, pure Python); its PTB
tokenizer needs Java, so ``tokenize`` stands in for it: lower case, words (x-ray, crohn's kept
whole) and punctuation marks as tokens. ``tokenize`` and ``rouge_l`` are also what
evaluation.metrics reports, so the pair builder's "ROUGE-L >= threshold" is the evaluation's ROUGE-L.
"""

from __future__ import annotations

import re
from typing import Literal

from pycocoevalcap.bleu.bleu_scorer import BleuScorer
from pycocoevalcap.rouge.rouge import Rouge

from data.answers import yes_no

Metric = Literal["rouge_l", "bleu"]
_TOKEN = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*|[^\sa-z0-9]")


def tokenize(text: str) -> str:
    """Lower-cased words and punctuation marks, space-separated: the text the COCO scorers read."""
    return " ".join(_TOKEN.findall((text or "").lower()))


def words(text: str) -> list[str]:
    """The word tokens of ``tokenize`` (punctuation marks left out)."""
    return [t for t in tokenize(text).split() if t[0].isalnum()]


def rouge_l(pred: str, ref: str) -> float:
    """Sentence ROUGE-L F (beta 1.2, pycocoevalcap's) of a prediction vs one reference, both
    ``tokenize``d; 0.0 when either has no token (an empty report earns nothing)."""
    p, r = tokenize(pred), tokenize(ref)
    return float(Rouge().calc_score([p], [r])) if p and r else 0.0


def vqa_correct(pred: str, ref: str) -> bool:
    """A VQA answer matches the reference (yes/no by polarity, other answers by word recall)."""
    ref_yn = yes_no(ref)
    if ref_yn != "other":
        return yes_no(pred) == ref_yn
    ref_words = words(ref)
    return bool(ref_words) and set(ref_words) <= set(words(pred))


def report_score(pred: str, ref: str, metric: Metric = "rouge_l", bleu_n: int = 4) -> float:
    """``rouge_l`` or sentence BLEU-``bleu_n`` of a prediction vs a reference (``tokenize``d)."""
    if metric == "rouge_l":
        return rouge_l(pred, ref)
    if metric == "bleu":
        p, r = tokenize(pred), tokenize(ref)
        if not p or not r:
            return 0.0
        scorer = BleuScorer(n=bleu_n)
        scorer += (p, [r])
        scores, _ = scorer.compute_score(option="closest", verbose=0)
        return float(scores[bleu_n - 1])
    raise ValueError(f"unknown report metric {metric!r}; use 'rouge_l' or 'bleu'")


def report_correct(pred: str, ref: str, threshold: float, metric: Metric = "rouge_l") -> bool:
    """A generated report counts as right when its score reaches ``threshold``."""
    return report_score(pred, ref, metric) >= threshold


def is_correct(
    pred: str, ref: str, task: str, threshold: float = 0.5, metric: Metric = "rouge_l"
) -> bool:
    """The pair builder's "== y": ``vqa_correct`` for "vqa", ``report_correct`` for "report"."""
    if task == "vqa":
        return vqa_correct(pred, ref)
    if task == "report":
        return report_correct(pred, ref, threshold, metric)
    raise ValueError(f"unknown task {task!r}; use 'vqa' or 'report'")

