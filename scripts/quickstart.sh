#!/usr/bin/env bash
# The README's main job on the built-in offline default: tiny backbone, synthetic multi-domain concepts.
#   1. build the tiny Stable Diffusion folder (real CLIP tokenizer, seeded random weights)
#   2. pretrain the encoder (60 steps) on synthetic concepts        -> outputs/pretrain_tiny/checkpoints/last.ckpt
#   2b. pretrain the no-regulariser ablation's encoder (nn_weight 0) -> outputs/pretrain_tiny_no_regularizer/...
#   3. tune one held-out concept for 12 steps and export it          -> outputs/concepts/<concept>.safetensors
#   4. evaluate DATE and baselines on held-out concepts, plot curves -> outputs/eval_tiny/tradeoff.png
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python}
start=$(date +%s)
$PY -m models.tiny .cache/tiny-sd
$PY train.py fit --config configs/pretrain/tiny.yaml
$PY train.py fit --config configs/pretrain/tiny_no_regularizer.yaml
$PY train.py fit --config configs/tune/tiny.yaml
$PY evaluate.py run --config configs/evaluate/tiny.yaml --overwrite true
echo "quickstart finished in $(( $(date +%s) - start )) s"
