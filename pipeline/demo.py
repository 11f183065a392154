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
# name, script, output folder, config files that feed it
PIPELINE = [
    ("make_toy", "make_toy", "world", []),
    ("validate_world", None, "world", []),
    ("make_toy_policy", "make_toy_policy", "policy", ["configs/toy/toy_policy.yaml", "configs/toy/sft.yaml", "configs/prompts/default.yaml"]),
    ("finetune_clip", "finetune_clip", "clip", ["configs/toy/clip.yaml"]),
    ("retrieve", "retrieve", "retrieval", ["configs/toy/retrieve.yaml"]),
    ("build_pairs", "build_pairs", "pairs", ["configs/toy/pairs.yaml"]),
    ("train_dpo", "train_dpo", "dpo", ["configs/toy/dpo.yaml"]),
    ("evaluate", "evaluate", "eval", ["configs/toy/evaluate.yaml"]),
]


def stages() -> list[Stage]:
    out = []
    for name, script, folder, configs in PIPELINE:
        if script is None:  # every file of the world, as a user checks data before a long run
            cmd = [sys.executable, "-m", "data.validate", "--manifest", str(OUT / folder / "manifest.json"), "--check-images"]
            out.append(Stage(name, cmd, OUT / folder))
            continue
        out.append(Stage(name, ["bash", f"scripts/{script}.sh"], OUT / folder, [Path(c) for c in configs]))
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
