"""SDXL's token table ``[E_l | E_g]`` as a view, so a training step gathers the rows it needs instead of
concatenating both full tables (49,408 x 2,048 on SDXL) at every step."""

from __future__ import annotations

import torch


class ConcatenatedTable:
    """The (V, D_l + D_g) table ``[E_l | E_g]`` as a view: indexing gathers the asked rows of both tables.

    What the training step needs from the table (``losses.gather_neighbours``, the hard prompt's rows) without
    concatenating the full 49,408 x 2,048 table at every step: ``shape``, ``ndim``, ``device``, ``dtype``,
    ``detach()`` and ``table[ids]`` (the rows ``(..., D_l + D_g)``, in ``E_l``'s dtype) behave as on the tensor.
    """

    ndim = 2

    def __init__(self, first: torch.Tensor, second: torch.Tensor) -> None:
        self.first, self.second = first, second
        self.shape = torch.Size((first.shape[0], first.shape[1] + second.shape[1]))
        self.device, self.dtype = first.device, first.dtype

    def detach(self) -> ConcatenatedTable:
        return ConcatenatedTable(self.first.detach(), self.second.detach())

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.first[ids], self.second[ids].to(self.dtype)], dim=-1)
