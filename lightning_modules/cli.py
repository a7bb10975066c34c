"""The training command's parser: LightningCLI, plus the checks that must run before any work is done.

- ``omegaconf+`` parsing: ``${seed_everything}`` / ``${trainer.max_steps}`` in a config resolve after the command
  line is applied, so ``--seed_everything 4`` reaches the model's and the data's seeds.
- Errors of the command line or a config are one line (:class:`~lightning_modules.cli_errors.ShortErrorParser`).
- Values that cannot work (alpha outside [0, 1], a learning rate <= 0, an export folder that cannot be written)
  are refused at parse time, before a model is loaded; a tuning run of 0 steps is announced.
- ``--ckpt_path`` is checked before Lightning replaces the model config by the checkpoint's hyper-parameters:
  its phase, and its base model's fingerprint against the configured base model's.
- A :class:`~lightning_modules.callbacks.FiniteGuard` stops a diverging run in one line.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_modules.base import check_checkpoint, read_checkpoint
from lightning_modules.callbacks import FiniteGuard
from lightning_modules.cli_errors import ShortErrorParser, import_class
from models.errors import ConfigurationError
from models.io import check_writable_dir

# ``--ckpt_path`` values Lightning resolves itself (not files).
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")

# Absolute interpolations (``${seed_everything}``) inside a subcommand's config refer to that subcommand's keys.
set_parsing_settings(omegaconf_absolute_to_relative_paths=True)


class TuningEncoderParser(ShortErrorParser, LightningArgumentParser):
    """LightningCLI's parser with one-line errors."""


class TuningEncoderCLI(LightningCLI):
    """LightningCLI with subclass mode for model and data, OmegaConf interpolation and up-front checks."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("parser_class", TuningEncoderParser)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.placeholder", "data.init_args.placeholder")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        model = config.get("model")
        class_path = model.get("class_path") if isinstance(model, Namespace) else None
        init = model.get("init_args") if isinstance(model, Namespace) else None
        phase = getattr(import_class(class_path), "phase", None) if class_path else None
        if isinstance(init, Namespace):
            check_values(init, config.get("trainer"), phase, config.get("data"))
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and str(ckpt_path) not in SPECIAL_CKPT_PATHS:
            # Before LightningCLI reads it: Lightning replaces the model config by the checkpoint's
            # hyper-parameters (class_path and base model included, so a pretraining checkpoint would silently
            # turn a tuning run into pretraining, and another backbone's checkpoint would silently train on
            # that backbone), and a foreign file fails deep inside Lightning with a KeyError.
            source = f"--ckpt_path {ckpt_path}"
            meta = check_checkpoint(read_checkpoint(ckpt_path, "--ckpt_path"), None, phase, source)
            if isinstance(init, Namespace):
                check_resume_base_model(meta, init, source)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:
            # jsonargparse wraps an error raised in a model or data __init__ into a long multi-line message
            # listing the whole config; re-raise the original one-line error instead.
            root = unwrap_jsonargparse(err)
            if root is err:
                raise
            raise root from None
        self.trainer.callbacks.append(FiniteGuard())


def unwrap_jsonargparse(err: BaseException) -> BaseException:
    """The first exception in ``err``'s cause chain that was not raised inside jsonargparse."""
    import traceback

    while err.__cause__ is not None:
        frames = traceback.extract_tb(err.__traceback__)
        if not frames or "jsonargparse" not in frames[-1].filename:
            break
        err = err.__cause__
    return err


def check_values(
    init: Namespace, trainer: Namespace | None, phase: str | None, data: Namespace | None = None
) -> None:
    """Refuses model / trainer values that cannot work, naming the option.

    A tuning run of 0 steps (other than the encoder-only ablation) is announced on stderr.

    Raises:
        ConfigurationError: alpha outside [0, 1], a learning rate that is not a positive number.
        ArtifactWriteError: an export folder that cannot be written.
    """
    alpha = init.get("alpha")
    if alpha is not None and not 0.0 <= float(alpha) <= 1.0:
        raise ConfigurationError(f"--model.init_args.alpha must lie in [0, 1], got {alpha}")
    optimizer = init.get("optimizer")
    opt_args = optimizer.get("init_args") if isinstance(optimizer, Namespace) else None
    lr = opt_args.get("lr") if isinstance(opt_args, Namespace) else None
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigurationError(
            f"--model.init_args.optimizer.init_args.lr must be a positive number, got {lr}"
        )
    if phase != "tune":
        return
    max_steps = trainer.get("max_steps") if isinstance(trainer, Namespace) else None
    data_args = data.get("init_args") if isinstance(data, Namespace) else None
    data_steps = data_args.get("steps") if isinstance(data_args, Namespace) else None
    if max_steps == 0 and data_steps == 0:  # `steps: ${trainer.max_steps}`: the data would refuse it later
        raise ConfigurationError(
            "--trainer.max_steps 0: a tuning run needs at least 1 step; to export the encoder's prediction "
            "alone, add configs/tune/<backbone>_encoder_only.yaml"
        )
    if max_steps == 0 and init.get("method") != "encoder_only":
        # Not refused (the initial prediction is a legitimate thing to export, e.g. to inspect an init), but
        # never silent: the artefact would otherwise look like a tuned concept.
        sys.stderr.write(
            f"{Path(sys.argv[0]).name}: warning: --trainer.max_steps 0: nothing is tuned, the exported concept is "
            f"the initial prediction (init: {init.get('init')}); give >= 1 step to tune it\n"
        )
    export_dir = init.get("export_dir")
    if export_dir:
        check_writable_dir(export_dir, "--model.init_args.export_dir")


def check_resume_base_model(meta: dict, init: Namespace, source: str) -> None:
    """Refuses to resume from a checkpoint made on another base model than the configured one.

    The configured base model is loaded (to fingerprint it) only when its path differs from the checkpoint's.
    """
    configured = init.get("pretrained_model_name_or_path")
    recorded = meta.get("base_model")
    if not configured or _same_location(str(configured), str(recorded)):
        return
    from models.loading import load_backbone

    backbone = load_backbone(str(configured), init.get("image_encoder_name_or_path") or str(configured))
    fingerprint = backbone.fingerprint()
    if not backbone.matches_fingerprint(meta.get("fingerprint"), recorded):
        raise ConfigurationError(
            f"{source} was made on base model {recorded!r} (fingerprint {meta.get('fingerprint')}), but the "
            f"config names {configured!r} (fingerprint {fingerprint}); resume with the config it was made with"
        )


def _same_location(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
