#!/usr/bin/env bash
# Stage 1a: fine-tune one CLIP retriever per domain (open_clip, contrastive), then train the
# domain classifier F(x_v) on all domains. Outputs: outputs/toy/clip/<domain>/ and
# outputs/toy/clip/domain_classifier/ (see retriever/finetune_clip.py).
# Usage: bash scripts/finetune_clip.sh [CONFIG.yaml] [--key value ...]   (`--help` lists every key)
#   no CONFIG: configs/toy/clip.yaml;  --resume latest continues a stopped run exactly;
#   NPROC=2 bash scripts/finetune_clip.sh ...   runs 2 processes (torchrun; gloo on CPU, NCCL on GPUs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ] || [[ "$1" == -* ]]; then set -- configs/toy/clip.yaml "$@"; fi
if [ "${NPROC:-1}" -gt 1 ]; then
  exec .venv/bin/torchrun --nproc_per_node "$NPROC" -m retriever.finetune_clip "$@"
fi
exec .venv/bin/python -m retriever.finetune_clip "$@"
