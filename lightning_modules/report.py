"""What a run shows: one progress bar over its optimizer steps, named after what it trains, and where its files
are when it ends."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm


class StepProgressBar(ProgressBar):
    """A single bar from step 0 to ``max_steps`` (Lightning's own bar counts epochs, which a few-step tuning
    run does not have: it reads ``Epoch 0/-2``), with the latest loss.

    Args:
        description: the bar's label; None = ``tune <concept name>`` when the datamodule names a concept,
            else ``train``.
        metric: the logged value shown next to the bar.
    """

    def __init__(self, description: str | None = None, metric: str = "train/loss") -> None:
        super().__init__()
        self.description = description
        self.metric = metric
        self.enabled = True
        self.bar: tqdm | None = None

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def total_steps(self, trainer: Trainer) -> int:
        """The run's optimizer steps: ``max_steps`` when set, else Lightning's estimate from the epochs."""
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return int(trainer.max_steps)
        return int(trainer.estimated_stepping_batches)

    def label(self, trainer: Trainer) -> str:
        if self.description is not None:
            return self.description
        concept = getattr(trainer.datamodule, "concept_name", None) if trainer.datamodule else None
        return f"tune {concept}" if concept else "train"

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.bar = tqdm(
            total=self.total_steps(trainer),
            initial=trainer.global_step,
            desc=self.label(trainer),
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not self.enabled or not trainer.is_global_zero,
        )

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.bar is None:
            return
        value = trainer.callback_metrics.get(self.metric)
        if value is not None:
            self.bar.set_postfix_str(f"loss {float(value):.4f}", refresh=False)
        self.bar.update(trainer.global_step - self.bar.n)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def print(self, *args: Any, **kwargs: Any) -> None:
        (tqdm.write if self.bar is not None else print)(" ".join(map(str, args)), **kwargs)


class RunFiles(Callback):
    """Says where a run's files are when it ends: the checkpoints (the last one by name) and the TensorBoard log.

    Tuning says where its concept went when it exports it; this is the same line for a pretraining run, whose
    files are its checkpoints.
    """

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and getattr(checkpoint, "dirpath", None):
            last = getattr(checkpoint, "last_model_path", "") or getattr(checkpoint, "best_model_path", "")
            rank_zero_info(f"checkpoints: {_shown(last or checkpoint.dirpath)}")
        if trainer.logger is not None and trainer.logger.log_dir:
            rank_zero_info(
                f"TensorBoard log: {trainer.logger.log_dir} (tensorboard --logdir {trainer.logger.save_dir})"
            )


def _shown(path: str) -> str:
    """``path`` relative to the working directory when it lies below it (as the configs name it), else as is."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
