#!/usr/bin/env bash
# Turn the MMed-RAG release's alignment files (finished preference pairs) back into query files
# the pair builder's retrieval runs on: <out>/<domain>_alignment_vqa.jsonl, <domain>_alignment_report.json
# and sources.json (see pairs/release_sources.py).
# Usage: bash scripts/release_sources.sh [CONFIG.yaml] --data_root /path/to/MMed-RAG/data --out DIR
#   (`--help` lists every key)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pairs.release_sources "$@"
