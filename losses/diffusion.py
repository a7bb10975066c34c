"""The standard denoising loss shared by encoder pretraining and inference-time tuning.

Both phases noise ``z_0`` with the same helper (:func:`add_noise`) and score the UNet prediction with the
same module (:class:`DiffusionLoss`), so the target (epsilon, v or sample) always follows the scheduler's
``prediction_type`` and never drifts between the two phases (STYLE.md, "one shared diffusion-loss helper").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from losses.distributed import world_and_rank
from losses.precision import full_precision

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

__all__ = [
    "PREDICTION_TYPES",
    "DiffusionLoss",
    "NoisedLatents",
    "add_noise",
    "check_finite",
    "diffusion_target",
]

#: The ``prediction_type`` values of diffusers' DDPM-family schedulers that the loss supports.
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")


def diffusion_target(scheduler: SchedulerMixin, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """Returns what the UNet should predict for ``z_t``, following ``scheduler.config.prediction_type``.

    Args:
        scheduler: A diffusers noise scheduler (DDPM, DDIM, ...) with ``config.prediction_type`` and, for
            v-prediction, ``get_velocity``.
        latents: Clean latents ``z_0``, shape ``(B, C, H, W)``.
        noise: The Gaussian noise that was added, shape ``(B, C, H, W)``.
        timesteps: Integer timesteps, shape ``(B,)``.

    Returns:
        The target, shape ``(B, C, H, W)``: ``noise`` for ``"epsilon"``,
        ``sqrt(alpha_bar_t) * noise - sqrt(1 - alpha_bar_t) * z_0`` for ``"v_prediction"`` and ``z_0``
        for ``"sample"``.

    Raises:
        ValueError: If the scheduler's ``prediction_type`` is none of :data:`PREDICTION_TYPES`.
    """
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        # SD 2.x-style models: delegate to the scheduler so the formula matches its sampling code exactly.
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ValueError(
        f"unsupported scheduler prediction_type {prediction_type!r}; expected one of {list(PREDICTION_TYPES)}"
    )


@dataclass
class NoisedLatents:
    """One forward-diffusion draw: what the UNet sees and what it should predict.

    Attributes:
        noisy: Noisy latents ``z_t``, shape ``(B, C, H, W)``, same dtype and device as the clean latents.
        noise: The Gaussian noise that was added, shape ``(B, C, H, W)``.
        timesteps: Integer timesteps, shape ``(B,)``, dtype ``torch.long``.
        target: The prediction target for the scheduler's ``prediction_type``, shape ``(B, C, H, W)``.
    """

    noisy: Tensor
    noise: Tensor
    timesteps: Tensor
    target: Tensor


def add_noise(
    scheduler: SchedulerMixin,
    latents: Tensor,
    generator: torch.Generator | None = None,
    timesteps: Tensor | None = None,
) -> NoisedLatents:
    """Draws timesteps and noise, noises the latents and computes the matching target.

    Timesteps are drawn first (uniform over ``[0, num_train_timesteps)``), then the noise, both from
    ``generator``. A generator seeded from ``(seed, step)`` therefore makes each training or tuning step's
    randomness reproducible and independent of everything else that consumes the global RNG.

    Args:
        scheduler: A diffusers noise scheduler with ``config.num_train_timesteps``, ``add_noise`` and
            ``config.prediction_type``.
        latents: Clean latents ``z_0``, shape ``(B, C, H, W)`` (any float dtype, any device).
        generator: Source of randomness. It may live on the latents' device or on the CPU (then the draws are
            made on the CPU and moved, which keeps a CPU seed reproducible across devices). ``None`` uses the
            global RNG of the latents' device.
        timesteps: Optional fixed timesteps, shape ``(B,)`` or a scalar (broadcast to the batch); only the
            noise is drawn then. Values must lie in ``[0, num_train_timesteps)``.

    Returns:
        A :class:`NoisedLatents` whose tensors are on the latents' device; ``noisy``, ``noise`` and ``target``
        have the latents' dtype.

    Raises:
        ValueError: If ``timesteps`` has the wrong shape or lies outside ``[0, num_train_timesteps)``.
    """
    batch = latents.shape[0]
    num_train_timesteps = int(scheduler.config.num_train_timesteps)
    draw_device = generator.device if generator is not None else latents.device

    if timesteps is None:
        timesteps = torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=draw_device)
    else:
        timesteps = torch.as_tensor(timesteps, dtype=torch.long)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(batch)
        if timesteps.shape != (batch,):
            raise ValueError(
                f"timesteps must have shape ({batch},) or be a scalar, got {tuple(timesteps.shape)}"
            )
        if bool((timesteps < 0).any()) or bool((timesteps >= num_train_timesteps).any()):
            raise ValueError(f"timesteps must lie in [0, {num_train_timesteps}), got {timesteps.tolist()}")
    timesteps = timesteps.to(device=latents.device, dtype=torch.long)

    # Draw in float32 whatever the latents' dtype: the same seed then gives the same noise under bf16 autocast.
    noise = torch.randn(latents.shape, generator=generator, device=draw_device, dtype=torch.float32)
    noise = noise.to(device=latents.device, dtype=latents.dtype)

    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = diffusion_target(scheduler, latents, noise, timesteps)
    return NoisedLatents(noisy=noisy, noise=noise, timesteps=timesteps, target=target)


class DiffusionLoss(nn.Module):
    """Mean squared error between the UNet prediction and the diffusion target.

    The loss is computed in float32 (the prediction may come from a bf16 autocast forward) and averaged over
    all elements, as in diffusers' training scripts. It never raises on NaN/inf itself: the caller checks all
    terms at once with :func:`check_finite`, so one error names every bad term.
    """

    def forward(self, pred: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Computes the diffusion loss.

        Args:
            pred: UNet output, shape ``(B, C, H, W)``.
            target: Target from :func:`diffusion_target` / :func:`add_noise`, shape ``(B, C, H, W)``.

        Returns:
            ``{"loss/diffusion": mse}``, a float32 scalar.

        Raises:
            ValueError: If the shapes differ (broadcasting would silently compute the wrong loss).
        """
        if pred.shape != target.shape:
            raise ValueError(
                f"prediction and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}"
            )
        with full_precision(pred):
            mse = F.mse_loss(pred.float(), target.float(), reduction="mean")
        return {"loss/diffusion": mse}


def check_finite(losses: Mapping[str, Tensor | float]) -> None:
    """Raises on every rank if any loss term of any rank is NaN or infinite.

    One fused reduction over all terms, all-reduced across the data-parallel ranks (when a process group is up)
    and read once: a single host-device synchronisation per call. Every rank reaches the same verdict, so a NaN on
    one rank stops all of them with the same message, instead of the others waiting in the next collective until
    the timeout. The terms are inspected one by one only to build that message.

    Args:
        losses: Named loss terms, e.g. ``{"loss": ..., "loss/diffusion": ...}``; tensors of any shape or floats.

    Raises:
        FloatingPointError: Naming every term that holds a NaN or an inf, with its value (and, with several
            ranks, the rank it came from).
    """
    tensors = {name: torch.as_tensor(value) for name, value in losses.items()}
    if not tensors:
        return
    device = next(iter(tensors.values())).device
    values = torch.cat(
        [t.detach().reshape(-1).to(device=device, dtype=torch.float32) for t in tensors.values()]
    )
    world, rank = world_and_rank()
    bad = torch.zeros(world, device=device)
    bad[rank] = (~values.isfinite()).any().float()
    if world > 1:
        dist.all_reduce(bad)
    bad_ranks = [r for r, flag in enumerate(bad.tolist()) if flag]  # the one read
    if not bad_ranks:
        return
    terms = ", ".join(
        f"{name}={value.detach().float().cpu().flatten()[:4].tolist()}"
        for name, value in tensors.items()
        if not bool(value.detach().isfinite().all())
    )
    if world > 1:  # every rank reached this line: gather each bad rank's terms for one message
        parts: list[str] = [""] * world
        dist.all_gather_object(parts, terms)
        terms = "; ".join(f"rank {r}: {parts[r]}" for r in bad_ranks)
    raise FloatingPointError(f"non-finite loss term(s): {terms}")
