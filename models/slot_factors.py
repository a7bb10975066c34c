"""The LoRA factors A_l, B_l of several concepts tuned side by side: one copy per concept slot.

DATE's hypernetwork holds one pair of learned factors per target layer, ``dW_l = B_l · M_l(f) · A_l``, shared by
every concept it predicts (docs/method.md). Tuning a concept may move them too (``tune: [..., factors]``); with K
concepts in one batch (``lightning_modules/multi_concept.py``) each needs its own moved copy, or the concepts would
pull one pair of factors between them. :class:`SlotFactors` holds K copies, each started from the hypernetwork's
pretrained factors, and builds per-sample deltas (:class:`~models.attention.LoraDelta` with (B, r, in) and
(B, out, r) factors) in which every row reads its own concept's copy. The gradient reaching copy k comes from
concept k's rows alone, so each copy moves as the hypernetwork's factors move when that concept is tuned alone.
"""

from __future__ import annotations

import torch
from torch import nn

from models.attention import LoraDelta
from models.encoder import HyperNetwork


def _copies(factor: torch.Tensor, slots: int) -> nn.Parameter:
    """(slots, *factor.shape): a trainable copy of ``factor`` per slot."""
    return nn.Parameter(factor.detach().unsqueeze(0).repeat(slots, *([1] * factor.dim())))


class SlotFactors(nn.Module):
    """K copies of a hypernetwork's LoRA factors, one per concept slot.

    Args:
        hypernetwork: the encoder's hypernetwork; its factors are the copies' starting values (:meth:`reset`) and
            are left as they are.
        slots: K, the concepts tuned side by side.

    Attributes:
        down: per target, (K, r, in) copies of A_l.
        up: per target, (K, out, r) copies of B_l.
    """

    def __init__(self, hypernetwork: HyperNetwork, slots: int) -> None:
        super().__init__()
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.hypernetwork = [hypernetwork]  # a plain list: not a submodule, its weights are not ours
        self.names = list(hypernetwork.names)
        self.down = nn.ParameterList(_copies(a, slots) for a in hypernetwork.down)
        self.up = nn.ParameterList(_copies(b, slots) for b in hypernetwork.up)

    @property
    def slots(self) -> int:
        return self.down[0].shape[0]

    @torch.no_grad()
    def reset(self, slot: int) -> None:
        """Copy ``slot`` back to the hypernetwork's factors (a new concept starts from the pretrained ones)."""
        hyper = self.hypernetwork[0]
        for i in range(len(self.names)):
            self.down[i][slot].copy_(hyper.down[i])
            self.up[i][slot].copy_(hyper.up[i])

    def deltas(self, cores: torch.Tensor, slots: torch.Tensor) -> dict[str, LoraDelta]:
        """Per-sample deltas from (B, T, r, r) cores; row b reads the factors of concept slot ``slots[b]``."""
        slots = torch.as_tensor(slots, device=self.down[0].device)
        if slots.shape != (cores.shape[0],):
            raise ValueError(f"one slot per row: cores for {cores.shape[0]} rows, slots {tuple(slots.shape)}")
        return {
            n: LoraDelta(self.down[i][slots], cores[:, i], self.up[i][slots])
            for i, n in enumerate(self.names)
        }

    def static_lora(self, cores: torch.Tensor, slot: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Concept ``slot``'s deltas as plain LoRA factors ``name -> (M·A (r, in), B (out, r))``, as
        :meth:`HyperNetwork.static_lora` writes them from the shared factors.

        Args:
            cores: (T, r, r) cores of that concept.
        """
        return {
            n: (cores[i] @ self.down[i][slot].float(), self.up[i][slot].float())
            for i, n in enumerate(self.names)
        }
