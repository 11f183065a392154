#!/usr/bin/env bash
# The toy base policy (the GPU-free stand-in for LLaVA-Med): an untrained tiny LLaVA with a
# tokenizer trained on the toy text (toy.toy_policy) whose language model first learns to read
# references (text-only yes/no on the oracle references, as LLaVA starts from a language model
# that reads), then full SFT on the toy world's policy_train split with oracle references in half
# of the prompts (toy.oracle_retrieval); finally its reliance is measured on val_vqa.
# Usage: bash scripts/make_toy_policy.sh [--world DIR] [--out DIR] [--seed N] [--reference_k K] [--p_correct P] [--reading_steps N] [--reading_target A] [--vision_tower_from FILE] [--key value ...]
#   --world  toy world (default outputs/toy/world; made with scripts/make_toy.sh if absent)
#   --out    the policy folder (default outputs/toy/policy); policy_init/ and oracle_retrieval/
#            are written beside it. Other options go to the SFT (see configs/toy/sft.yaml).
#   --seed   seed of the oracle references, the initial weights and the SFT (default 0)
#   --reference_k  oracle references per prompt that has any (default 3, toy.oracle_retrieval's):
#            as many as the retrieval the policy will be given keeps
#   --p_correct  chance that an oracle reference is a report with the query's findings (default 0.8,
#            toy.oracle_retrieval's): the more often its references were right, the more the policy copies them
#   --reading_steps  text-only reading steps (default: configs/toy/toy_policy.yaml's)
#   --reading_target stop reading once held-out questions are answered this well (reading_steps: the most)
#   --vision_tower_from  open_clip checkpoint whose image tower starts the policy's (toy.pretrain_vision's,
#            as the demo gives it) instead of pretraining its own
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in -h|--help) sed -n '/^set /q; 2,$p' "$0" | cut -c3-; exit 0 ;; esac
bash scripts/setup.sh
world=outputs/toy/world
out=outputs/toy/policy
seed=0
oracle=()  # options of the oracle references (toy.oracle_retrieval, whose defaults they keep)
init=()  # options of the untrained policy (toy.toy_policy)
sft=()  # every other option, in any order among the script's own
while [ $# -gt 0 ]; do
  case "$1" in
    --world) world=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --reference_k) oracle+=(--k "$2"); shift 2 ;;
    --p_correct) oracle+=("$1" "$2"); shift 2 ;;
    --reading_steps|--reading_target|--vision_tower_from) init+=("$1" "$2"); shift 2 ;;
    *) sft+=("$1"); shift ;;
  esac
done
base=$(dirname "$out")
[ -f "$world/manifest.json" ] || bash scripts/make_toy.sh --out "$world"
.venv/bin/python -m toy.oracle_retrieval --world "$world" --out "$base/oracle_retrieval" --seed "$seed" "${oracle[@]}"
.venv/bin/python -m toy.toy_policy configs/toy/toy_policy.yaml --world "$world" --out "$base/policy_init" --seed "$seed" \
  --reading_index "$base/oracle_retrieval/index.json" "${init[@]}"
rm -rf "$out"
exec .venv/bin/python -m policy.train_sft configs/toy/sft.yaml --policy.path "$base/policy_init" \
  --data.retrieval_index "$base/oracle_retrieval/index.json" --train.output_dir "$out" --train.seed "$seed" "${sft[@]}"
