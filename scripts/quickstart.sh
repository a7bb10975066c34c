#!/usr/bin/env bash
# The README's main job on the built-in offline default: the trained toy world's INSTANCE world (assets/toyworld/),
# where captions name a category and a context but never the instance ("my cross", not "a cross").
#   1. a short encoder pretraining on the instance world, the committed encoder's recipe (200 steps; the loss falls)
#      (its own folder: a full run of the recipe in outputs/pretrain_instance_modules/ keeps its checkpoints)
#                                                         -> outputs/quickstart_pretrain/
#   2. personalize one held-out instance (cross_test2, a blue dotted cross) from its one image with the committed
#      instance encoder, DATE: v* and the offsets' cores, 12 steps                    -> outputs/concepts/cross_test2.*
#   3. sample it in new contexts, each row followed by what the words "cross" give from the same seeds, and score
#      every row from pixels against the input image  -> outputs/samples_cross_test2.png
#   4. evaluate DATE, DATE + UNet, the encoder alone, the plain words and a one-shot LoRA on 3 held-out concepts,
#      identity and prompt read from pixels, with plots and grids      -> outputs/eval_instance_quick/
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python}
start=$(date +%s)
echo "== 1/4 short encoder pretraining on the instance world (the committed encoder had 6,000 steps)"
$PY train.py fit --config configs/pretrain/instance.yaml --config configs/pretrain/instance_modules.yaml \
    --trainer.max_steps 200 --trainer.default_root_dir outputs/quickstart_pretrain
echo "== 2/4 tune a held-out instance (cross_test2: its hue, outline and pattern are in no caption) for 12 steps"
$PY train.py fit --config configs/tune/instance.yaml
echo "== 3/4 sample it in new contexts, next to what the words give, and score each row from pixels"
$PY evaluate.py sample --concept outputs/concepts/cross_test2.safetensors --words cross --guidance 2 \
    --out outputs/samples_cross_test2.png --prompts '["a large <s*> on the right on a pink background",
    "a large <s*> at the top on a green background", "a large <s*> on the left on a white background",
    "a large <s*> at the bottom on a purple background"]'
$PY -m toyworld instance-score-samples --grid outputs/samples_cross_test2.png --concept cross_test2
echo "== 4/4 evaluate DATE, DATE + UNet, the encoder alone, the plain words and a one-shot LoRA on 3 held-out concepts"
$PY evaluate.py run --config configs/evaluate/instance_quick.yaml --overwrite true
echo "quickstart finished in $(( $(date +%s) - start )) s"
echo "input image: assets/toyworld/instance_concepts/cross_test2.png"
echo "images: outputs/samples_cross_test2.png (rows: outputs/samples_cross_test2.txt),"
echo "        outputs/eval_instance_quick/{tradeoff.png,paired.md,grids/}; TensorBoard: tensorboard --logdir outputs"
