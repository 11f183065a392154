"""The whole pipeline on the toy world, each stage through its own script, as a user runs them.

A rerun skips stages whose output is there and whose inputs and config are unchanged
(common/stages.py); ``--force`` redoes everything, ``--from STAGE`` redoes from there on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.stages import Stage, run

OUT = Path("outputs/toy")
# name, script, output folder, config files that feed it, packages whose code it runs (its
# package and every package that may import per docs/DESIGN.md's layout), folders of OUT it reads
PIPELINE = [
    ("make_toy", "make_toy", "world", [], ["toy", "pairs", "policy", "retriever"], []),
    ("validate_world", None, "world", [], [], ["world"]),
    ("make_toy_policy", "make_toy_policy", "policy", ["configs/toy/toy_policy.yaml", "configs/toy/sft.yaml", "configs/prompts/default.yaml"],
     ["toy", "pairs", "policy", "retriever"], ["world"]),
    ("finetune_clip", "finetune_clip", "clip", ["configs/toy/clip.yaml"], ["retriever"], ["world"]),
    ("retrieve", "retrieve", "retrieval", ["configs/toy/retrieve.yaml"], ["retriever"], ["world", "clip"]),
    ("build_pairs", "build_pairs", "pairs", ["configs/toy/pairs.yaml"], ["pairs", "policy", "retriever"],
     ["world", "retrieval", "policy"]),
    ("train_dpo", "train_dpo", "dpo", ["configs/toy/dpo.yaml"], ["dpo", "pairs", "policy", "retriever"], ["pairs", "policy"]),
    ("evaluate", "evaluate", "eval", ["configs/toy/evaluate.yaml"], ["evaluation", "dpo", "pairs", "policy", "retriever"],
     ["world", "retrieval", "policy", "dpo"]),
]
BASE_CODE = ["common", "data"]  # every stage runs these


def stages() -> list[Stage]:
    out = []
    for name, script, folder, configs, packages, inputs in PIPELINE:
        code = [Path(p) for p in [*packages, *BASE_CODE]]
        if script is None:  # every file of the world, as a user checks data before a long run
            cmd = [sys.executable, "-m", "data.validate", "--manifest", str(OUT / folder / "manifest.json"), "--check-images"]
        else:
            cmd = ["bash", f"scripts/{script}.sh"]
            code.append(Path(f"scripts/{script}.sh"))
        out.append(Stage(name, cmd, OUT / folder, [Path(c) for c in configs], code, [OUT / i for i in inputs]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--force", action="store_true", help="redo every stage")
    ap.add_argument("--from", dest="start", metavar="STAGE", choices=[p[0] for p in PIPELINE],
                    help="redo this stage and all after it")
    args = ap.parse_args()
    run(stages(), force=args.force, start=args.start)
    table = OUT / "eval" / "results.md"
    if table.is_file():
        print("\n" + table.read_text())


if __name__ == "__main__":
    main()
