"""The UNet encoder half as a feature extractor (E4T's second feature branch of the concept encoder)."""

from __future__ import annotations

import torch
from torch import nn


def unet_feature_dim(block_out_channels: tuple[int, ...], layers_per_block: int) -> int:
    """Width of the pooled UNet features: conv_in, every down-block residual, and the mid block."""
    channels = [block_out_channels[0]]  # conv_in
    for i, ch in enumerate(block_out_channels):
        channels += [ch] * layers_per_block
        if i < len(block_out_channels) - 1:
            channels.append(ch)  # downsampler
    return sum(channels) + block_out_channels[-1]


def pooled_unet_features(
    unet: nn.Module, sample: torch.Tensor, emb: torch.Tensor, context: torch.Tensor
) -> torch.Tensor:
    """Global-average-pooled features of the UNet's down blocks and mid block on z_t (E4T).

    Uses the UNet's public sub-modules (conv_in, down blocks, mid block) so the up half is never run. Installed
    dual-path processors see no personalization here and act as plain attention.

    Args:
        unet: a diffusers ``UNet2DConditionModel``.
        sample: (B, C, h, w) z_t in the UNet's dtype.
        emb: (B, E) the time (and, for SDXL, added-condition) embedding its ResNets read.
        context: (B, L, D) text context (the empty prompt) in the UNet's dtype.

    Returns:
        (B, U) float32, U = :func:`unet_feature_dim` (10,880 for SD 1.x).
    """
    sample = unet.conv_in(sample)
    pooled = [sample.mean(dim=(2, 3))]
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            sample, residuals = block(hidden_states=sample, temb=emb, encoder_hidden_states=context)
        else:
            sample, residuals = block(hidden_states=sample, temb=emb)
        pooled += [r.mean(dim=(2, 3)) for r in residuals]
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            sample = unet.mid_block(sample, emb, encoder_hidden_states=context)
        else:
            sample = unet.mid_block(sample, emb)
        pooled.append(sample.mean(dim=(2, 3)))
    return torch.cat(pooled, dim=1).float()
