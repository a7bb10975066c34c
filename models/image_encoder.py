"""Loading the image tower of the encoder's image branch: CLIP (E4T's choice) or any vision model of transformers.

E4T reads CLIP's vision tower; DATE's image branch only needs per-layer token states ``(B, N, C)``. A folder (or
hub id) whose ``config.json`` is a CLIP model loads as ``CLIPVisionModelWithProjection``; any other model type
loads through ``AutoModel`` (e.g. DINOv2 ``facebook/dinov2-base``; for a dual-tower model such as SigLIP its
``vision_model``), with ``AutoImageProcessor`` for its mean and std. Towers without a [CLS] token (SigLIP) need
``personalizer.image_features: mean``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoModel, CLIPImageProcessor, CLIPVisionModelWithProjection

CLIP_MODEL_TYPES = ("clip", "clip_vision_model")


def image_encoder_model_type(path: str | Path, subfolder: str = "") -> str | None:
    """``model_type`` of a local image-encoder folder's config.json (None for hub ids not cached locally)."""
    cfg = Path(path) / subfolder / "config.json"
    if not cfg.is_file():
        return None
    return json.loads(cfg.read_text()).get("model_type")


def load_image_encoder(
    path: str, subfolder: str = "", processor_subfolder: str = "", **kwargs
) -> tuple[torch.nn.Module, object]:
    """(vision tower, image processor) from a folder or hub id; ``kwargs`` go to ``from_pretrained``."""
    kind = image_encoder_model_type(path, subfolder)
    if kind is None or kind in CLIP_MODEL_TYPES:
        model = CLIPVisionModelWithProjection.from_pretrained(path, subfolder=subfolder, **kwargs)
        return model, CLIPImageProcessor.from_pretrained(path, subfolder=processor_subfolder)
    model = AutoModel.from_pretrained(path, subfolder=subfolder, **kwargs)
    if hasattr(model, "vision_model") and hasattr(model.config, "vision_config"):
        tower = model.vision_model  # dual-tower models (SigLIP): the image half
        tower.config = model.config.vision_config
        model = tower
    return model, AutoImageProcessor.from_pretrained(path, subfolder=processor_subfolder)


def tower_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
