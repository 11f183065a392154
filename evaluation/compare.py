"""The comparison table (``bash scripts/compare.sh``): each method's yes/no accuracy, copy rate and
over-reliance rate on the same questions, per file and over all, each accuracy paired against the
anchor, the base policy answering greedily with fixed-k retrieval (``rag_fixed``).

``pipeline.compare`` runs the evaluations; this module reads their ``predictions.jsonl`` and turns
them into ``compare.json`` and ``compare.md``. A method is one evaluation's answers under one
condition (``Answers``): the answers it gives (its condition), with x_v* (``noised_rag``, its copy
rate) and without retrieval (``no_rag``, for its over-reliance rate).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.io import read_jsonl
from common.stats import paired_interval, resamples, wilson

ALL = "all"  # the row over every file
Question = tuple[str, int]  # (file, record index)


@dataclass(frozen=True)
class Answers:
    """Where a method's answers are: an evaluation's predictions, a policy and a condition."""

    predictions: Path
    policy: str  # "base" or "dpo" (a tuned method's adapter)
    condition: str  # no_rag, rag_fixed or rag_adaptive: whose answers are the method's
    retrieval: bool  # whether the method retrieves: copy and over-reliance rates are defined


def correct_by_question(predictions: Path, policy: str) -> dict[str, dict[Question, bool]]:
    """{condition: {question: right?}} for one policy's yes/no answers in an evaluation."""
    out: dict[str, dict[Question, bool]] = {}
    for row in read_jsonl(predictions):
        if row["task"] == "vqa" and row["policy"] == policy and row.get("correct") is not None:
            out.setdefault(row["condition"], {})[(row["file"], row["index"])] = bool(row["correct"])
    return out


def method_outcomes(answers: Answers) -> dict[str, dict[Question, float]]:
    """{"accuracy", "copy_rate", "over_reliance_rate"}: per question 0/1 (the last two only when
    the method retrieves and the evaluation ran ``noised_rag`` / ``no_rag``)."""
    got = correct_by_question(answers.predictions, answers.policy)
    if answers.condition not in got:
        raise ValueError(f"{answers.predictions}: no `{answers.policy}` answers under {answers.condition}")
    own = got[answers.condition]
    out = {"accuracy": {q: float(c) for q, c in own.items()}}
    if answers.retrieval and "noised_rag" in got:
        out["copy_rate"] = {q: float(c) for q, c in got["noised_rag"].items()}
    if answers.retrieval and "no_rag" in got:
        plain = got["no_rag"]
        out["over_reliance_rate"] = {q: float(plain[q] and not c) for q, c in own.items() if q in plain}
    return out


def comparison_rows(methods: dict[str, dict[str, dict[Question, float]]], anchor: str, versus: tuple[str, ...] = (),
                    n_boot: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """compare.json's rows: per method, per file and over ``ALL``, on the questions every method
    answered (so every row of a file stands on the same questions): n, accuracy, accuracy − the
    ``anchor`` method's with its 95% paired bootstrap interval (``diff``, ``low``, ``high``), the
    same against each method of ``versus`` (``versus: {method: {diff, low, high}}``, e.g. RAG-PT,
    the method the others claim to beat), copy and over-reliance rates (None where a method has none)."""
    for name in (anchor, *versus):
        if name not in methods:
            raise ValueError(f"the reference method {name!r} is not among {sorted(methods)}")
    common = set.intersection(*(set(m["accuracy"]) for m in methods.values()))
    files = sorted({f for f, _ in common})
    rows = []
    for file in [*files, ALL]:
        questions = sorted(q for q in common if file in (ALL, q[0]))
        if not questions:
            continue
        draws = resamples(len(questions), n_boot, seed)
        correct = {name: np.array([m["accuracy"][q] for q in questions]) for name, m in methods.items()}

        def difference(acc: np.ndarray, ref: str) -> dict[str, float]:
            low, high = paired_interval(acc - correct[ref], draws)
            return {"diff": float((acc - correct[ref]).mean()), "low": low, "high": high}

        for name, m in methods.items():
            acc = correct[name]
            row = {"method": name, "file": file, "n": len(questions), "accuracy": float(acc.mean()),
                   **difference(acc, anchor)}
            if versus:
                row["versus"] = {ref: difference(acc, ref) for ref in versus}
            for rate in ("copy_rate", "over_reliance_rate"):
                values = [m[rate][q] for q in questions if q in m.get(rate, {})]
                row[rate] = float(np.mean(values)) if values and len(values) == len(questions) else None
            rows.append(row)
    return rows


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def markdown(rows: list[dict[str, Any]], meaning: dict[str, str], anchor: str, notes: list[str] = ()) -> str:
    """compare.md: methods as rows and files as columns (accuracy, n per column), as the paper's
    Table 1; then over all files each method's accuracy with its Wilson interval, its differences to the
    anchor (and to each ``versus`` method of the rows) with their paired intervals, copy and over-reliance rates."""
    files = sorted({r["file"] for r in rows} - {ALL})
    by = {(r["method"], r["file"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    n_of = {f: next(r["n"] for r in rows if r["file"] == f) for f in [*files, ALL]}
    lines = ["# Methods compared on the same questions", "",
             f"Yes/no accuracy per file (n = questions every method answered). Intervals: 95%; the "
             f"difference is paired against `{anchor}` (the base, greedy, fixed-k retrieval) on the same questions.", "",
             "| method | " + " | ".join(f"{f} (n={n_of[f]})" for f in files) + f" | all (n={n_of[ALL]}) |",
             "|---|" + "---|" * (len(files) + 1)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(_pct(by[(m, f)]["accuracy"]) if (m, f) in by else "–"
                                              for f in [*files, ALL]) + " |")
    versus = list(by[(methods[0], ALL)].get("versus", {}))
    lines += ["", f"Over all files (n = {n_of[ALL]}):", "",
              "| method | what | accuracy [95% Wilson] | − anchor [95% paired] | "
              + "".join(f"− {v} [95% paired] | " for v in versus) + "copy rate | over-reliance |",
              "|---|---|---|---|" + "---|" * len(versus) + "---|---|"]

    def interval(d: dict[str, float]) -> str:
        return f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"

    for m in methods:
        r = by[(m, ALL)]
        lo, hi = wilson(round(r["accuracy"] * r["n"]), r["n"])
        lines.append(f"| {m} | {meaning.get(m, '')} | {r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | {interval(r)} | "
                     + "".join(f"{interval(r['versus'][v])} | " for v in versus)
                     + f"{_pct(r['copy_rate'])} | {_pct(r['over_reliance_rate'])} |")
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"
