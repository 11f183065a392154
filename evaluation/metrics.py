"""Evaluation metrics: yes/no VQA accuracy and F1 and report-generation text metrics. The
misalignment diagnostics (copy rate, over-reliance rate) are in pairs.rules, beside the pair rules
they mirror, because the pair builder reports them too.

Report metrics are pycocoevalcap's, the suite the report-generation literature reports:
BLEU-1..4 (coco-caption BLEU: corpus-level, closest-reference brevity penalty; ``bleu`` is
BLEU-4), ROUGE-L, CIDEr-D; METEOR 1.5 (runs the jar shipped in the wheel: needs Java) is
evaluation.evaluate's MeteorSession, which starts the jar once per run. Texts go through
policy.answers.tokenize (lower-cased words and punctuation, a regex instead of the suite's PTB
tokenizer, which also needs Java and a CoreNLP jar), and ROUGE-L is the mean of
policy.answers.rouge_l, the score the pair builder's report threshold reads.
"""

from __future__ import annotations

from typing import Sequence

from policy.answers import rouge_l, tokenize


def vqa_metrics(pred: Sequence[str], gold: Sequence[str]) -> dict[str, float | int]:
    """``pred``/``gold`` are normalised labels ("yes" | "no" | "other").

    Rows whose gold answer is not yes/no are counted (``n_not_yes_no``) and left out; a
    prediction that is neither yes nor no counts as wrong (``n_pred_other``). F1 takes yes as
    the positive class.
    """
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predictions for {len(gold)} answers")
    rows = [(p, g) for p, g in zip(pred, gold) if g in ("yes", "no")]
    tp = sum(p == "yes" and g == "yes" for p, g in rows)
    fp = sum(p == "yes" and g == "no" for p, g in rows)
    fn = sum(p != "yes" and g == "yes" for p, g in rows)
    correct = sum(p == g for p, g in rows)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "n": len(rows),
        "n_not_yes_no": len(gold) - len(rows),
        "n_pred_other": sum(p == "other" for p, _ in rows),
        "accuracy": correct / len(rows) if rows else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
    }


def report_metrics(pred: Sequence[str], ref: Sequence[str]) -> dict[str, float | int]:
    """Corpus-level BLEU-1..4, ROUGE-L and CIDEr-D of ``pred`` against ``ref``.

    METEOR is evaluation.evaluate's ``MeteorSession``: one Java jar for the whole run."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(pred) != len(ref):
        raise ValueError(f"{len(pred)} predictions for {len(ref)} references")
    if not pred:
        return {"n": 0}
    # an empty prediction would make BLEU and CIDEr fail: they score it as a lone full stop
    res = {i: [tokenize(p) or "."] for i, p in enumerate(pred)}
    gts = {i: [tokenize(r) or "."] for i, r in enumerate(ref)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out: dict[str, float | int] = {"n": len(pred), **{f"bleu_{i + 1}": float(b) for i, b in enumerate(bleu)}}
    out["bleu"] = out["bleu_4"]
    out["rouge_l"] = sum(rouge_l(p, r) for p, r in zip(pred, ref)) / len(pred)
    out["cider"] = float(Cider().compute_score(gts, res)[0])
    return out
