#!/usr/bin/env bash
# The plan of a training run before it starts (SFT, DPO or CLIP config): parameters per part and
# what LoRA trains, memory per GPU under ZeRO-2 / ZeRO-3, the data's token lengths, steps per epoch;
# printed and written to <output folder>/plan.json. No weights needed: a folder with config.json is enough.
# Usage: bash scripts/plan.sh CONFIG.yaml [--key value ...] [--gpus N] [--out DIR] [--kind dpo|sft|clip] [--limit N]
# e.g. bash scripts/plan.sh configs/mmed_rag/radiology/dpo.yaml --policy.path tests/fixtures/llava-1.5-7b --gpus 8
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pipeline.plan "$@"
