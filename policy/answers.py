"""Answer matching: is a generated answer the ground truth?

The pair builder's rules ("a == y", "c != y") and VQA accuracy rest on these functions:
- yes/no questions compare the leading yes/no of both texts (data.answers.yes_no) ("No, there is no effusion." == "No");
- other short answers ("Cardiomegaly.") are right when every word of the reference appears in the
  prediction (LLaVA-Med's open-question recall, required to be complete);
- reports are right when ROUGE-L (or BLEU) against the reference reaches a threshold.
BLEU and ROUGE-L come from pycocoevalcap (the COCO caption scorers, pure Python); its PTB
tokenizer needs Java, so ``words`` stands in for it: lower case, punctuation dropped, as the
PTB step of the COCO pipeline leaves the text.
"""

from __future__ import annotations

import re
from typing import Literal, Sequence

from pycocoevalcap.bleu.bleu_scorer import BleuScorer
from pycocoevalcap.rouge.rouge import Rouge

from data.answers import yes_no

Metric = Literal["rouge_l", "bleu"]
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    """Lower-case word tokens, punctuation dropped."""
    return _WORD.findall((text or "").lower())


def vqa_correct(pred: str, ref: str) -> bool:
    """A VQA answer matches the reference (yes/no by polarity, other answers by word recall)."""
    ref_yn = yes_no(ref)
    if ref_yn != "other":
        return yes_no(pred) == ref_yn
    ref_words = words(ref)
    return bool(ref_words) and set(ref_words) <= set(words(pred))


def report_score(pred: str, ref: str, metric: Metric = "rouge_l", bleu_n: int = 4) -> float:
    """ROUGE-L F (beta 1.2, as COCO) or sentence BLEU-``bleu_n`` of a prediction vs a reference."""
    p, r = " ".join(words(pred)), " ".join(words(ref))
    if not p or not r:
        return 0.0
    if metric == "rouge_l":
        return float(Rouge().calc_score([p], [r]))
    if metric == "bleu":
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


def corpus_report_scores(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-1..4 and mean ROUGE-L, the report-generation numbers of the evaluation table."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    if not preds:
        return {}
    # pycocoevalcap cannot score an empty string; distinct placeholders never match anything.
    res = {i: [" ".join(words(p)) or "<empty-prediction>"] for i, p in enumerate(preds)}
    gts = {i: [" ".join(words(r)) or "<empty-reference>"] for i, r in enumerate(refs)}
    scorer = BleuScorer(n=4)
    for i in res:
        scorer += (res[i][0], gts[i])
    bleu, _ = scorer.compute_score(option="closest", verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    out = {f"bleu_{n}": float(b) for n, b in enumerate(bleu, 1)}
    out["rouge_l"] = float(rouge)
    return out
