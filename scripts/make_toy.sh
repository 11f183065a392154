#!/usr/bin/env bash
# Generate the toy medical world (images, reports, VQA in the MMed-RAG formats, manifest.json).
# Usage: bash scripts/make_toy.sh [CONFIG.yaml] [--out DIR] [--seed N] [--size tiny|small|medium|large]
# Defaults: --out outputs/toy/world --seed 0 --size small. `--help` lists every option.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m toy.make_toy "$@"
