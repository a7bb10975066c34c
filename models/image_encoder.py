"""Loading the image tower of the encoder's image branch: CLIP (E4T's choice) or any vision model of transformers.

E4T reads CLIP's vision tower; DATE's image branch only needs per-layer token states ``(B, N, C)``. A folder (or
hub id) whose ``config.json`` is a CLIP model loads as ``CLIPVisionModelWithProjection``; any other model type
loads through ``AutoModel`` (e.g. DINOv2 ``facebook/dinov2-base``; for a dual-tower model such as SigLIP its
``vision_model``), with ``AutoImageProcessor`` for its mean and std. Towers without a [CLS] token (SigLIP) need
``personalizer.image_features: mean``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
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


def tower_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of an image tower (config and its first weights, rounded to bfloat16 so the load dtype does
    not matter): checkpoints record it, so an encoder trained on one tower is refused on another."""
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    cfg = {k: v for k, v in cfg.items() if "version" not in k and k not in {"dtype", "torch_dtype"}}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for p in list(model.parameters())[:4]:
        h.update(p.detach().to(torch.bfloat16).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def feature_widths(model: torch.nn.Module, image_size: int, hidden_states: Callable) -> list[int]:
    """Width of every hidden state of an image tower (embeddings first): from the config of a ViT (CLIP, DINOv2,
    SigLIP), else measured on one blank image (convolutional towers widen stage by stage)."""
    cfg = model.config
    if hasattr(cfg, "hidden_size") and hasattr(cfg, "num_hidden_layers"):
        return [int(cfg.hidden_size)] * (int(cfg.num_hidden_layers) + 1)
    device = next(model.parameters()).device
    with torch.no_grad():
        states = hidden_states(torch.zeros(1, 3, image_size, image_size, device=device))
    return [int(s.shape[1] if s.ndim == 4 else s.shape[-1]) for s in states]
