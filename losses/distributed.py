"""Gathering a loss's batch rows across data-parallel ranks (DDP / FSDP process groups).

Used by the contrastive loss so that every rank contrasts its anchors against the negatives of the whole global
batch: with ``W`` ranks of ``B`` rows each, the loss and the DDP-averaged gradients equal those of one process
holding the ``W * B`` rows (tested with 2 gloo processes in ``tests/test_precision.py``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_and_rank() -> tuple[int, int]:
    """``(world_size, rank)`` of the default process group, ``(1, 0)`` when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_rows(x: Tensor, with_grad: bool = False) -> Tensor:
    """Concatenates ``x`` (B, ...) of every rank along dim 0, rank-major: ``(W * B, ...)``.

    Every rank must pass the same shape (the samplers pad each rank to the same number of items).

    Args:
        x: This rank's rows.
        with_grad: Keep the autograd graph: ``torch.distributed.nn.functional.all_gather`` sends each rank's
            gradient of the gathered rows back to the rank that owns them (summed), so the push that a remote
            anchor exerts on a local row still reaches the local parameters. Without it the result is detached
            (fine for frozen neighbours and ids).

    Returns:
        ``x`` itself with one process; otherwise the gathered rows.
    """
    world, _ = world_and_rank()
    if world == 1:
        return x
    if with_grad:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x.contiguous()), dim=0)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)
