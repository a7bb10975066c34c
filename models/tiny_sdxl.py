"""Builds an offline, seeded, tiny Stable Diffusion XL pipeline folder from component configs.

Usage::

    python -m models.tiny_sdxl OUT_DIR [--config configs/backbone/tiny_sdxl.yaml]

The folder has diffusers' SDXL layout (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``, ``scheduler/``) plus ``image_encoder/`` and
``feature_extractor/``, so plain ``StableDiffusionXLPipeline.from_pretrained(OUT_DIR)`` samples from it and the
project loads it through the same ``from_pretrained`` code as real SDXL weights. Both tokenizers are the real CLIP
BPE (SDXL's two tokenizers share it); ``tokenizer_2`` pads with ``"!"`` as SDXL's does.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from omegaconf import OmegaConf
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from models.clip_tokenizer import load_clip_tokenizer, write_clip_tokenizer
from models.io import atomic_write_dir
from models.tiny_parts import clip_image_processor

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "backbone" / "tiny_sdxl.yaml"


def build_tiny_sdxl_pipeline(config_path: str | Path = DEFAULT_CONFIG) -> StableDiffusionXLPipeline:
    """Builds the tiny SDXL pipeline in memory (seeded: the same config always gives the same weights)."""
    cfg = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    torch.manual_seed(int(cfg["seed"]))
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"]))
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg["image_encoder"]))
    scheduler = EulerDiscreteScheduler(**cfg["scheduler"])
    processor = clip_image_processor(int(cfg["image_encoder"]["image_size"]))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_clip_tokenizer(write_clip_tokenizer(Path(tmp) / "a"))
        tokenizer_2 = load_clip_tokenizer(write_clip_tokenizer(Path(tmp) / "b"))
    tokenizer_2.pad_token = "!"
    if tokenizer_2.pad_token_id != text_encoder_2.config.pad_token_id:
        raise ValueError("text_encoder_2.pad_token_id must be the id of '!' (0), as in SDXL")
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        image_encoder=image_encoder,
        feature_extractor=processor,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def write_tiny_sdxl_backbone(
    out_dir: str | Path, config_path: str | Path = DEFAULT_CONFIG, overwrite: bool = False
) -> Path:
    """Writes the tiny SDXL folder atomically; an existing complete folder is kept unless ``overwrite``."""
    out = Path(out_dir)
    if (out / "model_index.json").exists() and not overwrite:
        return out
    pipe = build_tiny_sdxl_pipeline(config_path)
    atomic_write_dir(out, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", help="folder to write the diffusers SDXL pipeline to")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML of component configs")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if the folder exists")
    args = parser.parse_args(argv)
    out = write_tiny_sdxl_backbone(args.out_dir, args.config, args.overwrite)
    print(f"tiny Stable Diffusion XL backbone at {out}")


if __name__ == "__main__":
    main()
