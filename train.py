"""Encoder pretraining and concept tuning with the Lightning CLI.

    python train.py fit --config configs/pretrain/tiny.yaml
    python train.py fit --config configs/tune/tiny.yaml --model.init_args.encoder_checkpoint PATH
    python train.py fit --help                     # every option, documented
    python train.py fit --config ... --verbose     # the libraries' own notices and bars too (quiet by default)

Both phases are ``fit``: the model's ``class_path`` picks the phase (``lightning_modules.EncoderPretraining`` or
``lightning_modules.ConceptTuning``) and the data's the dataset. ``--ckpt_path`` resumes exactly.

A mistake in the input (a typo in an option, a value out of range, an unreadable or too small image, a missing or
foreign checkpoint, an export folder that cannot be written: any :class:`models.errors.TuningEncoderError`; and a
diverging run, whose NaN or infinite loss or weights raise ``FloatingPointError`` naming the step and loss terms)
prints ``train.py: error: <message>`` and exits with status 2; any other exception is a bug and keeps its
traceback. The checks, the CLI class and the config resolver that benchmarks and evaluation share live in
:mod:`lightning_modules.cli`.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from models.quiet import pop_verbose, quiet_libraries  # noqa: E402

if __name__ == "__main__" and not pop_verbose(sys.argv):
    quiet_libraries()  # before the imports below: transformers' notices are emitted while importing

from lightning_modules.cli import TuningEncoderCLI, build_cli  # noqa: E402
from models.errors import TuningEncoderError  # noqa: E402


def main(args: list[str] | None = None, run: bool = True) -> TuningEncoderCLI:
    """Builds the CLI from ``args`` (default ``sys.argv``); ``run=False`` only instantiates (no subcommand)."""
    return build_cli(args, run)


def cli(args: list[str] | None = None) -> int:
    """Command-line entry point: :func:`main`, with the project's own errors as one line and status 2."""
    try:
        main(args)
    except (TuningEncoderError, FloatingPointError) as err:  # FloatingPointError: a diverging run
        message = " ".join(str(err).split())  # one line, whatever the message's own line breaks
        print(f"train.py: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
