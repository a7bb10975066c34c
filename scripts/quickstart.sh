#!/usr/bin/env bash
# The README's main job on the built-in offline default: the trained toy world (assets/toyworld/).
#   1. a short encoder pretraining on the world (200 steps; the loss falls) -> outputs/pretrain_toyworld/
#   2. personalize one held-out concept from its one image with the committed encoder (12 steps)
#                                                                         -> outputs/concepts/red_striped_star.*
#   3. sample it in new contexts (size, position, background)             -> outputs/samples_red_striped_star.png
#   4. evaluate the main methods on 3 held-out concepts and plot          -> outputs/eval_toyworld_quick/
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python}
start=$(date +%s)
echo "== 1/4 short encoder pretraining on the toy world (the committed encoder had 2,000 steps)"
$PY train.py fit --config configs/pretrain/toyworld.yaml --trainer.max_steps 200 \
    --model.init_args.sample_every_n_steps 100
echo "== 2/4 tune a held-out concept (red striped star, never seen in base training) for 12 steps"
$PY train.py fit --config configs/tune/toyworld.yaml
echo "== 3/4 sample it in new contexts"
$PY evaluate.py sample --concept outputs/concepts/red_striped_star.safetensors \
    --out outputs/samples_red_striped_star.png --prompts '["a small <s*> on the left on a yellow background",
    "a large <s*> on the right on a green background", "a small <s*> in the center on a pink background"]'
echo "== 4/4 evaluate DATE, the encoder alone, the plain words and a one-shot LoRA on 3 held-out concepts"
$PY evaluate.py run --config configs/evaluate/toyworld_quick.yaml --overwrite true
echo "quickstart finished in $(( $(date +%s) - start )) s"
echo "images: outputs/samples_red_striped_star.png (rows: outputs/samples_red_striped_star.txt),"
echo "        outputs/eval_toyworld_quick/{tradeoff.png,tradeoff_clip.png,grids/}; TensorBoard: tensorboard --logdir outputs"
