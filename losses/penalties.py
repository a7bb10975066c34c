"""Optional L2 penalties on the predicted token embedding and the predicted LoRA cores (docs/method.md, default).

Both are off by default in the sense that ``weight=0`` returns an exact constant zero (no graph, no NaN even if
the inputs hold inf), so a config can keep the modules wired in and switch them on by weight alone.
The returned values are already weighted: add them to the total as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from losses.precision import full_precision

__all__ = ["CorePenalty", "EmbeddingNormPenalty"]


class EmbeddingNormPenalty(nn.Module):
    """Keeps ||v*|| near the norm of real token embeddings: ``weight * mean_b (||v*_b|| - target_norm)^2``.

    Why: a word embedding far off the vocabulary's norm dominates (or vanishes in) the text encoder's
    attention; the token embedder already rescales v* at prediction time, but inference-time tuning
    optimises v* directly and can drift.

    Args:
        target_norm: Desired L2 norm, typically the mean norm of the text encoder's token embeddings.
        weight: Penalty factor; ``0`` disables the penalty (exact zero).
    """

    def __init__(self, target_norm: float, weight: float) -> None:
        super().__init__()
        if target_norm < 0:
            raise ValueError(f"target_norm must be >= 0, got {target_norm}")
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        self.target_norm = float(target_norm)
        self.weight = float(weight)

    def forward(self, v_star: Tensor) -> dict[str, Tensor]:
        """Computes the weighted norm penalty.

        Args:
            v_star: Word embeddings, shape ``(B, D)``.

        Returns:
            ``{"loss/norm_penalty": value}``, a float32 (or float64) scalar, already multiplied by ``weight``.
        """
        dtype = torch.promote_types(v_star.dtype, torch.float32)
        if self.weight == 0.0:
            return {"loss/norm_penalty": torch.zeros((), device=v_star.device, dtype=dtype)}
        with full_precision(v_star):
            norms = torch.linalg.vector_norm(v_star.to(dtype), dim=-1)  # (B,)
            return {"loss/norm_penalty": self.weight * (norms - self.target_norm).pow(2).mean()}


class CorePenalty(nn.Module):
    """Keeps the predicted LoRA cores small: ``weight * mean_l mean(M_l^2)``.

    Each layer's core contributes the mean of its squared entries, then layers are averaged, so the value does
    not grow with the number of adapted layers or the rank. Why: the cores start at zero (the untrained model
    is the base model); the penalty keeps the weight offsets dW = B M A a small perturbation of the UNet.

    Args:
        weight: Penalty factor; ``0`` disables the penalty (exact zero).
    """

    def __init__(self, weight: float) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        self.weight = float(weight)

    def forward(self, cores: Mapping[str, Tensor] | Sequence[Tensor]) -> dict[str, Tensor]:
        """Computes the weighted core penalty.

        Args:
            cores: Per-layer cores ``M_l``, each of shape ``(B, r, r)``, as a name-keyed mapping or a sequence.

        Returns:
            ``{"loss/core_penalty": value}``, a float32 (or float64) scalar, already multiplied by ``weight``.

        Raises:
            ValueError: If ``cores`` is empty while the penalty is enabled.
        """
        tensors = list(cores.values()) if isinstance(cores, Mapping) else list(cores)
        device = tensors[0].device if tensors else torch.device("cpu")
        dtype = torch.promote_types(tensors[0].dtype, torch.float32) if tensors else torch.float32
        if self.weight == 0.0:
            return {"loss/core_penalty": torch.zeros((), device=device, dtype=dtype)}
        if not tensors:
            raise ValueError("CorePenalty got no cores but its weight is > 0")
        with full_precision(tensors[0]):
            per_layer = torch.stack([m.to(dtype).pow(2).mean() for m in tensors])  # (L,)
            return {"loss/core_penalty": self.weight * per_layer.mean()}
