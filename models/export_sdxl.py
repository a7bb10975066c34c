"""SDXL concept files: the diffusers pair and the kohya / web-UI files of a concept tuned on SDXL.

An SDXL concept's v* is ``[v_l, v_g]`` (see :mod:`models.backbone_sdxl`); its embedding files hold the two parts
under ``clip_l`` (CLIP ViT-L, ``text_encoder``) and ``clip_g`` (OpenCLIP bigG, ``text_encoder_2``), each (1, D):
the layout Automatic1111 / Forge and ComfyUI read for SDXL embeddings and that diffusers' SDXL textual-inversion
docs load, one part per encoder::

    state = safetensors.torch.load_file("x_diffusers/learned_embeds.safetensors")
    pipe.load_textual_inversion(state["clip_l"], token="<s*>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="<s*>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)

The LoRA: ``StableDiffusionXLPipeline.save_lora_weights`` (peft keys ``unet.<module>.lora_A/B.weight``) for
diffusers, and kohya's ``lora_unet_<diffusers module path>`` layout (:mod:`models.export_kohya`, which derives
names from module paths alone, so it covers SDXL's UNet unchanged) with SDXL's ``ss_base_model_version`` and
SAI model-spec architecture. Both are the single-path approximation (alpha = 1), as for SD 1.x.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import save_file

from models.export_kohya import kohya_state_dict, lora_metadata
from models.io import atomic_write

KOHYA_SDXL_VERSION = "sdxl_base_v1-0"  # kohya sd-scripts' SDXL model-version string
SAI_SDXL_ARCH = "stable-diffusion-xl-v1-base"


def split_embedding(artifact) -> dict[str, torch.Tensor]:
    """``{part name: (1, D_part)}`` of an SDXL artefact's v*, e.g. ``{"clip_l": (1, 768), "clip_g": (1, 1280)}``."""
    parts = artifact.embedding_parts()
    if sum(parts.values()) != artifact.v_star.numel():
        raise ValueError(f"embedding parts {parts} do not add up to v*'s {artifact.v_star.numel()} values")
    pieces = torch.split(artifact.v_star.detach().float().cpu().reshape(-1), list(parts.values()))
    return {name: p.reshape(1, -1).contiguous() for name, p in zip(parts, pieces)}


def write_diffusers_sdxl(artifact, out_dir: str | Path) -> Path:
    """``pytorch_lora_weights.safetensors`` (``save_lora_weights``) and ``learned_embeds.safetensors``
    (``clip_l`` / ``clip_g``) in ``out_dir``; see the module docstring for loading them."""
    out = Path(out_dir)
    layers = {}
    for name, (down, up) in artifact.lora.items():
        layers[f"{name}.lora_A.weight"] = down.detach().float().cpu().contiguous()
        layers[f"{name}.lora_B.weight"] = up.detach().float().cpu().contiguous()
    atomic_write(
        out / "pytorch_lora_weights.safetensors",
        lambda tmp: StableDiffusionXLPipeline.save_lora_weights(
            Path(tmp).parent, unet_lora_layers=layers, weight_name=Path(tmp).name
        ),
    )
    meta = {"format": "pt", "base_model": artifact.base_model, "placeholder": artifact.placeholder}
    emb = split_embedding(artifact)
    atomic_write(out / "learned_embeds.safetensors", lambda tmp: save_file(emb, tmp, metadata=meta))
    return out


def write_kohya_sdxl(
    artifact,
    out_dir: str | Path,
    name: str,
    alpha: float | None = None,
    prediction_type: str = "epsilon",
    resolution: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Path]:
    """``<name>_lora.safetensors`` (kohya layout, SDXL metadata) and ``<name>.safetensors`` (``clip_l`` /
    ``clip_g``) in ``out_dir``. No A1111 ``.pt``: web UIs read SDXL embeddings from safetensors with those keys.

    Returns:
        ``{"lora": path, "embedding": path}``.
    """
    out = Path(out_dir)
    if not artifact.lora:
        raise ValueError("the concept has no LoRA factors to export")
    rank = next(iter(artifact.lora.values()))[0].shape[0]
    tensors = kohya_state_dict(artifact.lora, alpha, dtype)
    meta = lora_metadata(
        artifact, name, rank, float(rank if alpha is None else alpha), prediction_type, resolution
    )
    meta["ss_base_model_version"] = KOHYA_SDXL_VERSION
    meta["ss_v2"] = "False"
    meta["modelspec.architecture"] = f"{SAI_SDXL_ARCH}/lora"
    meta["ss_training_comment"] = meta["ss_training_comment"].replace(f" / {name}.pt", "")
    lora_path = atomic_write(
        out / f"{name}_lora.safetensors", lambda tmp: save_file(tensors, tmp, metadata=meta)
    )
    emb_meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{SAI_SDXL_ARCH}/textual-inversion",
        "modelspec.title": name,
        "tuning_encoder.placeholder": artifact.placeholder,
        "tuning_encoder.nearest_token": artifact.nearest_token,
        "tuning_encoder.version": meta["tuning_encoder.version"],
    }
    emb = split_embedding(artifact)
    emb_path = atomic_write(out / f"{name}.safetensors", lambda tmp: save_file(emb, tmp, metadata=emb_meta))
    return {"lora": lora_path, "embedding": emb_path}
