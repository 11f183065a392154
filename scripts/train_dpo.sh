#!/usr/bin/env bash
# Stage 3: DPO on the preference pairs, LoRA on the policy -> outputs/toy/dpo/adapter (PEFT format),
# with --merge also outputs/toy/dpo/merged (a full checkpoint). metrics.jsonl + TensorBoard beside them.
# Usage: bash scripts/train_dpo.sh [CONFIG.yaml] [--key value ...]   (default config: configs/toy/dpo.yaml)
# e.g. --merge, --cache_reference true, --stages '[[cm],[oa1,oa2]]', --train.deepspeed configs/deepspeed/zero2.json
# Several processes: NPROC=N bash scripts/train_dpo.sh CONFIG ... (accelerate launch --num_processes N);
# one process, DeepSpeed too: bash scripts/train_dpo.sh CONFIG (e.g. configs/mmed_rag/<domain>/dpo.yaml).
# A rerun resumes from the latest checkpoint (train.resume: latest). `--help` lists every option.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ] || [[ "$1" == --* ]]; then set -- configs/toy/dpo.yaml "$@"; fi
if [ "${NPROC:-1}" -gt 1 ]; then
  exec .venv/bin/accelerate launch --multi_gpu --num_processes "$NPROC" -m dpo.train_dpo "$@"
fi
exec .venv/bin/python -m dpo.train_dpo "$@"
