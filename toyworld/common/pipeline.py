"""What every room of the toy world shares: where the committed models live (``assets/toyworld/``), the real
CLIP tokenizer, the base model as a plain diffusers pipeline, seeded sampling, and CLIP's pixel normalisation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from datamodules.transforms import CLIP_MEAN, CLIP_STD

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "toyworld"
PIPELINE_DIR = ASSETS / "pipeline"
CHECKER_DIR = ASSETS / "checker"
CLIP_DIR = ASSETS / "clip"
VOCABULARY_FILE = ASSETS / "vocabulary.txt"
SAMPLE_STEPS = 25
GUIDANCE = 3.0


def clip_tokenizer():
    """The real CLIP tokenizer (49,408 entries), built offline from the committed BPE file."""
    import tempfile

    from models.clip_tokenizer import load_clip_tokenizer, write_clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return load_clip_tokenizer(write_clip_tokenizer(tmp))


def load_pipeline(path: str | Path = PIPELINE_DIR, dtype: torch.dtype = torch.float32):
    """The toy world's base model as a plain diffusers ``StableDiffusionPipeline``."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample(
    pipe,
    prompts: list[str],
    seed: int,
    steps: int = SAMPLE_STEPS,
    guidance: float = GUIDANCE,
    batch_size: int = 64,
) -> torch.Tensor:
    """Images for ``prompts`` as ``(N, 3, H, W)`` in [-1, 1]; image ``i`` depends on (seed, i) only."""
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + start + i) for i in range(len(chunk))]
        images = pipe(
            chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="pt"
        ).images
        out.append(images.float() * 2 - 1)
    return torch.cat(out)


def clip_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> CLIP-normalised pixel values (the processor's mean and std)."""
    x = (pixels + 1) / 2
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std
