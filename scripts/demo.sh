#!/usr/bin/env bash
# The whole pipeline on the GPU-free toy world; prints the results table.
# A rerun skips finished stages; --force redoes all, --from STAGE redoes from there.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pipeline.demo "$@"
