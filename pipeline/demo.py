"""The whole pipeline on the toy world, each stage through its own script, as a user runs them.

``--out DIR --seed N`` runs the whole chain (world, policy, retrievers, pairs, DPO, evaluation)
for another seed in its own folder; ``--world_args`` sets the world's knobs (toy.make_toy),
``--policy_args`` the base policy's (scripts/make_toy_policy.sh), ``--clip_args`` the retrievers'
(scripts/finetune_clip.sh) and ``--retrieve_args`` the retrieval stage's options on top of their configs.

A rerun skips stages whose output is there and whose inputs and config are unchanged
(common/stages.py); ``--force`` redoes everything, ``--from STAGE`` redoes from there on.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from common.config import cli_main
from common.stages import Stage, run

OUT = Path("outputs/toy")
# name, script (scripts/<name>.sh, or a module run with python -m), output folder, config files
# that feed it, packages whose code it runs (its package and every package that may import per
# docs/DESIGN.md's layout), folders of the run it reads
PIPELINE = [
    ("make_toy", "make_toy", "world", [], ["toy", "pairs", "policy", "retriever"], []),
    ("validate_world", None, "world", [], [], ["world"]),
    ("pretrain_clip_tower", "toy.pretrain_vision", "clip_init", [], ["toy", "retriever"], ["world"]),
    ("make_toy_policy", "make_toy_policy", "policy", ["configs/toy/toy_policy.yaml", "configs/toy/sft.yaml", "configs/prompts/toy.yaml"],
     ["toy", "pairs", "policy", "retriever"], ["world", "clip_init"]),
    ("finetune_clip", "finetune_clip", "clip", ["configs/toy/clip.yaml"], ["retriever"], ["world", "clip_init"]),
    ("retrieve", "retrieve", "retrieval", ["configs/toy/retrieve.yaml"], ["retriever"], ["world", "clip"]),
    ("build_pairs", "build_pairs", "pairs", ["configs/toy/pairs.yaml"], ["pairs", "policy", "retriever"],
     ["world", "retrieval", "policy"]),
    ("train_dpo", "train_dpo", "dpo", ["configs/toy/dpo.yaml"], ["dpo", "pairs", "policy", "retriever"], ["pairs", "policy"]),
    ("evaluate", "evaluate", "eval", ["configs/toy/evaluate.yaml"], ["evaluation", "dpo", "pairs", "policy", "retriever"],
     ["world", "retrieval", "policy", "dpo"]),
]
STAGE_NAMES = [p[0] for p in PIPELINE]
TOWER = "open_clip_model.safetensors"  # the pretrained toy-clip the retrievers and the policy start from
BASE_CODE = ["common", "data"]  # every stage runs these


def tower_file(chain: Path) -> Path:
    """The pretrained tower a chain writes (its pretrain_clip_tower stage) and starts from."""
    return chain / "clip_init" / TOWER


def stage_args(name: str, out: Path, seed: int, tower: Path | None = None) -> list[str]:
    """The options that put a stage's inputs and outputs under ``out`` and seed it with ``seed``;
    the policy and the retrievers start from ``tower`` (default: the chain's own, ``clip_init``).

    With the defaults (outputs/toy, seed 0) they repeat what the toy configs say, so one chain
    serves the demo and every whole-chain seed of the effect study; except that DPO (and GRPO, which
    the comparison trains on a chain) starts fresh: the chain reruns a stage when its inputs
    changed, and resuming would continue a run made on the earlier pairs."""
    w, tower = out / "world", tower or tower_file(out)
    return {
        "make_toy": ["--out", str(w), "--seed", str(seed)],
        "make_toy_policy": ["--world", str(w), "--out", str(out / "policy"), "--seed", str(seed),
                            "--vision_tower_from", str(tower)],  # one tower starts policy and retrievers
        "pretrain_clip_tower": ["--world", str(w), "--out", str(tower), "--seed", str(seed)],
        "finetune_clip": ["--data.world", str(w), "--output_dir", str(out / "clip"), "--seed", str(seed),
                          "--clip.image_tower_from", str(tower)],
        "retrieve": ["--data.world", str(w), "--clip_dir", str(out / "clip"), "--output_dir", str(out / "retrieval")],
        "build_pairs": ["--policy.path", str(out / "policy"), "--retrieval_index", str(out / "retrieval" / "index.json"),
                        "--image_root", f"{w}/{{domain}}/images", "--out", str(out / "pairs"), "--noise.seed", str(seed),
                        "--overwrite", "true"],  # rerun only when an input changed: answers of an earlier policy are stale
        "train_dpo": ["--pairs", f"[{out / 'pairs' / 'pairs.json'}]", "--policy.path", str(out / "policy"),
                      "--train.output_dir", str(out / "dpo"), "--train.seed", str(seed), "--noise_seed", str(seed),
                      "--train.resume", ""],
        "train_grpo": ["--pairs_dir", str(out / "pairs"), "--policy.path", str(out / "policy"),
                       "--train.output_dir", str(out / "grpo"), "--train.seed", str(seed), "--train.resume", ""],
        "evaluate": ["--retrieval_dir", str(out / "retrieval"), "--policy.path", str(out / "policy"),
                     "--clip_dir", str(out / "clip"), "--dpo_dir", str(out / "dpo"), "--out", str(out / "eval"),
                     "--noise.seed", str(seed)],
    }.get(name, [])


def stages(out: Path = OUT, seed: int = 0, world_args: list[str] = (), until: str | None = None,
           options: dict[str, list[str]] | None = None, tower: Path | None = None) -> list[Stage]:
    """The chain's stages writing under ``out``, through ``until`` (all by default); ``world_args``
    go to make_toy (its knobs), ``options`` (stage name -> options) to the other script stages.
    With ``tower`` (another chain's pretrained tower, trained on the same policy_train images: an
    effect map's point whose knob changes the retriever corpus alone) the chain pretrains none."""
    result, shared = [], {"clip_init"} if tower else set()  # the folder ``tower`` stands in for
    for i, (name, script, folder, configs, packages, inputs) in enumerate(PIPELINE):
        if folder in shared:
            continue
        # a stage follows the stages that write what it reads: the retrievers the world, not the policy
        after = tuple(p[0] for p in PIPELINE[:i] if p[2] in inputs and p[2] not in shared)
        reads = [tower if f in shared else out / f for f in inputs]
        code = [Path(p) for p in [*packages, *BASE_CODE]]
        if script is None:  # every file of the world, as a user checks data before a long run
            cmd = [sys.executable, "-m", "data.validate", "--manifest", str(out / folder / "manifest.json"), "--check-images"]
        elif "." in script:
            cmd = [sys.executable, "-m", script, *stage_args(name, out, seed, tower)]
        else:
            extra = list(world_args) if name == "make_toy" else list((options or {}).get(name, []))
            cmd = ["bash", f"scripts/{script}.sh", *stage_args(name, out, seed, tower), *extra]
            code.append(Path(f"scripts/{script}.sh"))
        result.append(Stage(name, cmd, out / folder, [Path(c) for c in configs], code, reads, after))
        if name == until:
            break
    return result


def run_module(module: str, *args: str) -> None:
    """``python -m module args`` in a child process, as the studies run a stage's program; a failure raises."""
    subprocess.run([sys.executable, "-m", module, *args], check=True)


def run_chain(out: Path = OUT, seed: int = 0, world_args: list[str] = (), force: bool = False,
              start: str | None = None, until: str | None = None, options: dict[str, list[str]] | None = None,
              tower: Path | None = None) -> None:
    """Run (or resume) the chain under ``out`` up to and including ``until``."""
    run(stages(out, seed, world_args, until, options, tower), force=force, start=start, lock=out)


def stage_options(policy_args: str = "", retrieve_args: str = "", clip_args: str = "") -> dict[str, list[str]]:
    """The chain's per-stage options from the command line's strings (stages without any left out)."""
    got = {"make_toy_policy": shlex.split(policy_args), "finetune_clip": shlex.split(clip_args),
           "retrieve": shlex.split(retrieve_args)}
    return {name: opts for name, opts in got.items() if opts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--force", action="store_true", help="redo every stage")
    ap.add_argument("--from", dest="start", metavar="STAGE", choices=STAGE_NAMES, help="redo this stage and all after it")
    ap.add_argument("--until", metavar="STAGE", choices=STAGE_NAMES, help="stop after this stage")
    ap.add_argument("--out", type=Path, default=OUT, help="folder of the whole run (default outputs/toy)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every stage: world, policy, retrievers, pairs, DPO")
    ap.add_argument("--world_args", default="", help='make_toy options, one string: "--prior_share 0.5"')
    ap.add_argument("--policy_args", default="", help='make_toy_policy.sh options, one string: "--reference_k 1"')
    ap.add_argument("--clip_args", default="", help='finetune_clip.sh options, one string: "--epochs 5"')
    ap.add_argument("--retrieve_args", default="", help='retrieval options, one string: "--match image --k.k 1"')
    args = ap.parse_args()
    run_chain(args.out, args.seed, shlex.split(args.world_args), args.force, args.start, args.until,
              stage_options(args.policy_args, args.retrieve_args, args.clip_args))
    table = args.out / "eval" / "results.md"
    if table.is_file() and args.until in (None, "evaluate"):
        print("\n" + table.read_text())


if __name__ == "__main__":
    cli_main(main)
