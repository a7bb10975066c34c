"""Loading a base model by what its folder or hub id holds: SD 1.x / 2.x or SDXL."""

from __future__ import annotations

from models.backbone import DiffusionBackbone
from models.backbone_sdxl import SDXLDiffusionBackbone, is_sdxl


def load_backbone(pretrained_model_name_or_path: str, *args, **kwargs) -> DiffusionBackbone:
    """:meth:`SDXLDiffusionBackbone.from_pretrained` for an SDXL pipeline (by its ``model_index.json``), else
    :meth:`DiffusionBackbone.from_pretrained`; both take the same arguments (``variant`` included)."""
    cls = SDXLDiffusionBackbone if is_sdxl(pretrained_model_name_or_path) else DiffusionBackbone
    return cls.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
