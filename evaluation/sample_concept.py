"""Sampling a tuned concept file in new contexts: ``python evaluate.py sample --concept x.safetensors ...``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from evaluation.config import EvaluationConfigError
from evaluation.generate.images import generate_images, generate_plain, save_grid, save_png
from evaluation.generate.modes import sampling_prompt
from evaluation.plan import Setting
from models.artifact import ConceptArtifact


def sample_concept(
    concept: str | None = None,
    prompts: list[str] | None = None,
    out: str = "outputs/samples.png",
    base_model: str | None = None,
    image_encoder: str | None = None,
    samples_per_prompt: int = 4,
    alpha: float | None = None,
    guidance: float = 3.0,
    num_inference_steps: int = 25,
    sampler: str = "ddim",
    seed: int = 0,
    scale: int = 3,
    words: str | None = None,
) -> Path:
    """Samples a concept (dual path) for each prompt and writes one PNG grid: a row per prompt.

    Args:
        concept: the ``.safetensors`` artefact written by the tuning run.
        prompts: prompts containing the placeholder (e.g. ``"a small <s*> on the left on a yellow background"``).
        out: the grid's path (a ``.txt`` with the prompts is written next to it).
        base_model: diffusers folder or hub id of the base model; None = the one recorded in the artefact.
        image_encoder: the image encoder's folder or id (loaded by the backbone); None = ``base_model``.
        samples_per_prompt: images per prompt (columns).
        alpha: dual-path blend; None = the artefact's.
        guidance: classifier-free guidance scale.
        num_inference_steps: denoising steps (the toy world: 25 with its trailing DDIM scheduler).
        sampler: ``ddim`` or ``dpm``.
        seed: image ``j`` of prompt ``i`` starts from the noise of seed ``seed + 1000 * i + j``.
        scale: nearest-neighbour upscaling of the grid (small models sample small images).
        words: if given (e.g. the class noun ``"star"``), each prompt's row is followed by a row of the same prompt
            with the placeholder replaced by these words, sampled by the base model without the concept from the
            same seeds: what the words alone give, next to the concept.
    """
    from models.loading import load_backbone

    if not concept or not prompts:
        raise EvaluationConfigError(
            "sample needs --concept <file.safetensors> and --prompts '[\"... <s*> ...\"]'"
        )
    if not Path(concept).is_file():
        raise EvaluationConfigError(f"--concept {concept} does not exist")
    if words is not None and not words.strip():
        raise EvaluationConfigError("--words is empty; give the words to compare with (e.g. the class noun)")
    art = ConceptArtifact.load(concept)
    missing = [p for p in prompts if art.placeholder not in p]
    if missing:
        raise EvaluationConfigError(
            f"prompt {missing[0]!r} does not contain the placeholder {art.placeholder!r}"
        )
    base = base_model or art.base_model
    backbone = load_backbone(base, image_encoder or base, placeholder=art.placeholder)
    art.check_backbone(backbone, f"--concept {concept}")
    setting = Setting(steps=art.steps, alpha=art.alpha if alpha is None else alpha, guidance=guidance)
    images, rows = [], []
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            seeds = [seed + 1000 * i + j for j in range(samples_per_prompt)]
            # The prompt the concept was tuned with: an instance-prompt method (one-shot LoRA) says "<s*> <class
            # noun>" ("sks dog") where the prompt says "<s*>", exactly as the evaluation samples it.
            said_concept = sampling_prompt(art, prompt, art.extra.get("class_noun", ""))
            images += generate_images(
                backbone,
                art,
                [said_concept] * samples_per_prompt,
                seeds,
                setting,
                num_inference_steps,
                sampler,
            )
            rows.append(said_concept)
            if words is not None:  # the same prompt said in words, no concept, the same seeds
                said = prompt.replace(art.placeholder, words.strip())
                images += generate_plain(
                    backbone, [said] * samples_per_prompt, seeds, setting, num_inference_steps, sampler
                )
                rows.append(f"{said} (the words alone, no concept, same seeds)")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(images) == 1:
        save_png(images[0], path)
    else:
        save_grid(np.stack(images), str(path), cols=samples_per_prompt, scale=scale)
    path.with_suffix(".txt").write_text("\n".join(f"row {i + 1}: {p}" for i, p in enumerate(rows)) + "\n")
    return path
