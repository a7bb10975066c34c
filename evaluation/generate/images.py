"""Images for evaluation: fixed seeds, dual-path and plain sampling, PNGs in a folder that the metrics then score.

Layout: ``<out>/images/<method>/<setting>/<concept>/<prompt_idx>_<sample>.png``. Every image starts from the
noise of its own seed, :func:`image_seed` of (base seed, concept, prompt index, sample index). Generated alone
(batch 1, the default) an image is reproduced bit for bit when it is deleted and the run repeated; batched
matmuls round differently with the batch size, so with larger batches the harness regenerates the image's whole
batch (same members, same order) to reproduce it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from evaluation.plan import Setting
from models.artifact import ConceptArtifact
from models.attention import LoraDelta
from models.backbone import DiffusionBackbone
from models.io import atomic_write
from models.sampling import sample_personalized
from models.unet_offsets import applied_offsets

IMAGES_DIR = "images"


def image_seed(base_seed: int, concept: str, prompt_idx: int, sample: int) -> int:
    """Seed of one image: SHA-256 of (base seed, concept, prompt index, sample index), in [0, 2**63).

    Deterministic across processes and machines (unlike Python's salted ``hash``). Methods and settings share
    it on purpose: comparing them on the same initial noise removes noise-to-noise variance from the differences.
    """
    key = f"{int(base_seed)}|{concept}|{int(prompt_idx)}|{int(sample)}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") & ((1 << 63) - 1)


def image_relpath(method: str, setting: Setting, concept: str, prompt_idx: int, sample: int) -> str:
    """Path of one image relative to the output folder (POSIX separators, as written to ``results.csv``)."""
    return f"{IMAGES_DIR}/{method}/{setting.label}/{concept}/{prompt_idx:02d}_{sample:02d}.png"


def to_uint8(image: Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8, rounding to nearest (what the PNG holds)."""
    array = (image.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return array.permute(1, 2, 0).cpu().numpy()


def from_uint8(array: np.ndarray) -> Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float in [0, 1]: the exact image the metrics see."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float() / 255.0


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Writes an (H, W, 3) uint8 image atomically (temporary file, then rename): no half-written PNGs."""
    return atomic_write(path, lambda tmp: Image.fromarray(array, mode="RGB").save(tmp, format="PNG"))


def load_png(path: str | Path) -> np.ndarray:
    """Reads a PNG written by :func:`save_png` as (H, W, 3) uint8."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def save_grid(images: Sequence[np.ndarray] | np.ndarray, path: str, cols: int = 8, scale: int = 2) -> None:
    """Saves uint8 HxWx3 images as one PNG grid (nearest-neighbour upscaled by ``scale``)."""
    images = np.asarray(images)
    n, h, w, _ = images.shape
    rows = (n + cols - 1) // cols
    grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, 3), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = im
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def initial_latents(backbone: DiffusionBackbone, seeds: list[int]) -> Tensor:
    """(N, C, h, w) initial noise, image i drawn on the CPU from its own seed (independent of batch-mates)."""
    cfg = backbone.unet.config
    shape = (1, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    return torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


@torch.no_grad()
def generate_images(
    backbone: DiffusionBackbone,
    artifact: ConceptArtifact,
    prompts: list[str],
    seeds: list[int],
    setting: Setting,
    num_inference_steps: int,
    sampler: str = "ddim",
    negative_prompt: str = "",
) -> list[np.ndarray]:
    """Generates personalized images in one batch.

    Each image starts from the noise of its own seed, so a batch of one reproduces an image exactly; larger
    batches are faster but round differently, so they reproduce an image only within the same batch.

    Args:
        backbone: the frozen backbone (dual-path processors installed).
        artifact: the concept (v*, static LoRA, the hard prompt's word).
        prompts: N prompts containing the placeholder.
        seeds: N image seeds (:func:`image_seed`).
        setting: alpha and guidance to sample with (``steps`` only names the artefact).
        num_inference_steps: denoising steps.
        sampler: ``ddim`` or ``dpm``.
        negative_prompt: text of the unconditional branch.

    Returns:
        N (H, W, 3) uint8 images.
    """
    device = backbone.unet.device
    lora = {k: LoraDelta(*(t.to(device) for t in d)) for k, d in artifact.deltas().items()}
    with applied_offsets(backbone.unet, artifact.unet_offsets):  # full fine-tuning's weights (DreamBooth)
        images = sample_personalized(
            backbone,
            list(prompts),
            artifact.v_star.to(device).unsqueeze(0),
            lora,
            torch.tensor([artifact.hard_prompt_token_id], device=device),
            alpha=setting.alpha,
            num_inference_steps=num_inference_steps,
            guidance_scale=setting.guidance,
            sampler=sampler,
            latents=initial_latents(backbone, list(seeds)).to(device),
            negative_prompt=negative_prompt,
        )
    return [to_uint8(image) for image in images]


@torch.no_grad()
def generate_plain(
    backbone: DiffusionBackbone,
    prompts: list[str],
    seeds: list[int],
    setting: Setting,
    num_inference_steps: int,
    sampler: str = "ddim",
    negative_prompt: str = "",
) -> list[np.ndarray]:
    """Base-model images of prompts without any concept (the plain-words reference), on the same sampler and
    initial noise as :func:`generate_images`.

    Returns:
        N (H, W, 3) uint8 images.
    """
    device = backbone.unet.device
    images = sample_personalized(
        backbone,
        list(prompts),
        torch.zeros(1, backbone.token_dim, device=device),
        None,
        None,
        alpha=1.0,  # adapted path only, and with no LoRA it is the base model
        num_inference_steps=num_inference_steps,
        guidance_scale=setting.guidance,
        sampler=sampler,
        latents=initial_latents(backbone, list(seeds)).to(device),
        negative_prompt=negative_prompt,
        require_placeholder=False,
    )
    return [to_uint8(image) for image in images]
