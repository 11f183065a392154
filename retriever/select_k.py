"""How many retrieved reports to keep (each a config choice, ``KRule.rule``).

- ``fixed``: the top ``k``.
- ``ratio`` (the released MMed-RAG code, ``--clip_threshold``): keep report i while
  s_1 / s_i < ``ratio_threshold``, at most ``k``.
- ``gap`` (the paper's adaptive k): cut at the first i where log(s_i / s_{i+1}) > ``gamma``
  (keep i reports), at most ``k``.

Scores are cosine similarities, best first. A ratio of scores is meaningless once a score is
not positive, so both adaptive rules stop before the first non-positive score (always keeping
the first report). Every rule keeps at least one report when there is one.

``calibrated_k`` is RULE's calibrated k (Xia et al., EMNLP 2024): chosen once per domain on
validation questions from the answers' errors at each k, not per query from the scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch

from common.config import doc


@dataclass
class KRule:
    rule: Literal["fixed", "ratio", "gap"] = doc("fixed", "fixed | ratio (released code: s_1/s_i < ratio_threshold) | gap (paper: cut where log(s_i/s_{i+1}) > gamma)")
    k: int = doc(5, "number of reports (fixed), or the most kept (ratio, gap)")
    ratio_threshold: float = doc(1.5, "ratio rule: keep report i while s_1/s_i is below this")
    gamma: float = doc(0.1, "gap rule: cut after report i when log(s_i/s_{i+1}) exceeds this")


def select_k(scores: Sequence[float], rule: KRule) -> int:
    """How many of ``scores`` (sorted, best first) to keep under ``rule``."""
    n = min(rule.k, len(scores))
    if n <= 0:
        return 0
    if rule.rule == "fixed":
        return n
    if rule.rule == "ratio":
        s1 = scores[0]
        if s1 <= 0:
            return 1
        keep = 1
        while keep < n and scores[keep] > 0 and s1 / scores[keep] < rule.ratio_threshold:
            keep += 1
        return keep
    if rule.rule == "gap":
        for i in range(n - 1):
            if scores[i + 1] <= 0 or scores[i] <= 0 or math.log(scores[i] / scores[i + 1]) > rule.gamma:
                return i + 1
        return n
    raise ValueError(f"unknown k rule {rule.rule!r}; expected fixed, ratio or gap")


def log_gap_quantiles(score_lists: Sequence[Sequence[float]], rule: KRule,
                      qs: Sequence[float] = (0.5, 0.9, 0.99)) -> dict[str, float]:
    """Quantiles of log(s_i / s_{i+1}) over the first ``rule.k`` scores of every query.

    The gap rule's ``gamma`` is on this scale, and the scale belongs to the retriever: a tiny CLIP
    whose cosine scores lie close together never shows the paper's gap of 0.1, so the rule keeps
    ``k`` every time. Written into the retrieval metrics so a user can set ``gamma`` from them.
    """
    gaps = sorted(
        math.log(s[i] / s[i + 1])
        for s in score_lists
        for i in range(min(rule.k, len(s)) - 1)
        if s[i] > 0 and s[i + 1] > 0
    )
    if not gaps:
        return {}
    return {f"log_gap_p{round(q * 100)}": gaps[min(len(gaps) - 1, int(q * len(gaps)))] for q in qs}


Bound = Literal["hoeffding", "hoeffding_bentkus"]


def risk_p_value(risk_hat: float, n: int, alpha: float, bound: Bound = "hoeffding_bentkus") -> float:
    """p-value of the null hypothesis "the true error rate exceeds ``alpha``" after ``n`` answers
    with empirical error rate ``risk_hat`` (Learn-then-Test, Angelopoulos et al. 2021):

        hoeffding:          p = exp(-n * h(min(risk_hat, alpha), alpha)),
                            h(a, b) = a log(a/b) + (1 - a) log((1 - a)/(1 - b))
        hoeffding_bentkus:  p = min(that, e * P(Binomial(n, alpha) <= ceil(n * risk_hat)))

    Hand-written: no installed library has these bounds (the binomial tail is torch's).
    """
    a = min(risk_hat, alpha)
    h = (a * math.log(a / alpha) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - alpha))
    p = math.exp(-n * h)
    if bound == "hoeffding_bentkus":
        m = math.ceil(n * risk_hat - 1e-9)  # n * risk_hat is a count; the tolerance absorbs float error
        tail = torch.distributions.Binomial(n, probs=torch.tensor(alpha, dtype=torch.float64))
        cdf = tail.log_prob(torch.arange(m + 1, dtype=torch.float64)).logsumexp(0).exp().item()
        p = min(p, math.e * cdf)
    elif bound != "hoeffding":
        raise ValueError(f"unknown bound {bound!r}; choose hoeffding or hoeffding_bentkus")
    return p


def calibrated_k(errors_by_k: Mapping[int, Sequence[int]], alpha: float, delta: float,
                 bound: Bound = "hoeffding_bentkus") -> int | None:
    """RULE's calibrated number of references for one domain (Xia et al., EMNLP 2024, after Learn-then-Test).

    ``errors_by_k[k]``: for each validation question, 1 if the answer with k references is wrong,
    else 0. Each k is a null hypothesis H_k: risk(k) > ``alpha``, rejected when its p-value
    (``risk_p_value``) is at most ``delta`` / (number of k tried) (Bonferroni). With probability
    at least 1 - ``delta`` every rejected k has risk at most ``alpha``, so any of them may be
    picked; this picks the lowest empirical risk, then the smallest k. None when no k is
    rejected: no k is known to be safe at this (alpha, delta) and sample size, and the caller
    keeps its own rule.
    """
    if not errors_by_k:
        raise ValueError("no k to choose from")
    if not (0 < alpha < 1 and 0 < delta < 1):
        raise ValueError(f"alpha and delta must lie in (0, 1); got {alpha}, {delta}")
    valid = []
    for k, errors in sorted(errors_by_k.items()):
        if not errors or any(e not in (0, 1) for e in errors):
            raise ValueError(f"k={k}: errors must be a non-empty list of 0/1")
        risk = sum(errors) / len(errors)
        if risk_p_value(risk, len(errors), alpha, bound) <= delta / len(errors_by_k):
            valid.append((risk, k))
    return min(valid)[1] if valid else None
