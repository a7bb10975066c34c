"""Callbacks: a plain-text summary of the loss curve at the end of a run."""

from __future__ import annotations

import math

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info


class LossSummary(Callback):
    """Prints the mean training loss of the first and last ``window`` steps when fit ends.

    Args:
        window: number of steps averaged at each end of the run.
        key: the logged metric to follow.
    """

    def __init__(self, window: int = 10, key: str = "train/loss") -> None:
        self.window = window
        self.key = key
        self.values: list[float] = []

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx
    ) -> None:
        value = trainer.callback_metrics.get(self.key)
        if value is not None:
            self.values.append(float(value))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.values:
            return
        n = min(self.window, max(len(self.values) // 2, 1))
        first = sum(self.values[:n]) / n
        last = sum(self.values[-n:]) / n
        change = (last - first) / first * 100 if first and math.isfinite(first) else float("nan")
        rank_zero_info(
            f"{self.key}: mean of first {n} steps {first:.4f} -> mean of last {n} steps {last:.4f} "
            f"({change:+.1f} %, {len(self.values)} steps)"
        )
