"""SDXL's nearest-token lookup: one :class:`~models.token_index.TokenIndex` over both token tables, cosine per table.

SDXL has two text encoders, so v* has two parts (768 + 1280 wide); each part is normalised on its own and the
search scores ``cos_l + cos_g`` (:mod:`models.backbone_sdxl` says why both vote with equal weight).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.token_index import TokenIndex, TokenSearchResult


def normalise_halves(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """(..., sum(dims)) float32 rows whose parts of widths ``dims`` are each unit-normalised, concatenated."""
    parts = torch.split(x.float(), list(dims), dim=-1)
    return torch.cat([F.normalize(p, dim=-1) for p in parts], dim=-1)


class SplitCosineTokenIndex:
    """A :class:`TokenIndex` over SDXL's two token tables whose similarity is ``cos_l + cos_g``.

    The wrapped index holds the unit-normalised halves of every token, concatenated (:func:`normalise_halves`);
    queries are mapped the same way, so the inner product is ``cos_l + cos_g``: the two text encoders vote with
    equal weight (:mod:`models.backbone_sdxl` says why). Search returns vocabulary ids, token strings and the mean
    cosine ``(cos_l + cos_g) / 2``.

    Args:
        index: the index over the normalised, concatenated tables.
        dims: the width of each table (SDXL: 768, 1280).
    """

    ids_in_range = True

    def __init__(self, index: TokenIndex, dims: tuple[int, ...]) -> None:
        self.index = index
        self.dims = dims

    def __len__(self) -> int:
        return len(self.index)

    def search(self, queries: Tensor, k: int = 1) -> TokenSearchResult:
        """Finds the k tokens with the highest ``cos_l + cos_g`` for each (Q, D_l + D_g) query."""
        return self.index.search(normalise_halves(queries.detach(), self.dims), k)
