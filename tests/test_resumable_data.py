"""Lightning resumes a pretraining run mid-epoch with exactly the batches an uninterrupted run would see."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules import PretrainDataModule


class _Recorder(LightningModule):
    """Minimal module that records what every training step saw."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[int, list[int], float]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch["index"].tolist(), float(batch["pixel_values"].sum())))
        return (self.w * batch["pixel_values"].mean()) ** 2 + self.w**2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_lightning_resume_mid_epoch_reproduces_the_batches(tmp_path):
    def datamodule() -> PretrainDataModule:
        return PretrainDataModule(
            synthetic_concepts=6,
            synthetic_holdout=1,
            samples_per_concept=4,
            resolution=8,
            clip_size=8,
            batch_size=4,
        )

    def trainer(**kw) -> Trainer:
        opts = dict(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False)
        return Trainer(enable_model_summary=False, default_root_dir=tmp_path, **{**opts, **kw})

    full = _Recorder()
    trainer(enable_checkpointing=False).fit(full, datamodule=datamodule())
    assert len(full.seen) == 10 and full.seen[0][1] != full.seen[5][1]

    first = _Recorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=7, save_top_k=-1)
    trainer(max_steps=7, callbacks=[ckpt]).fit(first, datamodule=datamodule())
    resumed = _Recorder()
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=PossibleUserWarning)  # "dataloader is not resumable"
        trainer(enable_checkpointing=False).fit(
            resumed, datamodule=datamodule(), ckpt_path=ckpt.best_model_path
        )
    assert first.seen + resumed.seen == full.seen
