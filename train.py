"""Encoder pretraining and concept tuning with the Lightning CLI.

    python train.py fit --config configs/pretrain/tiny.yaml
    python train.py fit --config configs/tune/tiny.yaml --model.init_args.encoder_checkpoint PATH
    python train.py fit --help                     # every option, documented

Both phases are ``fit``: the model's ``class_path`` picks the phase (``lightning_modules.EncoderPretraining`` or
``lightning_modules.ConceptTuning``) and the data's the dataset. ``--ckpt_path`` resumes exactly.
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lightning import LightningDataModule, LightningModule  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402


class TuningEncoderCLI(LightningCLI):
    """LightningCLI with subclass mode for model and data and OmegaConf interpolation in configs."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.placeholder", "data.init_args.placeholder")


def main(args: list[str] | None = None) -> TuningEncoderCLI:
    return TuningEncoderCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf", "default_env": False},
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
