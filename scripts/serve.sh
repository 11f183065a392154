#!/usr/bin/env bash
# The web demo (gradio, one process): upload an image or pick a test example, ask a question, and
# see the routed domain, the retrieved reports and k, and the base and DPO answers without
# retrieval, with it, and with a noised image + the same references (the copy test).
# Usage: bash scripts/serve.sh [CONFIG.yaml] [--port 7860] [--host 127.0.0.1] [--policy.path P --adapter A --clip_dir C]
# Default config: configs/toy/serve.yaml (the toy pipeline's outputs: bash scripts/demo.sh). `--help` lists every option.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --serve
if [ $# -eq 0 ] || [[ "$1" == -* ]]; then set -- configs/toy/serve.yaml "$@"; fi
exec .venv/bin/python -m evaluation.serve "$@"
