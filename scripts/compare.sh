#!/usr/bin/env bash
# The methods compared on the same questions (after demo.sh): decoding (greedy, beam, VCD), retrieval
# (fixed k, adaptive k, RULE's calibrated k) and tuning (MMed-RAG's RAG-PT, mDPO) on the chain's test VQA
# -> outputs/toy/compare/ (compare.json, compare.md, compare.png).
# Usage: bash scripts/compare.sh [--chain outputs/toy] [--methods NAME ...] [--limit 0] [--roles test_vqa]
#        (all options and what each method is: --help)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pipeline.compare "$@"
