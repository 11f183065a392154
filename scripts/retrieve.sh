#!/usr/bin/env bash
# Stage 1b: route every query image to its domain (F(x_v)), retrieve that domain's reports, and
# write outputs/toy/retrieval/<domain>_<file>.jsonl, index.json, retrieval_metrics.json
# (see retriever/retrieve.py). Needs scripts/finetune_clip.sh first.
# Usage: bash scripts/retrieve.sh [CONFIG.yaml] [--key value ...]   (`--help` lists every key)
#   no CONFIG: configs/toy/retrieve.yaml;  NPROC=2 bash scripts/retrieve.sh  encodes in 2 processes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ] || [[ "$1" == -* ]]; then set -- configs/toy/retrieve.yaml "$@"; fi
if [ "${NPROC:-1}" -gt 1 ]; then
  exec .venv/bin/torchrun --nproc_per_node "$NPROC" -m retriever.retrieve "$@"
fi
exec .venv/bin/python -m retriever.retrieve "$@"
