"""What the tiny SD and tiny SDXL builders (:mod:`models.tiny`, :mod:`models.tiny_sdxl`) share: the CLIP image
normalisation, the image processor built from it, and the test telling an SDXL component config from an SD one.

Both builders import this module and neither imports the other at load time, so there is no import cycle.
"""

from __future__ import annotations

from transformers import CLIPImageProcessor

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def is_sdxl_config(cfg: dict) -> bool:
    """Whether a component-config dict is the tiny SDXL's (two text encoders)."""
    return "text_encoder_2" in cfg


def clip_image_processor(size: int) -> CLIPImageProcessor:
    """CLIP's image processor at ``size`` x ``size`` (resize the short edge, centre-crop, CLIP's mean and std)."""
    return CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
