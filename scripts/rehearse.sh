#!/usr/bin/env bash
# Rehearse the whole configs/mmed_rag chain (validate, finetune_clip, retrieve, build_pairs,
# train_dpo, evaluate, infer) on CPU, on a few dozen records per file of your MMed-RAG release,
# before booking GPUs. Writes OUT/rehearsal.json and OUT/rehearsal.md; exit 0 when every stage
# ran for at least one domain. About ten minutes on 2 cores.
# Usage: bash scripts/rehearse.sh --data_root MMed-RAG/data --image_root IMAGES --out OUT [--policy P]
#        (--image_roots '{mimic: /x, iuxray: /y}' for image sets in separate folders; --help lists all)
# No release at hand: bash scripts/rehearse.sh --toy   (the toy world in the release's layout)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${1:-}" = "--toy" ]; then
  shift
  out=outputs/toy/rehearsal
  .venv/bin/python -m data.toy --out outputs/toy/release_world --size tiny
  .venv/bin/python -m dpo.toy_release --world outputs/toy/release_world --out outputs/toy/release
  set -- --data_root outputs/toy/release/data --image_root outputs/toy/release/images --out "$out" "$@"
fi
exec .venv/bin/python -m dpo.rehearse "$@"
