#!/usr/bin/env bash
# Rehearse the whole configs/mmed_rag chain (validate, finetune_clip, retrieve, build_pairs,
# train_dpo, evaluate, infer) on CPU, on a few dozen records per file of your MMed-RAG release,
# before booking GPUs. Writes OUT/rehearsal.json and OUT/rehearsal.md; exit 0 when every stage
# ran for at least one domain. A few minutes on 2 cores.
# Usage: bash scripts/rehearse.sh --data_root MMed-RAG/data --image_root IMAGES --out OUT [--policy P]
#        (--image_roots '{mimic: /x, iuxray: /y}' for image sets in separate folders; --help lists all)
# No release at hand: bash scripts/rehearse.sh --toy true --out OUT   (the toy world in the release's layout)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pipeline.rehearse "$@"
