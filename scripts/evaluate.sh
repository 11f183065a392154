#!/usr/bin/env bash
# Evaluate the base policy and the base + DPO adapter on the test VQA and report files under
# no_rag, rag_fixed, rag_adaptive and noised_rag -> outputs/toy/eval/ (results.json, results.md,
# predictions.jsonl, gallery.html, PNG plots). METEOR needs Java (or --meteor false).
# Usage: bash scripts/evaluate.sh [CONFIG.yaml] [--key value ...]   (default config: configs/toy/evaluate.yaml)
# e.g. --policies [base], --limit 20, --conditions [no_rag,rag_fixed]. `--help` lists every option.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ] || [[ "$1" == -* ]]; then set -- configs/toy/evaluate.yaml "$@"; fi
exec .venv/bin/python -m evaluation.evaluate "$@"
