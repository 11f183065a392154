#!/usr/bin/env bash
# GRPO on the alignment split's yes/no questions with retrieval in the prompt, LoRA on the policy
# -> outputs/toy/grpo/adapter (PEFT format); metrics.jsonl + TensorBoard beside it.
# Usage: bash scripts/train_grpo.sh [CONFIG.yaml] [--key value ...]   (default config: configs/toy/grpo.yaml)
# e.g. --copy_penalty 0.5 (the copy signal as a reward), --group_size 8, --train.output_dir DIR.
# One process (the multi-process path is not tested). A rerun resumes from the latest checkpoint. `--help` lists every option.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ] || [[ "$1" == --* ]]; then set -- configs/toy/grpo.yaml "$@"; fi
exec .venv/bin/python -m dpo.train_grpo "$@"
