"""Worker functions of the 2-process gloo tests, in a module that imports only torch and ``losses``: each spawned
process imports the module of its function, and the test modules import the whole Lightning stack."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from losses import check_finite


def nan_on_rank_one(rank: int, world: int, port: int, out: str) -> None:
    """Rank 1's loss is NaN; each rank writes the message it raised (or None) to ``out/rank<r>.txt``."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        value = float("nan") if rank == 1 else 0.5
        losses = {"loss": torch.tensor(value) + 1, "loss/diffusion": torch.tensor(value)}
        try:
            check_finite(losses)
            message = None
        except FloatingPointError as err:
            message = str(err)
        check_finite({"loss": torch.tensor(1.0)})  # the ranks are still in step: this collective returns
        Path(out, f"rank{rank}.txt").write_text(repr(message))
    finally:
        dist.destroy_process_group()
