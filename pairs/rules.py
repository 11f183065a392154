"""The preference-pair rules of docs/DESIGN.md, on the three answers of one record.

a = M(x_v, (x_t, x_r)), b = M(x_v*, (x_t, x_r)), c = M(x_v, x_t); y the ground truth. The
released MMed-RAG code never shipped this step; these rules are ours, written to match the
released data (the default ``copy`` rule) and the paper's wording (``wrong``).

The misalignment diagnostics over the same conditions, reported by the pair builder and by
evaluation: the copy rate (accuracy under b) and the over-reliance rate (c right, a wrong).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

CmRule = Literal["copy", "wrong", "both"]


@dataclass(frozen=True)
class Pair:
    pair_type: str  # "cm" | "oa1" | "oa2"
    chosen: str
    rejected: str
    rejected_noised: bool  # the rejected side sees x_v* instead of x_v
    with_retrieval: bool  # both sides' prompts carry the retrieved reports


def pairs_for_record(
    y: str, a: str, b: str, c: str, correct: Callable[[str, str], bool], cm_rule: CmRule = "copy"
) -> list[Pair]:
    """All pairs one record yields; ``correct(answer, y)`` decides each condition's correctness."""
    ok_a, ok_b, ok_c = correct(a, y), correct(b, y), correct(c, y)
    pairs = []
    # D_cm "copy": right with the real image AND with a noised one -> the model did not look.
    # Same text on both sides; only the image differs, so DPO pushes the answer onto the image.
    if cm_rule in ("copy", "both") and ok_a and ok_b:
        pairs.append(Pair("cm", y, y, rejected_noised=True, with_retrieval=True))
    # D_cm "wrong": right with the real image, wrong with the noised one -> prefer y over b.
    if cm_rule in ("wrong", "both") and ok_a and not ok_b:
        pairs.append(Pair("cm", y, b, rejected_noised=False, with_retrieval=True))
    # D_oa1: retrieval helps (right with it, wrong without) -> prefer the retrieval-grounded answer.
    if ok_a and not ok_c:
        pairs.append(Pair("oa1", a, c, rejected_noised=False, with_retrieval=True))
    # D_oa2: retrieval misleads (right without, wrong with) -> prefer the answer that resisted it.
    if ok_c and not ok_a:
        pairs.append(Pair("oa2", c, a, rejected_noised=False, with_retrieval=True))
    return pairs


def copy_rate(noised_correct: Sequence[bool]) -> float:
    """Accuracy with a noised image plus retrieval: how often the answer survives losing the image."""
    return sum(noised_correct) / len(noised_correct) if noised_correct else 0.0


def over_reliance_rate(correct_without: Sequence[bool], correct_with: Sequence[bool]) -> float:
    """Share of questions right without retrieval and wrong with it."""
    n = len(correct_without)
    if n != len(correct_with):
        raise ValueError("condition answers differ in length")
    return sum(c and not a for c, a in zip(correct_without, correct_with)) / n if n else 0.0
