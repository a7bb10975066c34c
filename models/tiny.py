"""Builds an offline, seeded, tiny Stable Diffusion pipeline folder from component configs.

Usage::

    python -m models.tiny OUT_DIR [--config configs/backbone/tiny.yaml] [--prediction-type v_prediction]

With an SDXL component config (``configs/backbone/tiny_sdxl.yaml``) it builds the tiny SDXL through
:mod:`models.tiny_sdxl`.

The folder has the standard diffusers layout (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``) plus ``image_encoder/`` (CLIP vision tower) and ``feature_extractor/`` (its
image processor), so plain ``StableDiffusionPipeline.from_pretrained(OUT_DIR)`` loads and samples from it and
the project loads it through exactly the same ``from_pretrained`` code as real weights.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from omegaconf import OmegaConf
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from models.clip_tokenizer import load_clip_tokenizer, write_clip_tokenizer
from models.errors import ConfigurationError
from models.io import atomic_write_dir
from models.tiny_parts import CLIP_MEAN, CLIP_STD, clip_image_processor, is_sdxl_config
from models.tiny_sdxl import write_tiny_sdxl_backbone

__all__ = ["CLIP_MEAN", "CLIP_STD", "build_tiny_pipeline", "is_sdxl_config", "write_tiny_backbone"]

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "backbone" / "tiny.yaml"


def build_tiny_pipeline(config_path: str | Path = DEFAULT_CONFIG, prediction_type: str | None = None):
    """Builds the tiny pipeline in memory (seeded: the same config always gives the same weights).

    Raises:
        ConfigurationError: ``config_path`` describes a tiny SDXL (it has ``text_encoder_2``): build that with
            :func:`models.tiny_sdxl.build_tiny_sdxl_pipeline`.
    """
    cfg = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    if is_sdxl_config(cfg):
        raise ConfigurationError(
            f"{config_path} describes a tiny SDXL backbone (it has text_encoder_2): build it with "
            "models.tiny_sdxl (python -m models.tiny_sdxl OUT --config ...)"
        )
    torch.manual_seed(int(cfg["seed"]))
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg["image_encoder"]))
    sched_cfg = dict(cfg["scheduler"])
    if prediction_type is not None:
        sched_cfg["prediction_type"] = prediction_type
    scheduler = DDIMScheduler(**sched_cfg)
    processor = clip_image_processor(int(cfg["image_encoder"]["image_size"]))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_clip_tokenizer(write_clip_tokenizer(tmp))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=processor,
        image_encoder=image_encoder,
        requires_safety_checker=False,
    )


def write_tiny_backbone(
    out_dir: str | Path,
    config_path: str | Path = DEFAULT_CONFIG,
    prediction_type: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes the tiny pipeline folder atomically (built in a sibling temp folder, then swapped in).

    Returns the folder. An existing complete folder is kept unless ``overwrite``.
    """
    out = Path(out_dir)
    if (out / "model_index.json").exists() and not overwrite:
        return out
    pipe = build_tiny_pipeline(config_path, prediction_type)
    atomic_write_dir(out, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", help="folder to write the diffusers pipeline to")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML of component configs")
    parser.add_argument(
        "--prediction-type",
        choices=["epsilon", "v_prediction"],
        default=None,
        help="override the scheduler's prediction type (default: the config's)",
    )
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if the folder exists")
    args = parser.parse_args(argv)
    if is_sdxl_config(OmegaConf.to_container(OmegaConf.load(args.config), resolve=True)):
        if args.prediction_type is not None:
            parser.error("--prediction-type is not available for the tiny SDXL backbone (its config sets it)")
        out = write_tiny_sdxl_backbone(args.out_dir, args.config, args.overwrite)
        print(
            f"tiny Stable Diffusion XL backbone at {out} (the config is an SDXL one: models.tiny_sdxl built it)"
        )
        return
    out = write_tiny_backbone(args.out_dir, args.config, args.prediction_type, args.overwrite)
    print(f"tiny Stable Diffusion backbone at {out}")


if __name__ == "__main__":
    main()
