"""A base model's fingerprint: a short hash of its component configs and a few weight tensors.

Checkpoints and concept artefacts record it, so loading them on another base model (another size, or the same
architecture with other weights) is refused, whatever path or hub id it was loaded from.

The weights are hashed rounded to bfloat16, so the same float32 files loaded in float32 or cast to bfloat16
(``dtype``) give one fingerprint: an encoder pretrained on a bf16 backbone can be tuned on a float32 one. Float16
weights (cast, or an ``fp16`` variant) are rounded differently (double rounding fp32 -> fp16 -> bf16) and
generally hash differently: keep one of those for both phases.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

# Text-encoder config keys left out of the hash: the dtype it was loaded in, and the folder it was loaded from.
_LOAD_KEYS = {"dtype", "torch_dtype", "_name_or_path"}


def backbone_fingerprint(backbone, load_path: str | None = None) -> str:
    """The fingerprint of a :class:`~models.backbone.DiffusionBackbone` (16 hex digits).

    Hashes the UNet and VAE configs, the text encoder's config, the first conv of the UNet and of the VAE encoder,
    the first 256 rows of the token-embedding table, and the prediction type.

    Args:
        backbone: the backbone (its ``unet``, ``vae``, ``text_encoder``, ``token_embedding_table()`` and
            ``prediction_type``).
        load_path: None (the fingerprint). Else the fingerprint as recorded before it left out the folder the
            text encoder was loaded from (transformers keeps it as ``_name_or_path``), computed as if loaded from
            ``load_path``: see :func:`matches_fingerprint`.
    """
    h = hashlib.sha256()
    for cfg in (backbone.unet.config, backbone.vae.config):
        public = {k: v for k, v in dict(cfg).items() if not k.startswith("_")}
        h.update(json.dumps(public, sort_keys=True, default=str).encode())
    text_cfg = {
        k: v
        for k, v in backbone.text_encoder.config.to_dict().items()
        if "version" not in k and k not in _LOAD_KEYS
    }
    if load_path is not None:
        text_cfg["_name_or_path"] = load_path
    h.update(json.dumps(text_cfg, sort_keys=True, default=str).encode())
    for t in (
        backbone.unet.conv_in.weight,
        backbone.token_embedding_table()[:256],
        backbone.vae.encoder.conv_in.weight,
    ):
        h.update(t.detach().to(torch.bfloat16).float().cpu().contiguous().numpy().tobytes())
    h.update(str(backbone.prediction_type).encode())
    return h.hexdigest()[:16]


def matches_fingerprint(backbone, recorded: str | None, recorded_base_model: str | None = None) -> bool:
    """Whether a recorded fingerprint is ``backbone``'s, including one recorded by earlier versions, which hashed
    the load folder too: the same path string as now, or the recorded ``base_model``'s.

    Uses ``backbone.fingerprint`` (so a subclass's own fingerprint, e.g. SDXL's, is the one compared).
    """
    paths = [None, backbone.text_encoder.config.to_dict().get("_name_or_path")]
    if recorded_base_model:
        paths.append(str(Path(recorded_base_model).expanduser()))
    return any(backbone.fingerprint(p) == recorded for p in dict.fromkeys(paths))
