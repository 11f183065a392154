#!/usr/bin/env bash
# Stage 2: answer every alignment record under conditions a, b, c and build the preference
# pairs (D_cm, D_oa1, D_oa2) into outputs/toy/pairs/ (pairs.json, pairs_stats.json, generations.jsonl).
# Usage: bash scripts/build_pairs.sh [CONFIG.yaml] [--key value ...]   (default config: configs/toy/pairs.yaml)
# Several processes: NPROC=2 bash scripts/build_pairs.sh ... (torchrun; one GPU each with --device cuda).
# A rerun resumes where a killed run stopped. `--help` lists every option.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ] || [[ "$1" == --* ]]; then set -- configs/toy/pairs.yaml "$@"; fi
if [ "${NPROC:-1}" -gt 1 ]; then
  exec .venv/bin/torchrun --standalone --nproc_per_node "$NPROC" -m pairs.build_pairs "$@"
fi
exec .venv/bin/python -m pairs.build_pairs "$@"
