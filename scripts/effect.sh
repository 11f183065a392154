#!/usr/bin/env bash
# The effect table: base vs DPO over several DPO seeds on the toy test files (after demo.sh).
# Usage: bash scripts/effect.sh [--seeds 0 1 2] [--out outputs/toy/effect] [--limit 50] [--roles val_vqa]
#        [--dpo_args "--beta 0.5"] [--eval_args "--retrieval_dir DIR"]   (all options: --help)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m evaluation.effect "$@"
