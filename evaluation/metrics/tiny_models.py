"""Builds offline, seeded, tiny evaluation backbones: a CLIP model (CLIP-I / CLIP-T) and a DINO-style ViT.

Usage::

    python -m evaluation.metrics.tiny_models OUT_DIR [--seed 0] [--overwrite]

``OUT_DIR/clip`` holds a ``transformers.CLIPModel`` with the real 49,408-token CLIP tokenizer and a
``CLIPImageProcessor``; ``OUT_DIR/dino`` holds a ``transformers.ViTModel`` with a ``ViTImageProcessor``. Both load
through exactly the same ``from_pretrained`` code as real evaluation weights (``openai/clip-vit-large-patch14``,
``facebook/dino-vits16``), so tests and smoke runs exercise the real evaluation path. The numbers they give are
meaningless (random weights); only their plumbing is tested.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    ViTConfig,
    ViTImageProcessorPil,
    ViTModel,
)

from models.clip_tokenizer import CLIP_VOCAB_SIZE, load_clip_tokenizer, write_clip_tokenizer
from models.io import atomic_write_dir

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
TINY_IMAGE_SIZE = 32


def build_tiny_clip(seed: int = 0) -> tuple[CLIPModel, CLIPImageProcessorPil]:
    """Builds a seeded tiny ``CLIPModel`` (2-layer, width 32 towers, 32 px images) and its image processor."""
    torch.manual_seed(seed)
    # Special-token ids come from the real CLIP vocabulary (see models.clip_tokenizer): BOS is the
    # second-to-last entry, EOS (also used as pad) the last.
    config = CLIPConfig(
        text_config={
            "vocab_size": CLIP_VOCAB_SIZE,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": CLIP_VOCAB_SIZE - 2,
            "eos_token_id": CLIP_VOCAB_SIZE - 1,
            "pad_token_id": CLIP_VOCAB_SIZE - 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": TINY_IMAGE_SIZE,
            "patch_size": 8,
        },
        projection_dim=32,
    )
    model = CLIPModel(config).eval()
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    return model, processor


def build_tiny_dino(seed: int = 0) -> tuple[ViTModel, ViTImageProcessorPil]:
    """Builds a seeded tiny DINO-style ``ViTModel`` and a ``ViTImageProcessor`` like ``facebook/dino-vits16``'s."""
    torch.manual_seed(seed + 1)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=TINY_IMAGE_SIZE,
        patch_size=8,
    )
    model = ViTModel(config).eval()
    processor = ViTImageProcessorPil(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    return model, processor


def _write_clip(folder: Path, seed: int) -> None:
    model, processor = build_tiny_clip(seed)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    write_clip_tokenizer(folder)
    load_clip_tokenizer(folder)  # refuses anything but the full 49,408-entry vocabulary


def _write_dino(folder: Path, seed: int) -> None:
    model, processor = build_tiny_dino(seed)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)


def write_tiny_eval_models(out_dir: str | Path, seed: int = 0, overwrite: bool = False) -> dict[str, Path]:
    """Writes the tiny CLIP and DINO evaluation backbones under ``out_dir``.

    Args:
        out_dir: parent folder; ``clip/`` and ``dino/`` are created inside it.
        seed: weight seed (the same seed always gives the same weights).
        overwrite: rebuild folders that already exist (otherwise a complete folder is reused).

    Returns:
        ``{"clip": out_dir/clip, "dino": out_dir/dino}``, each loadable with ``from_pretrained``.
    """
    root = Path(out_dir)
    paths = {"clip": root / "clip", "dino": root / "dino"}
    writers = {"clip": _write_clip, "dino": _write_dino}
    for name, path in paths.items():
        complete = (path / "config.json").exists() and (path / "preprocessor_config.json").exists()
        if complete and not overwrite:
            continue
        atomic_write_dir(path, lambda tmp, w=writers[name]: w(tmp, seed))
    return paths


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (``python -m evaluation.metrics.tiny_models --help``)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", help="folder to write clip/ and dino/ into")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild folders that already exist")
    args = parser.parse_args(argv)
    for name, path in write_tiny_eval_models(args.out_dir, args.seed, args.overwrite).items():
        print(f"tiny {name} evaluation model at {path}")


if __name__ == "__main__":
    main()
