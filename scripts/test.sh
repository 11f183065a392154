#!/usr/bin/env bash
# The test suite: GPU-free, on the toy configuration. Extra arguments go to pytest
# (e.g. `bash scripts/test.sh -m slow` for the multi-process tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
exec .venv/bin/python -m pytest "$@"
