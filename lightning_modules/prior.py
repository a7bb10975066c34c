"""DreamBooth's prior preservation (Ruiz et al., CVPR 2023; diffusers' ``train_dreambooth.py
--with_prior_preservation``): class images from the base model keep the class's prior while the UNet learns the
instance.

Before a concept's first step, ``num_class_images`` images of its class are sampled from the still untouched base
model (the class prompt, classifier-free guidance, ``inference_steps`` denoising steps; diffusers generates them
with its pipeline the same way when ``--class_data_dir`` holds too few) and encoded once. Every tuning step then adds
as many class rows as the batch has instance rows, noised with their own draw, through the UNet as it stands (tuned
weights, no concept), and the loss is ``instance MSE + prior_loss_weight x class MSE``, as the script computes it.
"""

from __future__ import annotations

import torch

from datamodules.concept import TuningConcept
from losses.diffusion import add_noise
from models.sampling import sample_personalized

PRIOR_SEED_OFFSET = 7_919  # class rows draw noise and timesteps apart from the instance rows of the same step


def class_prompts(concept: TuningConcept, n: int, class_prompt: str | None) -> list[str]:
    """``n`` prompts of the concept's class: ``class_prompt`` (``{class_noun}`` filled in), or each of the concept's
    caption templates with the class noun in place of the concept, in turn.

    Raises:
        ValueError: no class noun to fill in.
    """
    noun = concept.class_noun
    if class_prompt is not None and "{class_noun}" not in class_prompt:
        return [class_prompt] * n
    if not noun:
        raise ValueError("prior preservation needs the concept's class noun: set data.init_args.class_noun")
    if class_prompt is not None:
        return [class_prompt.format(class_noun=noun)] * n
    templates = list(concept.templates or ("a photo of a {}",))
    return [templates[i % len(templates)].format(noun) for i in range(n)]


class ClassPrior:
    """The class images of one concept and the prior term of each step.

    Args:
        num_images: class images generated per concept.
        weight: ``prior_loss_weight``.
        class_prompt: see :func:`class_prompts`.
        guidance: classifier-free guidance of the class images.
        inference_steps: their denoising steps.
        seed: seeds the class images' noise and the class rows' draws.
    """

    def __init__(
        self,
        num_images: int,
        weight: float,
        class_prompt: str | None,
        guidance: float,
        inference_steps: int,
        seed: int,
    ) -> None:
        if num_images < 1 or weight < 0 or inference_steps < 1:
            raise ValueError(
                f"prior preservation needs prior_class_images >= 1, prior_loss_weight >= 0 and prior_inference_steps "
                f">= 1, got {num_images}, {weight}, {inference_steps}"
            )
        self.num_images, self.weight, self.class_prompt = num_images, weight, class_prompt
        self.guidance, self.inference_steps, self.seed = guidance, inference_steps, seed
        self.latents: torch.Tensor | None = None
        self.ids: torch.Tensor | None = None
        self.prompts: list[str] = []

    @torch.no_grad()
    def prepare(self, backbone, concept: TuningConcept, batch_size: int = 8) -> None:
        """Samples and encodes the class images of ``concept`` with the backbone as it is (the base model)."""
        self.prompts = class_prompts(concept, self.num_images, self.class_prompt)
        device = backbone.unet.device
        generator = torch.Generator().manual_seed(self.seed + PRIOR_SEED_OFFSET)
        latents = []
        for start in range(0, self.num_images, batch_size):
            prompts = self.prompts[start : start + batch_size]
            images = sample_personalized(
                backbone,
                prompts,
                torch.zeros(1, backbone.token_dim, device=device),
                None,
                None,
                alpha=1.0,
                num_inference_steps=self.inference_steps,
                guidance_scale=self.guidance,
                generator=generator,
                require_placeholder=False,
            )
            latents.append(backbone.encode_images(images * 2.0 - 1.0).float())
        self.latents = torch.cat(latents)
        self.ids = backbone.tokenize(self.prompts, require_placeholder=False)

    def loss(self, module, n_rows: int) -> torch.Tensor:
        """The prior term of the current step: MSE of ``n_rows`` class rows (taken in turn) through the UNet."""
        if self.latents is None or self.ids is None:
            raise RuntimeError("ClassPrior.loss before prepare()")
        bb = module.backbone
        step = int(module.global_step)
        rows = (torch.arange(n_rows) + step * n_rows) % self.latents.shape[0]
        latents = self.latents[rows].to(bb.unet.device)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step + PRIOR_SEED_OFFSET)
        noised = add_noise(bb.scheduler, latents, generator=generator)
        cond = bb.conditioning(self.ids[rows].to(bb.unet.device))
        pred = bb.denoise(noised.noisy, noised.timesteps, cond, None, None, 1.0)
        return module.diffusion_loss(pred.float(), noised.target.float())["loss/diffusion"]
