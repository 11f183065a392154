"""The methods of MMed-RAG's comparison and what came after it, on the same questions of one chain.

    bash scripts/compare.sh [--chain outputs/toy] [--out outputs/toy/compare] [--roles test_vqa]
        [--limit 0] [--methods NAME ...] [--rule_alpha 0.35] [--rule_delta 0.1]

Run after the demo (or on any chain pipeline.demo made: world, policy, retrieval, pairs, dpo).
Each method is one evaluation (evaluation.evaluate) of the chain's base policy or of an adapter
trained on the chain's pairs, under the same prompts, references, images and x_v*:

- decoding, without and with retrieval: ``greedy`` / ``rag_fixed`` (the anchor every interval is
  paired against), ``beam`` / ``beam_rag`` (3 beams), ``dola`` / ``dola_rag`` (DoLa, the "high"
  layers), ``vcd`` / ``vcd_rag`` (visual contrastive decoding against the record's x_v*;
  policy.decoding);
- retrieval: ``rag_adaptive`` (the paper's gap rule), ``rule`` (RULE: k per routed domain calibrated
  on ``val_vqa`` answers of the base, retriever.select_k.calibrated_k, with DPO on the
  over-reliance pairs D_oa2 alone);
- tuning: ``mmed_rag`` (the chain's DPO: D_cm then D_oa, the paper's RAG-PT), ``mdpo`` (mDPO's
  objective on the same pairs, train_dpo ``loss_type mdpo``), ``grpo`` (dpo.train_grpo: the yes/no
  reward on the alignment questions the pairs were built from, references in the prompt) and
  ``grpo_copy_penalty`` (the same, an answer that survives x_v* losing 0.5).

Each evaluation goes to ``<out>/<evaluation>/eval`` (an adapter it trains to ``<out>/<evaluation>/dpo``,
or ``.../grpo``)
and is not redone when its results exist. Writes ``<out>/compare.json`` (rows: method, file, n,
accuracy, diff/low/high against the anchor, ``versus`` the same against RAG-PT (``mmed_rag``, when
run), copy_rate, over_reliance_rate), ``compare.md`` and ``compare.png``.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.io import atomic_write_json, atomic_write_text, read_jsonl
from evaluation.compare import Answers, comparison_rows, markdown, method_outcomes
from evaluation.plots import plot_comparison
from pipeline import demo
from pipeline.demo import run_module as _python
from retriever.select_k import calibrated_k

ANCHOR = "rag_fixed"
RAG_PT = "mmed_rag"  # the method the later ones claim to beat: every row also says by how much, paired
RETRIEVED = ("no_rag", "rag_fixed", "noised_rag")  # a retrieving method's own, copy and over-reliance conditions


@dataclass
class Evaluation:
    """One evaluate run: which policy (base, or an adapter trained with ``train`` options, or the
    chain's own DPO), how it decodes and under which conditions."""

    policy: str  # "base" | "dpo"
    conditions: tuple[str, ...] = RETRIEVED
    decoding: list[str] = field(default_factory=list)  # evaluate options
    train: list[str] | None = None  # the trainer's options on the chain; None: no training
    trainer: str = "train_dpo"  # the stage that trains it, on the chain's pairs (train_dpo) or questions (train_grpo)


EVALUATIONS = {
    "greedy": Evaluation("base", ("no_rag", "rag_fixed", "rag_adaptive", "noised_rag")),
    "beam": Evaluation("base", decoding=["--decoding", "beam", "--num_beams", "3"]),
    "dola": Evaluation("base", decoding=["--decoding", "dola", "--dola_layers", "high"]),
    "vcd": Evaluation("base", decoding=["--decoding", "vcd"]),
    "mmed_rag": Evaluation("dpo"),
    "mdpo": Evaluation("dpo", train=["--loss_type", "mdpo"]),
    "rule": Evaluation("dpo", train=["--pair_types", "[oa2]", "--stages", "[[oa2]]"]),
    "grpo": Evaluation("dpo", train=[], trainer="train_grpo"),
    "grpo_copy_penalty": Evaluation("dpo", train=["--copy_penalty", "0.5"], trainer="train_grpo"),
}
# trainer: (module, its toy config, the folder its run writes under <out>/<evaluation>/)
TRAINERS = {"train_dpo": ("dpo.train_dpo", "configs/toy/dpo.yaml", "dpo"),
            "train_grpo": ("dpo.train_grpo", "configs/toy/grpo.yaml", "grpo")}
# method: (what it is, its evaluation, whose answers, whether it retrieves)
METHODS = {
    "greedy": ("base, greedy, no retrieval", "greedy", "no_rag", False),
    "beam": ("base, beam search (3 beams), no retrieval", "beam", "no_rag", False),
    "dola": ("base, DoLa (high layers), no retrieval", "dola", "no_rag", False),
    "vcd": ("base, VCD against x_v*, no retrieval", "vcd", "no_rag", False),
    "rag_fixed": ("base, greedy, fixed k (the anchor)", "greedy", "rag_fixed", True),
    "beam_rag": ("base, beam search, fixed k", "beam", "rag_fixed", True),
    "dola_rag": ("base, DoLa, fixed k", "dola", "rag_fixed", True),
    "vcd_rag": ("base, VCD, fixed k", "vcd", "rag_fixed", True),
    "rag_adaptive": ("base, greedy, the paper's adaptive k (gap rule)", "greedy", "rag_adaptive", True),
    "rule": ("RULE: calibrated k per domain + DPO on D_oa2 alone", "rule", "rag_fixed", True),
    "mmed_rag": ("MMed-RAG's RAG-PT: DPO on D_cm, then D_oa", "mmed_rag", "rag_fixed", True),
    "mdpo": ("mDPO: DPO + conditional + anchored terms, same pairs", "mdpo", "rag_fixed", True),
    "grpo": ("GRPO: yes/no reward, alignment questions with retrieval", "grpo", "rag_fixed", True),
    "grpo_copy_penalty": ("GRPO + copy penalty: -0.5 when the answer survives x_v*", "grpo_copy_penalty", "rag_fixed",
                          True),
}


def evaluate_args(chain: Path, roles: list[str], limit: int, out: Path, policy: str, conditions: tuple[str, ...],
                  adapter: Path | None, extra: list[str] = ()) -> list[str]:
    """evaluate options: the chain's retrieval and base policy, noise seed 0, the given roles."""
    args = ["configs/toy/evaluate.yaml", *demo.stage_args("evaluate", chain, 0), "--out", str(out),
            "--policies", f"[{policy}]", "--conditions", f"[{','.join(conditions)}]", "--limit", str(limit),
            "--roles", f"[{','.join(roles)}]", "--plots", "false", "--gallery", "0", *extra]
    if adapter is not None:
        args += ["--adapter", str(adapter), "--dpo_dir", str(adapter.parent)]
    return args


def calibrate(chain: Path, out: Path, alpha: float, delta: float, limit: int, ks: list[int]) -> dict[str, Any]:
    """RULE's k per routed domain: the base's greedy answers to ``val_vqa`` with each k of ``ks`` references,
    errors per domain and k, ``calibrated_k`` at (alpha, delta); a domain with no safe k is left to fixed_k."""
    errors: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for k in ks:
        folder = out / f"k{k}"
        if not (folder / "results.json").is_file():
            _python("evaluation.evaluate", *evaluate_args(chain, ["val_vqa"], limit, folder, "base", ("rag_fixed",),
                                                          None, ["--fixed_k", str(k)]))
        for row in read_jsonl(folder / "predictions.jsonl"):
            if row["task"] == "vqa" and row.get("correct") is not None:
                errors[row["domain"]][k].append(0 if row["correct"] else 1)
    chosen = {d: calibrated_k(by_k, alpha, delta) for d, by_k in sorted(errors.items())}
    return {"alpha": alpha, "delta": delta, "k_by_domain": {d: k for d, k in chosen.items() if k is not None},
            "risk": {d: {k: sum(e) / len(e) for k, e in by_k.items()} for d, by_k in sorted(errors.items())},
            "n": {d: len(by_k[ks[0]]) for d, by_k in sorted(errors.items())}}


def run_evaluation(name: str, chain: Path, out: Path, roles: list[str], limit: int,
                   k_by_domain: dict[str, int] | None = None) -> Path:
    """Train the evaluation's adapter if it needs one, evaluate it; returns its predictions."""
    spec, folder = EVALUATIONS[name], out / name
    adapter = None
    if spec.policy == "dpo":
        adapter = chain / "dpo" / "adapter"
        if spec.train is not None:
            module, config, sub = TRAINERS[spec.trainer]
            adapter = folder / sub / "adapter"
            if not (adapter / "adapter_config.json").is_file():
                print(f"[compare] {name}: training -> {adapter.parent}", flush=True)
                _python(module, config, *demo.stage_args(spec.trainer, chain, 0),
                        "--train.output_dir", str(adapter.parent), *spec.train)
    extra = list(spec.decoding)
    if k_by_domain:
        extra += ["--k_by_domain", json.dumps(k_by_domain)]
    if not (folder / "eval" / "results.json").is_file():
        print(f"[compare] {name}: evaluation -> {folder / 'eval'}", flush=True)
        _python("evaluation.evaluate", *evaluate_args(chain, roles, limit, folder / "eval", spec.policy,
                                                      spec.conditions, adapter, extra))
    return folder / "eval" / "predictions.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chain", type=Path, default=demo.OUT, help="the chain compared on (default outputs/toy)")
    ap.add_argument("--out", type=Path, default=Path("outputs/toy/compare"), help="output folder")
    ap.add_argument("--roles", nargs="+", default=["test_vqa"], help="index roles evaluated (default test_vqa)")
    ap.add_argument("--limit", type=int, default=0, help="records per evaluated file (0 = all)")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                    help="methods to compare (default all; rag_fixed, the anchor, is always run)")
    ap.add_argument("--rule_alpha", type=float, default=0.35,
                    help="RULE: the risk (wrong-answer rate) a calibrated k must be shown to stay under")
    ap.add_argument("--rule_delta", type=float, default=0.1, help="RULE: the calibration's error probability")
    ap.add_argument("--rule_ks", type=int, nargs="+", default=[1, 2, 3],
                    help="RULE: the numbers of references tried (default 1 2 3; at most what the retrieval kept)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    methods = list(dict.fromkeys([ANCHOR, *args.methods]))
    rule = None
    if "rule" in methods:
        rule = calibrate(args.chain, args.out / "rule" / "calibration", args.rule_alpha, args.rule_delta, args.limit,
                         args.rule_ks)
    predictions = {e: run_evaluation(e, args.chain, args.out, args.roles, args.limit,
                                     rule["k_by_domain"] if e == "rule" else None)
                   for e in dict.fromkeys(METHODS[m][1] for m in methods)}
    outcomes = {}
    for m in methods:
        _, evaluation, condition, retrieves = METHODS[m]
        policy = EVALUATIONS[evaluation].policy
        outcomes[m] = method_outcomes(Answers(predictions[evaluation], policy, condition, retrieves))
    rows = comparison_rows(outcomes, ANCHOR, tuple(m for m in [RAG_PT] if m in outcomes))
    notes = []
    if rule is not None:
        notes.append(f"rule: k per domain {rule['k_by_domain'] or 'none proven safe'} at alpha {rule['alpha']}, "
                     f"delta {rule['delta']} (val_vqa risks: {json.dumps(rule['risk'])})")
    result = {"anchor": ANCHOR, "roles": args.roles, "limit": args.limit, "chain": str(args.chain),
              "methods": {m: METHODS[m][0] for m in methods}, "rule": rule, "rows": rows, "notes": notes}
    atomic_write_json(args.out / "compare.json", result)
    text = markdown(rows, result["methods"], ANCHOR, notes)
    atomic_write_text(args.out / "compare.md", text)
    plot_comparison(rows, ANCHOR, args.out / "compare.png")
    print(text)


if __name__ == "__main__":
    main()
