"""How many retrieved reports to keep (each a config choice, ``KRule.rule``).

- ``fixed``: the top ``k``.
- ``ratio`` (the released MMed-RAG code, ``--clip_threshold``): keep report i while
  s_1 / s_i < ``ratio_threshold``, at most ``k``.
- ``gap`` (the paper's adaptive k): cut at the first i where log(s_i / s_{i+1}) > ``gamma``
  (keep i reports), at most ``k``.

Scores are cosine similarities, best first. A ratio of scores is meaningless once a score is
not positive, so both adaptive rules stop before the first non-positive score (always keeping
the first report). Every rule keeps at least one report when there is one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

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
