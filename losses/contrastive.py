"""Nearest-neighbour contrastive regularisation of the predicted word embedding v* (DATE, "Losses").

The paper pulls v* toward its nearest existing CLIP token embedding(s) and pushes it away from the other
concepts in the batch, so that S* stays a "semantic" word that the vanilla path and prompt composition can
work with. The nearest-neighbour lookup is non-differentiable (a FAISS / brute-force search over the text
encoder's input-embedding table, :func:`gather_neighbours`); gradients reach v* through the cosine
similarities to the gathered, frozen neighbour embeddings.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NearestNeighbourContrastiveLoss", "NeighbourIndex", "NeighbourSearchResult", "gather_neighbours"]


class NeighbourSearchResult(Protocol):
    """What a nearest-neighbour index returns (duck-typed; ``models.token_index`` provides one)."""

    ids: Tensor  # (B, k) vocabulary ids, torch.long


class NeighbourIndex(Protocol):
    """Any object with ``search(queries (B, D), k) -> result with .ids (B, k)``, e.g. ``TokenIndex``."""

    def search(self, queries: Tensor, k: int) -> NeighbourSearchResult:  # pragma: no cover - protocol
        ...


def gather_neighbours(
    index: NeighbourIndex, embedding_table: Tensor, v_star: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Finds the k nearest vocabulary tokens of each v* and gathers their (frozen) embeddings.

    Args:
        index: Nearest-neighbour index over the vocabulary; ``index.search(v_star.detach(), k).ids`` must be a
            ``(B, k)`` integer tensor of vocabulary ids (which tokens it excludes, e.g. special tokens and the
            placeholder, is the index's business).
        embedding_table: The text encoder's input-embedding table, shape ``(V, D)``.
        v_star: Predicted word embeddings, shape ``(B, D)``. Only used as (detached) queries.
        k: Number of neighbours per concept, ``k >= 1``.

    Returns:
        ``(neighbours, ids)``: ``neighbours`` of shape ``(B, k, D)``, detached, on ``v_star``'s device, in the
        table's dtype; ``ids`` of shape ``(B, k)``, ``torch.long``, on ``v_star``'s device.

    Raises:
        ValueError: If ``k < 1``, the shapes disagree, or the index returns ids of the wrong shape or range.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if v_star.ndim != 2 or embedding_table.ndim != 2 or v_star.shape[1] != embedding_table.shape[1]:
        raise ValueError(
            f"expected v_star (B, D) and embedding_table (V, D), got {tuple(v_star.shape)} "
            f"and {tuple(embedding_table.shape)}"
        )
    ids = torch.as_tensor(index.search(v_star.detach(), k).ids)
    if ids.shape != (v_star.shape[0], k):
        raise ValueError(f"index returned ids of shape {tuple(ids.shape)}, expected ({v_star.shape[0]}, {k})")
    ids = ids.to(device=embedding_table.device, dtype=torch.long)
    if bool((ids < 0).any()) or bool((ids >= embedding_table.shape[0]).any()):
        # FAISS pads with -1 when it finds fewer than k results; indexing with -1 would silently wrap around.
        raise ValueError(f"index returned ids outside [0, {embedding_table.shape[0]}): {ids.tolist()}")
    # Detach: the neighbours are fixed anchors; the table is frozen and must not collect gradients.
    neighbours = embedding_table.detach()[ids]
    return neighbours.to(v_star.device), ids.to(v_star.device)


class NearestNeighbourContrastiveLoss(nn.Module):
    r"""Multi-positive InfoNCE between each v* and its nearest vocabulary tokens.

    Let ``B`` be the number of concepts, ``k`` the neighbours per concept, ``v_i = v*_i / ||v*_i||`` and
    ``n_ip = neighbour_ip / ||neighbour_ip||`` (``p = 1..k``), and ``s(a, b) = <a, b> / temperature``
    (cosine similarity over the temperature). For anchor ``v_i``:

    * positives ``P_i = { n_ip : p = 1..k }`` (its own neighbours), with logits ``s_ip = s(v_i, n_ip)``;
    * negatives ``N_i = { v_j : j != i } ∪ { n_jq : j != i, q = 1..k }`` (the other concepts and all their
      neighbours), with logits ``s_in``.

    Then::

        L_i = -(1/k) * sum_p log( exp(s_ip) / (exp(s_ip) + sum_{n in N_i} exp(s_in)) )
        L   = (1/B) * sum_i L_i

    Each positive is contrasted against the negatives only (not against the other positives), so k > 1
    neighbours do not compete with each other. Computed with ``logaddexp`` / ``logsumexp`` for stability, in
    float32 at least (float64 stays float64).

    Gradients: the neighbours are detached inside ``forward`` (frozen anchors); gradients reach v* both as an
    anchor and as a negative of the other anchors, which is what pushes concepts apart.

    False negatives: if two concepts share a neighbour token (two dogs in one batch), that token is both a
    positive of ``i`` and a negative via ``j``. Pass ``neighbour_ids`` to drop negative neighbours whose
    vocabulary id is among the anchor's own positive ids; other concepts' v* always stay negatives.

    Args:
        temperature: Softmax temperature (paper default 0.07).
        weight: lambda_nn, the factor of the ``"loss/nn_contrastive_weighted"`` term (default 0.01).
    """

    def __init__(self, temperature: float = 0.07, weight: float = 0.01) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        self.temperature = float(temperature)
        self.weight = float(weight)

    def forward(
        self, v_star: Tensor, neighbours: Tensor, neighbour_ids: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Computes the contrastive loss.

        Args:
            v_star: Predicted word embeddings, shape ``(B, D)``, ``B >= 2``.
            neighbours: Embeddings of each concept's nearest tokens, shape ``(B, k, D)``; detached here.
            neighbour_ids: Optional vocabulary ids of the neighbours, shape ``(B, k)``; when given, negatives
                that are the same token as one of the anchor's positives are masked out.

        Returns:
            ``{"loss/nn_contrastive": L, "loss/nn_contrastive_weighted": weight * L}``, scalars.

        Raises:
            ValueError: If ``B < 2`` (no negatives) or the shapes disagree.
        """
        if v_star.ndim != 2 or neighbours.ndim != 3:
            raise ValueError(
                f"expected v_star (B, D) and neighbours (B, k, D), got {tuple(v_star.shape)} "
                f"and {tuple(neighbours.shape)}"
            )
        batch, dim = v_star.shape
        if batch < 2:
            raise ValueError(
                "the nearest-neighbour contrastive loss needs >= 2 concepts per batch (its negatives are the "
                f"other concepts), got batch size {batch}"
            )
        if neighbours.shape[0] != batch or neighbours.shape[2] != dim or neighbours.shape[1] < 1:
            raise ValueError(
                f"neighbours shape {tuple(neighbours.shape)} does not match v_star ({batch}, {dim})"
            )
        k = neighbours.shape[1]
        if neighbour_ids is not None and neighbour_ids.shape != (batch, k):
            raise ValueError(f"neighbour_ids shape {tuple(neighbour_ids.shape)} != ({batch}, {k})")

        dtype = torch.promote_types(v_star.dtype, torch.float32)
        anchors = F.normalize(v_star.to(dtype), dim=-1)  # (B, D)
        positives = F.normalize(
            neighbours.detach().to(device=v_star.device, dtype=dtype), dim=-1
        )  # (B, k, D)

        # Positive logits s_ip: (B, k).
        pos_logits = torch.einsum("bd,bkd->bk", anchors, positives) / self.temperature

        # Negative logits against every v*_j and every neighbour n_jq: (B, B) and (B, B, k).
        neg_v = anchors @ anchors.T / self.temperature
        neg_n = torch.einsum("id,jqd->ijq", anchors, positives) / self.temperature

        other = ~torch.eye(batch, dtype=torch.bool, device=v_star.device)  # j != i
        mask_n = other[:, :, None].expand(batch, batch, k)
        if neighbour_ids is not None:
            ids = neighbour_ids.to(v_star.device)
            # same[i, j, q]: token n_jq is one of anchor i's positive tokens -> a false negative.
            same = (ids[None, :, :, None] == ids[:, None, None, :]).any(dim=-1)
            mask_n = mask_n & ~same
        neg_inf = torch.finfo(dtype).min
        neg_all = torch.cat(
            [
                neg_v.masked_fill(~other, neg_inf),
                neg_n.masked_fill(~mask_n, neg_inf).reshape(batch, batch * k),
            ],
            dim=1,
        )  # (B, B + B*k); masked entries contribute exp(-inf) = 0
        neg_lse = torch.logsumexp(
            neg_all, dim=1, keepdim=True
        )  # (B, 1), finite: v*_j (j != i) is never masked

        # log( exp(s_ip) / (exp(s_ip) + sum_n exp(s_in)) ) for every positive.
        log_prob = pos_logits - torch.logaddexp(pos_logits, neg_lse)  # (B, k)
        loss = -log_prob.mean(dim=1).mean()
        return {"loss/nn_contrastive": loss, "loss/nn_contrastive_weighted": self.weight * loss}
