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

from losses.distributed import gather_rows, world_and_rank
from losses.precision import full_precision, loss_dtype

__all__ = [
    "NearestNeighbourContrastiveLoss",
    "NeighbourIndex",
    "NeighbourSearchResult",
    "gather_neighbours",
    "nearest_pull",
]


class NeighbourSearchResult(Protocol):
    """What a nearest-neighbour index returns (duck-typed; ``models.token_index`` provides one)."""

    ids: Tensor  # (B, k) vocabulary ids, torch.long


class NeighbourIndex(Protocol):
    """Any object with ``search(queries (B, D), k) -> result with .ids (B, k)``, e.g. ``TokenIndex``."""

    def search(self, queries: Tensor, k: int) -> NeighbourSearchResult:  # pragma: no cover - protocol
        ...

    # Optional: ``ids_in_range = True`` when every id returned is a valid row (no -1 padding), which spares
    # :func:`gather_neighbours` a host-device read of the ids.


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
    # A diverged row searches as zeros: its NaN reaches the loss, whose finite check stops every rank at once
    # (an index raising here would stop this rank alone).
    ids = torch.as_tensor(index.search(v_star.detach().nan_to_num(0.0, 0.0, 0.0), k).ids)
    if ids.shape != (v_star.shape[0], k):
        raise ValueError(f"index returned ids of shape {tuple(ids.shape)}, expected ({v_star.shape[0]}, {k})")
    ids = ids.to(device=embedding_table.device, dtype=torch.long)
    # An index that guarantees its ids (``ids_in_range``, e.g. ``TokenIndex``) spares the check's device read.
    if not getattr(index, "ids_in_range", False) and bool(
        ((ids < 0) | (ids >= embedding_table.shape[0])).any()
    ):
        # FAISS pads with -1 when it finds fewer than k results; indexing with -1 would silently wrap around.
        raise ValueError(f"index returned ids outside [0, {embedding_table.shape[0]}): {ids.tolist()}")
    # Detach: the neighbours are fixed anchors; the table is frozen and must not collect gradients.
    neighbours = embedding_table.detach()[ids]
    return neighbours.to(v_star.device), ids.to(v_star.device)


def nearest_pull(v_star: Tensor, neighbours: Tensor) -> Tensor:
    """``1 - mean cos(v*_i, n_ip)``: the regulariser when the batch holds one concept (no negatives exist).

    Args:
        v_star: (B, D) word embeddings.
        neighbours: (B, k, D) their nearest tokens; detached here.

    Returns:
        A float32 (or float64) scalar, computed with autocast disabled.
    """
    dtype = loss_dtype(v_star)
    with full_precision(v_star):
        n = neighbours.detach().to(device=v_star.device, dtype=dtype)
        return 1 - F.cosine_similarity(v_star.to(dtype).unsqueeze(1), n, dim=-1).mean()


class NearestNeighbourContrastiveLoss(nn.Module):
    r"""Multi-positive InfoNCE between each v* and its nearest vocabulary tokens.

    Let ``N`` be the number of rows of the (global) batch, ``c_i`` the concept id of row ``i``, ``k`` the
    neighbours per row, ``v_i = v*_i / ||v*_i||`` and ``n_ip = neighbour_ip / ||neighbour_ip||``
    (``p = 1..k``), and ``s(a, b) = <a, b> / temperature``. For anchor ``v_i``:

    * positives ``P_i = { n_ip : p = 1..k }`` (its own neighbours), with logits ``s_ip = s(v_i, n_ip)``;
    * negatives ``N_i = { v_j : c_j != c_i } ∪ { n_jq : c_j != c_i, q = 1..k }`` (the rows of the *other
      concepts* and all their neighbours: two augmentations of one concept in a batch are not pushed apart),
      with logits ``s_in``.

    Then::

        L_i = -(1/k) * sum_p log( exp(s_ip) / (exp(s_ip) + sum_{n in N_i} exp(s_in)) )
        L   = mean_i L_i   over this rank's anchors

    Each positive is contrasted against the negatives only (not against the other positives), so k > 1
    neighbours do not compete with each other. Computed with ``logaddexp`` / ``logsumexp``, with autocast
    disabled, in float32 (float64 inputs stay float64): under bf16 autocast the logits would be bf16 and the
    masking constant would overflow.

    Distributed (DDP/FSDP, ``gather_distributed=True``): the negatives are the rows of *every* rank. v* rows
    are all-gathered with gradient (``torch.distributed.nn.functional.all_gather``), so a local row also gets
    the gradient of being a negative of remote anchors; neighbours and ids are gathered without gradient
    (they are frozen). The anchors stay local and each rank averages over its own rows, so the mean over ranks
    (what DDP's gradient averaging optimises) equals the loss of one process holding the whole batch.

    Gradients: the neighbours are detached inside ``forward`` (frozen anchors); gradients reach v* both as an
    anchor and as a negative of the other anchors, which is what pushes concepts apart.

    False negatives: if two concepts share a neighbour token (two dogs in one batch), that token is both a
    positive of ``i`` and a negative via ``j``. Pass ``neighbour_ids`` to drop negative neighbours whose
    vocabulary id is among the anchor's own positive ids; other concepts' v* always stay negatives.

    Negatives from earlier batches (``queue_size > 0``, MoCo-style): with one concept per batch (batch 1 with
    gradient accumulation) there are no other rows to contrast with. The queue keeps the last ``queue_size``
    rows of earlier batches (all ranks'; normalised, detached, with their neighbours, ids and concept ids: a
    buffer, so checkpoints hold it and resuming is exact) and adds them to every anchor's negatives. They push the
    anchors away but receive no gradient themselves, unlike in-batch negatives; :meth:`remember` fills it.

    Args:
        temperature: Softmax temperature (paper default 0.07).
        weight: lambda_nn, the factor of the ``"loss/nn_contrastive_weighted"`` term (default 0.01).
        gather_distributed: Gather the negatives across ranks when a process group is initialised.
        queue_size: rows of earlier batches kept as extra negatives (0: none).
        dim: width D of v* (needed with a queue).
        k: neighbours per row (needed with a queue).
    """

    def __init__(
        self,
        temperature: float = 0.07,
        weight: float = 0.01,
        gather_distributed: bool = True,
        queue_size: int = 0,
        dim: int = 0,
        k: int = 1,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        if queue_size < 0 or (queue_size and dim < 1):
            raise ValueError(f"queue_size must be >= 0 (and needs dim), got {queue_size} (dim {dim})")
        self.temperature = float(temperature)
        self.weight = float(weight)
        self.gather_distributed = gather_distributed
        self.queue_size = queue_size
        if queue_size:  # concept id -1 marks an empty slot: never a negative
            self.register_buffer("queue_v", torch.zeros(queue_size, dim))
            self.register_buffer("queue_n", torch.zeros(queue_size, k, dim))
            self.register_buffer("queue_ids", torch.zeros(queue_size, k, dtype=torch.long))
            self.register_buffer("queue_concepts", torch.full((queue_size,), -1, dtype=torch.long))
            self.register_buffer("queue_next", torch.zeros((), dtype=torch.long))

    def _rows(self, v_star: Tensor, neighbours: Tensor, neighbour_ids: Tensor | None, cids: Tensor):
        """This batch's normalised rows of every rank, then the queue's: (v (N, D), n (N, k, D), ids, concepts)."""
        gather = self.gather_distributed and world_and_rank()[0] > 1
        v = F.normalize(v_star.to(loss_dtype(v_star)), dim=-1)
        n = F.normalize(neighbours.detach().to(device=v.device, dtype=v.dtype), dim=-1)
        ids = neighbour_ids.to(v.device) if neighbour_ids is not None else None
        if gather:
            v, n, cids = gather_rows(v, with_grad=True), gather_rows(n), gather_rows(cids)
            ids = gather_rows(ids) if ids is not None else None
        if not self.queue_size:
            return v, n, ids, cids
        ids = ids if ids is not None else torch.full(n.shape[:2], -1, dtype=torch.long, device=v.device)
        return (
            torch.cat([v, self.queue_v.to(v.dtype)]),
            torch.cat([n, self.queue_n.to(n.dtype)]),
            torch.cat([ids, self.queue_ids]),
            torch.cat([cids, self.queue_concepts]),
        )

    def has_negatives(self, concept_ids: Tensor) -> bool:
        """Whether some row of the global batch or of the queue belongs to another concept than some row here."""
        ids = gather_rows(concept_ids) if self.gather_distributed else concept_ids
        if self.queue_size:
            ids = torch.cat([ids, self.queue_concepts[self.queue_concepts >= 0]])
        return int(ids.unique().numel()) >= 2

    @torch.no_grad()
    def remember(
        self, v_star: Tensor, neighbours: Tensor, neighbour_ids: Tensor | None, concept_ids: Tensor
    ) -> None:
        """Writes this batch's rows (every rank's) over the queue's oldest; no-op without a queue."""
        if not self.queue_size:
            return
        with full_precision(v_star):
            v, n, ids, cids = self._rows(
                v_star.detach(), neighbours, neighbour_ids, concept_ids.to(v_star.device)
            )
        rows = min(
            len(concept_ids) * (world_and_rank()[0] if self.gather_distributed else 1), self.queue_size
        )
        slots = (self.queue_next + torch.arange(rows, device=v.device)) % self.queue_size
        self.queue_v[slots] = v[:rows].to(self.queue_v.dtype)
        self.queue_n[slots] = n[:rows].to(self.queue_n.dtype)
        self.queue_ids[slots] = ids[:rows]
        self.queue_concepts[slots] = cids[:rows]
        self.queue_next.copy_((self.queue_next + rows) % self.queue_size)

    def forward(
        self,
        v_star: Tensor,
        neighbours: Tensor,
        neighbour_ids: Tensor | None = None,
        concept_ids: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Computes the contrastive loss.

        Args:
            v_star: Predicted word embeddings of this rank's rows, shape ``(B, D)``.
            neighbours: Embeddings of each row's nearest tokens, shape ``(B, k, D)``; detached here.
            neighbour_ids: Optional vocabulary ids of the neighbours, shape ``(B, k)``; when given, negatives
                that are the same token as one of the anchor's positives are masked out.
            concept_ids: Optional concept id of each row, shape ``(B,)`` (the batch's ``concept_id``); rows of
                the same concept are not negatives of each other. None: every row is its own concept.

        Returns:
            ``{"loss/nn_contrastive": L, "loss/nn_contrastive_weighted": weight * L}``, scalars.

        Raises:
            ValueError: If the (global) batch has fewer than 2 rows or 2 concepts, or the shapes disagree.
        """
        if v_star.ndim != 2 or neighbours.ndim != 3:
            raise ValueError(
                f"expected v_star (B, D) and neighbours (B, k, D), got {tuple(v_star.shape)} "
                f"and {tuple(neighbours.shape)}"
            )
        batch, dim = v_star.shape
        if neighbours.shape[0] != batch or neighbours.shape[2] != dim or neighbours.shape[1] < 1:
            raise ValueError(
                f"neighbours shape {tuple(neighbours.shape)} does not match v_star ({batch}, {dim})"
            )
        k = neighbours.shape[1]
        if neighbour_ids is not None and neighbour_ids.shape != (batch, k):
            raise ValueError(f"neighbour_ids shape {tuple(neighbour_ids.shape)} != ({batch}, {k})")
        if concept_ids is not None and tuple(concept_ids.shape) != (batch,):
            raise ValueError(f"concept_ids shape {tuple(concept_ids.shape)} != ({batch},)")
        world, rank = world_and_rank() if self.gather_distributed else (1, 0)
        if batch * world < 2 and not self.queue_size:
            raise ValueError(
                "the nearest-neighbour contrastive loss needs >= 2 concepts per batch (its negatives are the "
                f"other concepts), got batch size {batch * world}"
            )
        device = v_star.device
        rows = torch.arange(batch, device=device) + rank * batch  # global row index of each anchor
        cids = rows if concept_ids is None else concept_ids.to(device=device, dtype=torch.long)

        dtype = loss_dtype(v_star)
        with full_precision(v_star):
            anchors = F.normalize(v_star.to(dtype), dim=-1)  # (B, D)
            positives = F.normalize(neighbours.detach().to(device=device, dtype=dtype), dim=-1)  # (B, k, D)
            # (N, D), (N, k, D), ids, concepts: N = W * B rows of every rank, then the queue's rows
            all_v, all_n, all_ids, all_c = self._rows(v_star, neighbours, neighbour_ids, cids)
            total = all_v.shape[0]

            # Positive logits s_ip: (B, k).
            pos_logits = torch.einsum("bd,bkd->bk", anchors, positives) / self.temperature
            # Negative logits against every v*_j and every neighbour n_jq: (B, N) and (B, N, k).
            neg_v = anchors @ all_v.T / self.temperature
            neg_n = torch.einsum("id,jqd->ijq", anchors, all_n) / self.temperature

            # (B, N): row j belongs to another concept (an empty queue slot, concept -1, to none)
            other = (cids[:, None] != all_c[None, :]) & (all_c[None, :] >= 0)
            if not bool(other.any(dim=1).all()):
                raise ValueError(
                    "the nearest-neighbour contrastive loss needs >= 2 concepts per batch (its negatives are "
                    f"the other concepts), got {int(all_c.unique().numel())} distinct concept(s) in {total} rows"
                )
            mask_n = other[:, :, None].expand(batch, total, k)
            if all_ids is not None:
                ids = all_ids[rows]  # this rank's anchors' positive ids, (B, k)
                # same[i, j, q]: token n_jq is one of anchor i's positive tokens -> a false negative.
                same = (all_ids[None, :, :, None] == ids[:, None, None, :]).any(dim=-1)
                mask_n = mask_n & ~same
            neg_inf = torch.finfo(dtype).min
            neg_all = torch.cat(
                [neg_v.masked_fill(~other, neg_inf), neg_n.masked_fill(~mask_n, neg_inf).reshape(batch, -1)],
                dim=1,
            )  # (B, N + N*k); masked entries contribute exp(-inf) = 0
            # (B, 1), finite: every anchor has at least one other-concept v*_j (checked above).
            neg_lse = torch.logsumexp(neg_all, dim=1, keepdim=True)

            # log( exp(s_ip) / (exp(s_ip) + sum_n exp(s_in)) ) for every positive.
            log_prob = pos_logits - torch.logaddexp(pos_logits, neg_lse)  # (B, k)
            loss = -log_prob.mean(dim=1).mean()
        return {"loss/nn_contrastive": loss, "loss/nn_contrastive_weighted": self.weight * loss}
