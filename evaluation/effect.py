"""The effect table: base vs DPO policy over several DPO seeds, on the held-out test files.

Each seed trains DPO (``dpo.train_dpo`` with the given config, ``train.seed`` and ``noise_seed``
set to the seed) on the same pairs and base policy, then evaluates base and DPO
(``evaluation.evaluate``). A seed whose ``results.json`` exists is not redone. The spread is therefore
that of DPO training (LoRA init, sample order, noise images), not of the world or the base policy.

Run: ``python -m evaluation.effect [--seeds 0 1 2] [--out outputs/toy/effect] [--limit 50]``. The same
driver compares settings on the validation questions without touching test, e.g.
``--roles val_vqa --dpo_args "--stages [[cm],[oa1,oa2]]" --out outputs/toy/sweep/stages``.
Writes ``<out>/seed<N>/{dpo,eval}/``, ``effect.json`` (per-seed figures) and ``effect.md``
(mean ± sample standard deviation, then per seed the paired difference DPO − base with a 95%
bootstrap interval over questions: the seeds' spread says nothing about how many questions a
difference rests on, the interval does).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from common.io import atomic_write_json, atomic_write_text, read_jsonl

METRICS = ("accuracy_no_rag", "accuracy_rag_fixed", "copy_rate", "over_reliance_rate")


def run_seed(seed: int, out: Path, dpo_config: str, eval_config: str, limit: int, roles: list[str],
             dpo_args: list[str] = (), eval_args: list[str] = ()) -> dict[str, Any]:
    """Train and evaluate one seed (skipped when its results exist); its diagnostics per policy."""
    results = out / f"seed{seed}" / "eval" / "results.json"
    if not results.is_file():
        dpo_dir = out / f"seed{seed}" / "dpo"
        _python("dpo.train_dpo", dpo_config, "--train.output_dir", str(dpo_dir), "--train.seed", str(seed),
                "--noise_seed", str(seed), *dpo_args)
        _python("evaluation.evaluate", eval_config, "--adapter", str(dpo_dir / "adapter"), "--dpo_dir", str(dpo_dir),
                "--out", str(results.parent), "--limit", str(limit), "--roles", f"[{','.join(roles)}]", *eval_args)
    return json.loads(results.read_text())["diagnostics"]


def question_outcomes(predictions: Path) -> dict[str, dict[str, np.ndarray]]:
    """{policy: {metric: 0/1 per question}} over the yes/no questions both policies answered in
    no_rag, rag_fixed and noised_rag, in one question order (``evaluation.evaluate`` predictions)."""
    correct: dict[tuple, bool] = {}
    for row in read_jsonl(predictions):
        if row["task"] == "vqa" and row.get("correct") is not None:
            correct[(row["policy"], row["condition"], row["file"], row["index"])] = bool(row["correct"])
    conditions = ("no_rag", "rag_fixed", "noised_rag")
    policies = sorted({k[0] for k in correct})
    questions = sorted({k[2:] for k in correct
                        if all((p, c, *k[2:]) in correct for p in policies for c in conditions)})
    out = {}
    for p in policies:
        got = {c: np.array([correct[(p, c, *q)] for q in questions], dtype=float) for c in conditions}
        out[p] = {"accuracy_no_rag": got["no_rag"], "accuracy_rag_fixed": got["rag_fixed"],
                  "copy_rate": got["noised_rag"], "over_reliance_rate": got["no_rag"] * (1 - got["rag_fixed"])}
    return out


def paired_differences(outcomes: dict[str, dict[str, np.ndarray]], n_boot: int = 2000,
                       seed: int = 0) -> dict[str, dict[str, float]]:
    """DPO − base per metric with a 95% percentile bootstrap interval: questions are resampled,
    and each resample scores both policies on the same questions (a paired comparison)."""
    if not {"base", "dpo"} <= outcomes.keys():
        return {}
    n = len(outcomes["base"]["copy_rate"])
    if n == 0:
        return {}
    draws = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    out = {}
    for m in METRICS:
        diff = outcomes["dpo"][m] - outcomes["base"][m]
        boot = diff[draws].mean(axis=1)
        out[m] = {"diff": float(diff.mean()), "low": float(np.percentile(boot, 2.5)),
                  "high": float(np.percentile(boot, 97.5)), "n": n}
    return out


def _python(module: str, *args: str) -> None:
    subprocess.run([sys.executable, "-m", module, *args], check=True)


def summarise(runs: dict[int, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """{policy: {metric: {"mean", "std", "n"}}} over seeds (std: sample, 0 for one seed)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for policy in sorted({p for diag in runs.values() for p in diag}):
        out[policy] = {}
        for m in METRICS:
            xs = [diag[policy][m] for diag in runs.values() if policy in diag and m in diag[policy]]
            if xs:
                out[policy][m] = {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                                  "n": len(xs)}
    return out


def table(summary: dict[str, dict[str, dict[str, float]]], seeds: list[int],
          differences: dict[int, dict[str, dict[str, float]]] | None = None) -> str:
    lines = [f"Mean ± sample std over DPO seeds {seeds}.", "",
             "| policy | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for policy, ms in summary.items():
        cells = [f"{ms[m]['mean']:.3f} ± {ms[m]['std']:.3f}" if m in ms else "n/a" for m in METRICS]
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    rows = {s: d for s, d in (differences or {}).items() if d}
    if rows:
        n = next(iter(rows.values()))[METRICS[0]]["n"]
        lines += ["", f"DPO − base per seed, 95% paired bootstrap interval over {n} questions.", "",
                  "| seed | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
        for s, d in rows.items():
            cells = [f"{d[m]['diff']:+.3f} [{d[m]['low']:+.3f}, {d[m]['high']:+.3f}]" for m in METRICS]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="DPO seeds (default 0 1 2)")
    ap.add_argument("--out", default="outputs/toy/effect", help="output folder")
    ap.add_argument("--dpo_config", default="configs/toy/dpo.yaml", help="DPO config (pairs, policy, optimisation)")
    ap.add_argument("--eval_config", default="configs/toy/evaluate.yaml", help="evaluation config")
    ap.add_argument("--limit", type=int, default=50, help="records per test file (0 = all)")
    ap.add_argument("--roles", nargs="+", default=["test_vqa"],
                    help="index roles to evaluate (default test_vqa; val_vqa to compare settings)")
    ap.add_argument("--dpo_args", default="", help='extra train_dpo options, one string: "--beta 0.5 --train.epochs 2"')
    ap.add_argument("--eval_args", default="", help='extra evaluate options, one string: "--retrieval_dir DIR"')
    args = ap.parse_args()
    out = Path(args.out)
    runs = {s: run_seed(s, out, args.dpo_config, args.eval_config, args.limit, args.roles,
                        shlex.split(args.dpo_args), shlex.split(args.eval_args)) for s in args.seeds}
    summary = summarise(runs)
    differences = {s: paired_differences(question_outcomes(out / f"seed{s}" / "eval" / "predictions.jsonl"))
                   for s in args.seeds}
    text = table(summary, args.seeds, differences)
    atomic_write_json(out / "effect.json", {"seeds": runs, "summary": summary, "differences": differences})
    atomic_write_text(out / "effect.md", text)
    print(text)


if __name__ == "__main__":
    main()
