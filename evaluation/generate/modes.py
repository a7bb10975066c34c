"""One batch of a method's images in its generation mode: the dual path with a concept artefact, the plain
words (no concept), or the concept's export in plain diffusers (the single-path approximation users get)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from evaluation.concepts.base import EvalConcept
from evaluation.config import SamplingSpec
from evaluation.generate.exported import ExportedSampler
from evaluation.generate.images import generate_images, generate_plain, initial_latents
from evaluation.plan import MethodPlan, Setting
from evaluation.recipe import TuneRecipe
from evaluation.tuning import ConceptTuner
from models.artifact import ConceptArtifact
from models.backbone import DEFAULT_IMAGE_ENCODER, DiffusionBackbone
from models.loading import load_backbone

EXPORTS_DIR = "exports"  # <out>/exports/<method>/<concept>/s<steps>/: the export-mode methods' files


def sampling_prompt(art: ConceptArtifact, prompt: str, class_noun: str) -> str:
    """The prompt a method samples with: DreamBench's, or for an instance-prompt method (one-shot LoRA) the same
    prompt with "sks <class noun>" where it says the placeholder (v* is the embedding of "sks", so
    ``"<s*> dog"`` is the text "sks dog"). CLIP-T always scores the DreamBench prompt with the class noun."""
    if art.extra.get("instance_prompt"):
        return prompt.replace(art.placeholder, f"{art.placeholder} {class_noun}")
    return prompt


def autocast_dtype(mode: str, device: str) -> torch.dtype | None:
    """The autocast dtype of ``inference_autocast`` on ``device`` (None: no autocast)."""
    if mode == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]


class Sampler:
    """Generates batches of every method of a run on one sampling backbone.

    Args:
        out: the evaluation folder (exports are written under ``exports/``).
        base: the base recipe (backbone and placeholder).
        sampling: sampler, steps, negative prompt.
        device: device of sampling.
        autocast: autocast dtype of sampling and scoring (None: off).
    """

    def __init__(
        self, out: Path, base: TuneRecipe, sampling: SamplingSpec, device: str, autocast: torch.dtype | None
    ) -> None:
        self.out, self.base, self.sampling, self.device, self.autocast = out, base, sampling, device, autocast
        self.backbone: DiffusionBackbone | None = None
        self.exported: ExportedSampler | None = None

    def inference_context(self) -> contextlib.AbstractContextManager:
        """Autocast for sampling and scoring (a no-op when ``autocast`` is None)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=self.autocast)

    def backbone_for(self, tuner: ConceptTuner | None) -> DiffusionBackbone:
        """The sampling backbone: the tuner's own when it does not modify it, else loaded once."""
        if self.backbone is None and tuner is not None and tuner.built and not tuner.module.modifies_backbone:
            # Same weights: reuse instead of loading again (never a UNet carrying a method's peft adapter).
            self.backbone = tuner.module.backbone
        if self.backbone is None:
            kw = self.base.model_kwargs
            dtype = kw.get("torch_dtype")
            self.backbone = load_backbone(  # SD 1.x / 2.x or SDXL, by the folder's model_index.json
                kw["pretrained_model_name_or_path"],
                kw.get("image_encoder_name_or_path", DEFAULT_IMAGE_ENCODER),
                placeholder=self.base.placeholder,
                torch_dtype=getattr(torch, dtype) if dtype else None,
                **({"variant": kw["variant"]} if kw.get("variant") else {}),
            )
        return self.backbone.to(self.device)

    def generate(
        self,
        backbone: DiffusionBackbone,
        plan: MethodPlan,
        concept: EvalConcept,
        setting: Setting,
        art: ConceptArtifact | None,
        prompt_ids: list[int],
        seeds: list[int],
    ) -> list[Any]:
        """One batch of images of a method: dual path, plain words, or the export in plain diffusers."""
        s, placeholder = self.sampling, self.base.placeholder
        prompts = [concept.prompts[i] for i in prompt_ids]
        if plan.kind == "plain_words":
            words = [p.replace(placeholder, concept.words) for p in prompts]
            return generate_plain(
                backbone, words, seeds, setting, s.num_inference_steps, s.sampler, s.negative_prompt
            )
        assert art is not None
        if plan.kind == "export":
            if self.exported is None or self.exported.export_format != plan.spec.export_format:
                self.exported = ExportedSampler(
                    self.base.model_kwargs["pretrained_model_name_or_path"],
                    plan.spec.export_format,
                    s.sampler,
                    self.device,
                )
            folder = self.out / EXPORTS_DIR / plan.spec.name / concept.name / f"s{art.steps}"
            word = self.exported.load(art, folder, concept.name)
            texts = [sampling_prompt(art, p, concept.class_noun).replace(placeholder, word) for p in prompts]
            latents = initial_latents(backbone, seeds)
            return self.exported.generate(texts, latents, setting, s.num_inference_steps, s.negative_prompt)
        return generate_images(
            backbone,
            art,
            [sampling_prompt(art, p, concept.class_noun) for p in prompts],
            seeds,
            setting,
            s.num_inference_steps,
            s.sampler,
            s.negative_prompt,
        )
