#!/usr/bin/env bash
# Answer a question about an image: domain identification, that domain's retriever, k selection,
# the prompt, the policy with its DPO adapter. Prints the domain, the retrieved reports with their
# scores and the answer; --queries FILE.jsonl writes a JSONL of answers instead.
# Usage: bash scripts/infer.sh --image PATH [--question TEXT] [--key value ...]
#        bash scripts/infer.sh --queries FILE.jsonl [--out FILE.jsonl]
# Defaults: outputs/toy/clip, outputs/toy/policy, outputs/toy/dpo/adapter if present (only with the toy
# policy: another --policy.path gets an adapter only from --adapter PATH). `--help` lists every option.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m evaluation.infer "$@"
