"""A plain diffusers + peft one-image LoRA, outside the framework: the reference our tuning path is compared with.

Written the way ``examples/dreambooth/train_dreambooth_lora.py`` trains (diffusers 0.42; read, not copied): the
pipeline's parts loaded with ``from_pretrained``, ``DDPMScheduler`` from the pipeline's scheduler config,
``unet.add_adapter(LoraConfig(r, lora_alpha=r, init_lora_weights="gaussian", target_modules=[to_k, to_q, to_v,
to_out.0]))``, AdamW (0.9, 0.999, weight decay 1e-2, eps 1e-8), a constant rate, gradient norm clipped at 1.0,
latents ``vae.encode(x).latent_dist.sample() * scaling_factor``, uniform timesteps, the global torch RNG seeded
once, MSE against the scheduler's target (``get_velocity`` for v-prediction). Nothing of the framework trains or
samples here: sampling is a plain ``StableDiffusionPipeline`` call with the LoRA in its UNet (DDIM, the
evaluation's initial noise per image, :func:`evaluation.generate.images.image_seed`), scored with the instance
world's pixel metric (:func:`toyworld.instance.pixels.score_images`, the evaluation's).

Switches move one difference toward the framework's tuning path at a time (``docs/research/peft_reference.md``):
``latents="mean"`` (the framework encodes the posterior mean), ``identifier="sks"`` (a random, untrained row of the
toy text encoder before the class noun, as the LoRA recipe's "sks" is in this world).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


@dataclass
class ReferenceRecipe:
    """The reference run's settings (``train_dreambooth_lora.py``'s names in brackets).

    Attributes:
        steps: optimizer steps (``--max_train_steps``).
        lr: learning rate (``--learning_rate``), constant.
        rank: LoRA rank and ``lora_alpha`` (``--rank``).
        batch_size: copies of the one image per step (``--train_batch_size``).
        seed: the global seed (``--seed``).
        latents: ``sample`` (the script) or ``mean`` (the framework) of the VAE posterior.
        identifier: ``words`` (the caption's own class noun) or ``sks`` ("sks <class noun>").
        max_grad_norm: gradient clipping (``--max_grad_norm``).
    """

    steps: int = 300
    lr: float = 1e-3
    rank: int = 16
    batch_size: int = 4
    seed: int = 0
    latents: str = "sample"
    identifier: str = "words"
    max_grad_norm: float = 1.0


def load_pipeline(pipeline_dir: str):
    """The base pipeline in float32 on the CPU, DDIM for sampling (as the evaluation samples)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        pipeline_dir, dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def say(text: str, class_noun: str, placeholder: str, identifier: str) -> str:
    """A prompt with the placeholder said as the identifier: the class noun, or "sks <class noun>"."""
    return text.replace(placeholder, class_noun if identifier == "words" else f"sks {class_noun}")


def image_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """(1, 3, R, R) in [-1, 1]: resize, to tensor, normalise with mean 0.5 and std 0.5 (the script's transforms)."""
    x = np.asarray(image.convert("RGB").resize((resolution, resolution), Image.BILINEAR), dtype=np.float32)
    return torch.from_numpy(x / 127.5 - 1.0).permute(2, 0, 1)[None]


def train_lora(pipe, image: Image.Image, caption: str, recipe: ReferenceRecipe) -> list[float]:
    """Adds a LoRA to ``pipe.unet`` and trains it on ``image`` with ``caption``; returns the per-step losses."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    if recipe.latents not in ("sample", "mean"):
        raise ValueError(f"latents must be 'sample' or 'mean', got {recipe.latents!r}")
    torch.manual_seed(recipe.seed)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    unet.add_adapter(
        LoraConfig(
            r=recipe.rank, lora_alpha=recipe.rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS
        )
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    pixels = image_tensor(image, unet.config.sample_size * pipe.vae_scale_factor)
    pixels = pixels.expand(recipe.batch_size, -1, -1, -1)
    ids = tokenizer(
        [caption] * recipe.batch_size,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        hidden = text_encoder(ids)[0]
    unet.train()
    losses = []
    for _ in range(recipe.steps):
        with torch.no_grad():
            dist = vae.encode(pixels).latent_dist
            latents = (dist.sample() if recipe.latents == "sample" else dist.mean) * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
        noisy = noise_scheduler.add_noise(latents, noise, t)
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        pred = unet(noisy, t, hidden, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    unet.eval()
    return losses


@torch.no_grad()
def sample_and_score(
    pipe, concept, placeholder: str, identifier: str, guidance: float, samples_per_prompt: int, seed: int = 0
) -> dict[str, float]:
    """Samples every prompt of ``concept`` (an :class:`~evaluation.concepts.base.EvalConcept` of the instance world)
    from the evaluation's initial noise and returns the mean of each pixel-metric column."""
    from evaluation.generate.images import image_seed, initial_latents, to_uint8
    from toyworld.instance.pixels import score_images

    reference = np.asarray(concept.load_input().convert("RGB").resize((32, 32)))
    columns: dict[str, list[float]] = {}
    for i, prompt in enumerate(concept.prompts):
        seeds = [image_seed(seed, concept.name, i, j) for j in range(samples_per_prompt)]
        latents = initial_latents(pipe, seeds)  # reads only pipe.unet.config, as for a backbone
        text = say(prompt, concept.class_noun, placeholder, identifier)
        images = pipe(
            [text] * samples_per_prompt,
            num_inference_steps=25,
            guidance_scale=guidance,
            negative_prompt=[""] * samples_per_prompt,
            latents=latents,
            output_type="pt",
        ).images.float()
        if images.shape[-2:] != (32, 32):
            images = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True)
        scores = score_images(
            [to_uint8(im) for im in images], reference, [concept.attributes[i]] * samples_per_prompt
        )
        for key, values in scores.items():
            columns.setdefault(key, []).extend(values)
    return {key: float(np.mean(values)) for key, values in columns.items()}
