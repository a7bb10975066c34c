"""Callbacks: a plain-text summary of the loss curve at the end of a run; a guard against diverging runs."""

from __future__ import annotations

import math

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from models.errors import NonFiniteError


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


class FiniteGuard(Callback):
    """Stops a diverging run with one line naming the step and the loss terms, before NaN reaches anything else.

    After every step the trained weights are checked (a learning rate that is far too high makes them NaN or
    infinite; the next step would feed them to the nearest-token index), and a non-finite loss term raised by
    the loss itself (``FloatingPointError``) gets the step added to its message; ``train.py`` reports both as
    one line. :class:`~lightning_modules.cli.TuningEncoderCLI` adds it to every run.
    """

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx
    ) -> None:
        params = [(n, p.detach()) for n, p in pl_module.named_parameters() if p.requires_grad]
        # One fused reduction (the largest |value| of each tensor: NaN or inf exactly when the tensor holds one)
        # and one device synchronisation per step; everything else only on failure.
        if not params or bool(
            torch.stack(torch._foreach_norm([p for _, p in params], float("inf"))).isfinite().all()
        ):
            return
        bad = [n for n, p in params if not bool(p.isfinite().all())]
        if bad:
            logged = trainer.callback_metrics.items()
            terms = {k: float(v) for k, v in logged if k.startswith("train/loss") and v.numel() == 1}
            terms = ", ".join(f"{k}={v:.4g}" for k, v in sorted(terms.items())) or "not logged"
            raise NonFiniteError(
                f"training diverged at step {trainer.global_step}: {len(bad)} trained tensor(s) became NaN or "
                f"infinite ({bad[0]}, ...) after the update; loss terms of that step: {terms}. "
                "Lower the learning rate (--model.init_args.optimizer.init_args.lr)"
            )

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # The loss's own check (losses.check_finite) and the token index raise without the step: add it to the
        # message (the exception itself propagates, after Lightning's teardown).
        if isinstance(exception, FloatingPointError) and "diverged at step" not in str(exception):
            exception.args = (
                f"training diverged at step {trainer.global_step}: {exception}. "
                "Lower the learning rate (--model.init_args.optimizer.init_args.lr)",
            )
