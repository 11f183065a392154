#!/usr/bin/env bash
# Supervised fine-tuning of the policy (LoRA or full): saves a PEFT adapter or a full model.
# Usage: bash scripts/train_sft.sh [CONFIG.yaml] [--key value ...]   (default config: configs/toy/sft.yaml)
# Several processes / DeepSpeed: accelerate launch -m policy.train_sft CONFIG.yaml --train.deepspeed configs/deepspeed/zero2.json
# `--help` lists every option.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
case "${1:-}" in
  *.yaml|*.yml|-h|--help) ;;
  *) set -- configs/toy/sft.yaml "$@" ;;
esac
exec .venv/bin/python -m policy.train_sft "$@"
