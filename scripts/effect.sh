#!/usr/bin/env bash
# The effect study (after demo.sh): base vs DPO over whole-chain seeds, with controls
# (dpo_cm, dpo_oa, dpo_ordered, sft_chosen), an effect map over a world knob and a regime check.
# Usage: bash scripts/effect.sh [--seeds 0 1 2] [--out outputs/toy/effect] [--limit 50] [--roles dev_vqa]
#        [--controls NAME ...] [--map_knob report_miss] [--map_values 0.0 0.3 0.6] [--world_args "..."]
#        [--policy_args "..."] [--clip_args "..."] [--retrieve_args "..."]
#        [--dpo_args "--beta 0.5"] [--eval_args "..."] [--jobs N]   (all options and what they do: --help)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pipeline.effect "$@"
