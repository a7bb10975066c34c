"""Measurements on the toy world's models: the base model's prompt adherence read by the attribute checker, the
checker's and the tiny CLIP's accuracy per attribute.

    python -m toyworld base-adherence --n 256 --seed 0     # per-attribute accuracy of the base model

The committed models live in ``assets/toyworld/`` (see its README); they load with plain ``from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from toyworld.common.pipeline import (
    CHECKER_DIR,
    GUIDANCE,
    PIPELINE_DIR,
    SAMPLE_STEPS,
    clip_pixels,
    load_pipeline,
    sample,
)
from toyworld.named.checker import AttributeChecker, adherence, read_attributes
from toyworld.named.world import ATTRIBUTES, POSITION_PHRASE, VALUES, ToyWorldStream, sample_prompts


def base_adherence(
    n: int = 256,
    seed: int = 0,
    pipeline_dir: str | Path = PIPELINE_DIR,
    checker_dir: str | Path = CHECKER_DIR,
    steps: int = SAMPLE_STEPS,
    guidance: float = GUIDANCE,
) -> dict[str, float]:
    """Per-attribute accuracy of the base model on ``n`` base-distribution prompts (every attribute stated)."""
    rows = sample_prompts(n, seed)
    pipe = load_pipeline(pipeline_dir)
    checker = AttributeChecker.from_pretrained(checker_dir)
    images = sample(pipe, [r["prompt"] for r in rows], seed, steps, guidance)
    return adherence(read_attributes(checker, images), [r["attributes"] for r in rows])


def attribute_accuracy(checker, n: int = 2000, seed: int = 12345, noise: float = 0.0) -> dict[str, float]:
    """The checker's accuracy per attribute on ``n`` fresh renders of the whole world (novel shapes included)."""
    stream = ToyWorldStream(250, seed=seed, split="all")
    correct = {a: 0 for a in ATTRIBUTES}
    g = torch.Generator().manual_seed(seed)
    checker.eval()
    with torch.no_grad():
        for i in range(n // 250):
            batch = stream.batch(i)
            x = batch["pixels"]
            if noise:
                x = (x + noise * torch.randn(x.shape, generator=g)).clamp(-1, 1)
            logits = checker(x)
            for a in ATTRIBUTES:
                correct[a] += int((logits[a].argmax(-1) == batch["labels"][a]).sum())
    return {a: correct[a] / (n // 250 * 250) for a in ATTRIBUTES}


ZERO_SHOT_TEMPLATES = {
    "shape": "a {}",
    "colour": "a {} object",
    "pattern": "a {} object",
    "background": "an object on a {} background",
    "position": "an object {}",
    "size": "a {} object",
}


def zero_shot_accuracy(model, tokenizer, n: int = 1000, seed: int = 4321) -> dict[str, float]:
    """Zero-shot accuracy per attribute: each image gets the value whose one-attribute prompt is most similar."""
    stream = ToyWorldStream(250, seed=seed, split="all")
    correct = {a: 0 for a in ATTRIBUTES}
    model.eval()
    with torch.no_grad():
        text = {}
        for a in ATTRIBUTES:
            words = [POSITION_PHRASE[v] if a == "position" else v for v in VALUES[a]]
            prompts = [ZERO_SHOT_TEMPLATES[a].format(w) for w in words]
            ids = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
            text[a] = F.normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1)
        for i in range(n // 250):
            batch = stream.batch(i)
            img = F.normalize(
                model.get_image_features(pixel_values=clip_pixels(batch["pixels"])).pooler_output, dim=-1
            )
            for a in ATTRIBUTES:
                correct[a] += int(((img @ text[a].T).argmax(-1) == batch["labels"][a]).sum())
    return {a: correct[a] / (n // 250 * 250) for a in ATTRIBUTES}


@torch.no_grad()
def image_nn_accuracy(model, n: int = 500, seed: int = 8765) -> dict[str, float]:
    """Per attribute, how often an image's nearest neighbour (tiny-CLIP image embedding, cosine) among ``n``
    other renders shares its value: what CLIP-I can see. Chance is about 1 / (number of values)."""
    a = ToyWorldStream(n, seed=seed, split="all").batch(0)
    b = ToyWorldStream(n, seed=seed + 1, split="all").batch(0)
    model.eval()

    def embed(x):
        return F.normalize(
            model.get_image_features(pixel_values=clip_pixels(x)).pooler_output.float(), dim=-1
        )

    nearest = (embed(b["pixels"]) @ embed(a["pixels"]).T).argmax(-1)
    return {k: float((a["labels"][k][nearest] == b["labels"][k]).float().mean()) for k in ATTRIBUTES}
