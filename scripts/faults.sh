#!/usr/bin/env bash
# Reliability fault suite: bad images, malformed input, SIGKILL + resume, unwritable
# output and full disk, divergence, a second writer, on the tiny toy world; writes a Markdown table to DIR/FAULTS.md.
# Usage: bash scripts/faults.sh [--out DIR] [--only NAME ...]   (--help for details)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
exec .venv/bin/python -m tests.faults "$@"
