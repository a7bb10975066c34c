"""SDXL concept files: the diffusers pair of a concept tuned on SDXL.

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
diffusers. The kohya / web-UI files are written by :func:`models.export_kohya.write_kohya` for both families.
Both are the single-path approximation (alpha = 1), as for SD 1.x.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import StableDiffusionXLPipeline
from safetensors.torch import save_file

from models.io import atomic_write


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
    emb = artifact.embedding_tensors()
    atomic_write(out / "learned_embeds.safetensors", lambda tmp: save_file(emb, tmp, metadata=meta))
    return out
