#!/usr/bin/env bash
# The prepared GPU check: 20 bf16 pretraining steps, DATE-12 tuning, K = 16 batched tuning, sampling, export and
# reload in plain diffusers, DDP on the GPUs present; one line per check, a JSON of step times, peak memory,
# seconds per concept and concepts per hour. Random weights in SD-1.5 shapes built by models.tiny: no downloads.
#   scripts/gpu_check.sh                                  # one GPU, SD-1.5 shapes (budget: 8 min)
#   scripts/gpu_check.sh --shape tiny --device cpu --pretrain-steps 2 --tune-steps 2 --concepts 1 --batch-k 2
#   scripts/gpu_check.sh --help                           # every option (benchmarks/gpu_check.py)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python}" -m benchmarks.gpu_check "$@"
