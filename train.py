"""Encoder pretraining and concept tuning with the Lightning CLI.

    python train.py fit --config configs/pretrain/tiny.yaml
    python train.py fit --config configs/tune/tiny.yaml --model.init_args.encoder_checkpoint PATH
    python train.py fit --help                     # every option, documented
    python train.py fit --config ... --verbose     # the libraries' own notices and bars too (quiet by default)

Both phases are ``fit``: the model's ``class_path`` picks the phase (``lightning_modules.EncoderPretraining`` or
``lightning_modules.ConceptTuning``) and the data's the dataset. ``--ckpt_path`` resumes exactly.

A mistake in the input (an unreadable or too small image, a missing or foreign checkpoint, an impossible
configuration: any :class:`models.errors.TuningEncoderError`) prints ``train.py: error: <message>`` and exits
with status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from models.quiet import pop_verbose, quiet_libraries  # noqa: E402

if __name__ == "__main__" and not pop_verbose(sys.argv):
    quiet_libraries()  # before the imports below: transformers' notices are emitted while importing

from jsonargparse import Namespace  # noqa: E402
from lightning import LightningDataModule, LightningModule  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from lightning_modules.base import check_checkpoint, read_checkpoint  # noqa: E402
from models.errors import TuningEncoderError  # noqa: E402

# ``--ckpt_path`` values Lightning resolves itself (not files).
_SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")


class TuningEncoderCLI(LightningCLI):
    """LightningCLI with subclass mode for model and data and OmegaConf interpolation in configs."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.placeholder", "data.init_args.placeholder")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # Validate --ckpt_path before LightningCLI reads it: Lightning replaces the model config by the
        # checkpoint's hyper-parameters (class_path included, so a pretraining checkpoint would silently turn
        # a tuning run into pretraining), and a foreign file fails deep inside Lightning with a KeyError.
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or str(ckpt_path) in _SPECIAL_CKPT_PATHS:
            return
        model = self.config[subcommand].get("model")
        class_path = model.get("class_path") if isinstance(model, Namespace) else None
        phase = getattr(_import(class_path), "phase", None) if class_path else None
        check_checkpoint(read_checkpoint(ckpt_path, "--ckpt_path"), None, phase, f"--ckpt_path {ckpt_path}")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:
            # jsonargparse wraps an error raised in a model or data __init__ into a long multi-line message
            # listing the whole config; re-raise the original one-line error instead.
            root = _unwrap_jsonargparse(err)
            if root is err:
                raise
            raise root from None


def _import(class_path: str):
    """The class named by a config's ``class_path``, or None if it cannot be imported."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _unwrap_jsonargparse(err: BaseException) -> BaseException:
    """The first exception in ``err``'s cause chain that was not raised inside jsonargparse."""
    while err.__cause__ is not None:
        frames = traceback.extract_tb(err.__traceback__)
        if not frames or "jsonargparse" not in frames[-1].filename:
            break
        err = err.__cause__
    return err


def main(args: list[str] | None = None, run: bool = True) -> TuningEncoderCLI:
    """Builds the CLI from ``args`` (default ``sys.argv``); ``run=False`` only instantiates (no subcommand)."""
    return TuningEncoderCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf", "default_env": False},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def cli(args: list[str] | None = None) -> int:
    """Command-line entry point: :func:`main`, with the project's own errors as one line and status 2."""
    try:
        main(args)
    except TuningEncoderError as err:
        message = " ".join(str(err).split())  # one line, whatever the message's own line breaks
        print(f"train.py: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
