#!/usr/bin/env bash
# Run every benchmark in benches/ and write benches/RESULTS.md. Args go to benches.bench
# (--quick for small sizes, --only bench_name ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
exec .venv/bin/python -m benches.bench "$@"
