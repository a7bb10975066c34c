"""Static peft LoRA on the UNet, exactly as diffusers' ``examples/dreambooth/train_dreambooth_lora.py`` adds it.

The one-shot LoRA baseline trains these adapters; the helpers here add them, snapshot and restore them (one
module tunes many concepts in evaluation), convert them to the concept artefact's static factors (so the
evaluation samples every method through the same dual-path processors) and save them in the file layout
``pipe.load_lora_weights`` reads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

from models.attention import DEFAULT_PROJECTIONS
from models.io import atomic_write_dir


def add_unet_lora(
    unet: UNet2DConditionModel, rank: int = 4, target_modules: tuple[str, ...] = DEFAULT_PROJECTIONS
) -> LoraConfig:
    """Adds a trainable peft LoRA adapter to every ``target_modules`` linear of the UNet.

    As ``train_dreambooth_lora.py``: ``LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian")`` and
    ``unet.add_adapter``; the adapter parameters are kept in float32 (the script's ``cast_training_params``).
    Gaussian init draws A and sets B = 0, so the adapted UNet starts exactly equal to the base UNet.

    Returns:
        The adapter's config.
    """
    config = LoraConfig(
        r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(target_modules)
    )
    unet.add_adapter(config)
    for param in lora_parameters(unet).values():
        param.data = param.data.float()
    return config


def lora_parameters(unet: UNet2DConditionModel) -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters by name (``...to_q.lora_A.default.weight``)."""
    return {n: p for n, p in unet.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def lora_snapshot(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """Detached copies of the adapter's parameters (see :func:`restore_lora`)."""
    return {n: p.detach().clone() for n, p in lora_parameters(unet).items()}


def restore_lora(unet: UNet2DConditionModel, snapshot: dict[str, torch.Tensor]) -> None:
    """Copies a :func:`lora_snapshot` back into the adapter in place (optimizer references stay valid)."""
    params = lora_parameters(unet)
    if params.keys() != snapshot.keys():
        raise ValueError("LoRA snapshot does not match the UNet's adapter")
    with torch.no_grad():
        for name, value in snapshot.items():
            params[name].copy_(value)


def static_factors(unet: UNet2DConditionModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The adapter as ``"<module>" -> (down = scale · A (r, in), up = B (out, r))``, float32 on the CPU.

    ``W' = W + scale · B · A`` with ``scale = lora_alpha / r``: folding the scale into ``down`` gives the
    artefact's static-LoRA convention (``dW = up · down``), so no alpha can be lost at the format boundary.
    """
    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            scale = float(module.scaling["default"])
            down = module.lora_A["default"].weight.detach().float().cpu() * scale
            out[name] = (down, module.lora_B["default"].weight.detach().float().cpu().clone())
    return out


def save_diffusers_lora(unet: UNet2DConditionModel, out_dir: str | Path) -> Path:
    """Writes ``pytorch_lora_weights.safetensors`` as the script does (atomically, folder swapped in).

    ``StableDiffusionPipeline.save_lora_weights(dir, unet_lora_layers=get_peft_model_state_dict(unet))``; plain
    ``pipe.load_lora_weights(dir)`` reads it back.
    """
    state = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    return atomic_write_dir(
        Path(out_dir), lambda tmp: StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=state)
    )
