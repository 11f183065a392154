#!/usr/bin/env bash
# Create .venv and install the pinned requirements, only when they changed (a stamp holds
# their hash), so a second call returns in seconds. Usage: bash scripts/setup.sh [--serve | --dev]
#   (default: the pipeline's requirements; --serve adds the web demo's gradio; --dev the tests' too)
set -euo pipefail
cd "$(dirname "$0")/.."
reqs=requirements.txt
case "${1:-}" in
  --serve) reqs=requirements-serve.txt ;;
  --dev) reqs=requirements-dev.txt ;;
esac
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.stamp-$(basename "$reqs" .txt)
hash=$(cat requirements*.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$hash" ]; then
  echo "setup: installing $reqs into .venv (first run takes a few minutes)" >&2
  .venv/bin/pip install --disable-pip-version-check -q -r "$reqs"
  echo "$hash" > "$stamp"
fi
