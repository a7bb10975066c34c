"""Sampling a concept the way a user of plain diffusers does: its export loaded into a ``StableDiffusionPipeline``.

The export (``ConceptArtifact.export_diffusers`` or ``export_kohya``) is the single-path approximation (alpha 1):
the LoRA is merged into every attention layer and v* is a new token, with no vanilla path on the hard prompt.
Evaluated next to the dual-path sampling of the same artefact, it measures the identity / prompt gap of that
approximation. Initial noise, sampler and scheduler config are those of
:func:`evaluation.generate.images.generate_images`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from evaluation.generate.images import to_uint8
from evaluation.plan import Setting
from models.artifact import ConceptArtifact
from models.sampling import SAMPLERS


class ExportedSampler:
    """A plain diffusers pipeline of the base model that loads one exported concept at a time.

    Args:
        pipeline_dir: the base model (diffusers layout), the one the concepts were tuned on.
        export_format: ``diffusers`` or ``kohya``.
        sampler: ``ddim`` or ``dpm``, built from the pipeline folder's scheduler config.
        device: device of the pipeline.
    """

    def __init__(
        self, pipeline_dir: str, export_format: str, sampler: str = "ddim", device: str = "cpu"
    ) -> None:
        pipe = StableDiffusionPipeline.from_pretrained(
            pipeline_dir, dtype=torch.float32, safety_checker=None, requires_safety_checker=False
        )
        pipe.scheduler = SAMPLERS[sampler].from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(device)
        self.export_format = export_format
        self.loaded: str | None = None
        self.word = ""

    def load(self, artifact: ConceptArtifact, folder: Path, name: str) -> str:
        """Exports ``artifact`` into ``folder`` and loads it (unloading the previous concept).

        Returns:
            The word prompts use for the concept: the placeholder (diffusers) or the file name (kohya).
        """
        key = f"{folder}|{artifact.steps}"
        if self.loaded == key:
            return self.word
        if self.loaded is not None:
            self.pipe.unload_lora_weights()
            self.pipe.unload_textual_inversion()
        if self.export_format == "kohya":
            paths = artifact.export_kohya(folder, name)
            self.pipe.load_lora_weights(str(paths["lora"]))
            self.word = name
            self.pipe.load_textual_inversion(str(paths["embedding"]), token=self.word)
        else:
            out = artifact.export_diffusers(folder)
            self.pipe.load_lora_weights(str(out))
            self.word = artifact.placeholder
            self.pipe.load_textual_inversion(str(out / "learned_embeds.safetensors"), token=self.word)
        self.loaded = key
        return self.word

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        latents: torch.Tensor,
        setting: Setting,
        num_inference_steps: int,
        negative_prompt: str = "",
    ) -> list[np.ndarray]:
        """Images of ``prompts`` (already saying the loaded concept's word) from the given initial noise.

        Returns:
            N (H, W, 3) uint8 images.
        """
        images = self.pipe(
            list(prompts),
            num_inference_steps=num_inference_steps,
            guidance_scale=setting.guidance,
            negative_prompt=[negative_prompt] * len(prompts),
            latents=latents.to(self.pipe.device),
            output_type="pt",
        ).images
        return [to_uint8(image) for image in images.float()]
