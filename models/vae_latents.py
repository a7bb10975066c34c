"""The VAE between pixels and the scaled latents the UNet works in: the posterior's mean or a draw from it, and back."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL


def encode_latents(
    vae: AutoencoderKL, pixel_values: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Latents scaled by the VAE's scaling factor: the posterior's mean (deterministic), or with ``generator`` one
    draw from the posterior, ``mean + std * eps`` with ``eps`` drawn on ``generator``'s device, as diffusers'
    training scripts do (``latent_dist.sample()``).

    Args:
        vae: the autoencoder.
        pixel_values: (B, 3, H, W) in [-1, 1].
        generator: source of the posterior draw; None for the mean.

    Returns:
        (B, C, H / f, W / f) latents.
    """
    dist = vae.encode(pixel_values.to(vae.dtype)).latent_dist
    latents = dist.mean
    if generator is not None:
        eps = torch.randn(latents.shape, generator=generator, device=generator.device, dtype=torch.float32)
        latents = latents + dist.std * eps.to(latents.device, latents.dtype)
    return latents * vae.config.scaling_factor


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] from scaled latents."""
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)
