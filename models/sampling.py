"""Personalized sampling: classifier-free guidance with dual-path attention, DDIM or DPM-Solver."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from models.attention import LoraDelta
from models.backbone import DiffusionBackbone

SAMPLERS = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}


def make_sampler(backbone: DiffusionBackbone, name: str = "ddim"):
    """A sampling scheduler built from the backbone's training scheduler config."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name].from_config(backbone.scheduler.config)


def _repeat_lora(lora: dict[str, LoraDelta], n: int) -> dict[str, LoraDelta]:
    return {k: d.repeat(n) for k, d in lora.items()}


@torch.no_grad()
def sample_personalized(
    backbone: DiffusionBackbone,
    prompts: list[str],
    v_star: torch.Tensor,
    lora: dict[str, LoraDelta] | None = None,
    hard_token_ids: torch.Tensor | None = None,
    alpha: float = 1.0,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    sampler: str = "ddim",
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    negative_prompt: str = "",
    require_placeholder: bool = True,
) -> torch.Tensor:
    """Generates one image per prompt with S* personalized by (v*, LoRA deltas).

    Args:
        backbone: the frozen backbone (dual-path processors installed).
        prompts: B prompts containing the placeholder.
        v_star: (B, D) or (1, D) placeholder embeddings.
        lora: per-sample LoRA deltas with cores (B, r, r) or (1, r, r); None for none.
        hard_token_ids: (B,) or (1,) nearest real token per sample (needed when alpha < 1).
        alpha: dual-path blend at sampling time.
        num_inference_steps: denoising steps.
        guidance_scale: classifier-free guidance scale (1 disables the unconditional branch).
        sampler: ``"ddim"`` or ``"dpm"`` (DPM-Solver++ multistep).
        generator: CPU generator for the initial noise (fixed seeds make every image reproducible alone).
        latents: optional (B, C, h, w) initial noise instead of drawing it.
        negative_prompt: text of the unconditional branch (on SDXL, "" is the all-zero conditioning).
        require_placeholder: refuse prompts without the placeholder (False: prompts without it are sampled by
            the base model, alpha and LoRA aside: the plain-words reference of the evaluation).

    Returns:
        (B, 3, H, W) images in [0, 1].
    """
    device = backbone.unet.device
    n = len(prompts)
    ids = backbone.tokenize(prompts, require_placeholder=require_placeholder)
    v = v_star.expand(n, -1) if v_star.shape[0] == 1 else v_star
    lora = lora or {}
    if lora and next(iter(lora.values())).core.shape[0] == 1 and n > 1:
        lora = _repeat_lora(lora, n)
    hard = hard_token_ids
    if hard is not None and hard.shape[0] == 1 and n > 1:
        hard = hard.expand(n)
    sched = make_sampler(backbone, sampler)
    sched.set_timesteps(num_inference_steps, device=device)
    if latents is None:
        shape = (
            n,
            backbone.unet.config.in_channels,
            backbone.unet.config.sample_size,
            backbone.unet.config.sample_size,
        )
        latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    latents = latents * sched.init_noise_sigma
    use_cfg = guidance_scale > 1.0
    soft = backbone.conditioning(ids, v)
    hard_cond = None
    if alpha < 1.0:
        if hard is None:
            raise ValueError(f"alpha={alpha} < 1 needs hard_token_ids (the nearest real token of v*)")
        hard_cond = backbone.conditioning(backbone.hard_prompt_ids(ids, hard))
    if use_cfg:
        # The weight offsets act on both branches, as a LoRA loaded into diffusers would; the unconditional
        # prompt holds no S*, so its soft and hard conditionings coincide.
        uncond = backbone.unconditional(n, negative_prompt)
        soft = uncond.cat(soft)
        hard_cond = uncond.cat(hard_cond) if hard_cond is not None else None
        lora = _repeat_lora(lora, 2) if lora else lora
    for t in sched.timesteps:
        model_in = sched.scale_model_input(latents, t)
        if use_cfg:
            model_in = torch.cat([model_in, model_in])
        pred = backbone.denoise(model_in, t.to(device), soft, hard_cond, lora, alpha).float()
        if use_cfg:
            pred_uncond, pred_cond = pred.chunk(2)
            pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
        latents = sched.step(pred, t, latents).prev_sample
    return backbone.decode_latents(latents)
