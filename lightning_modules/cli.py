"""The training command's parser: LightningCLI, plus the checks that must run before any work is done.

- ``omegaconf+`` parsing: ``${seed_everything}`` / ``${trainer.max_steps}`` in a config resolve after the command
  line is applied, so ``--seed_everything 4`` reaches the model's and the data's seeds.
- Errors of the command line or a config are one line (:class:`~lightning_modules.cli_errors.ShortErrorParser`).
- Values that cannot work (alpha outside [0, 1], a learning rate <= 0, an export folder that cannot be written)
  are refused at parse time, before a model is loaded; a tuning run of 0 steps is announced.
- ``--ckpt_path`` is checked before Lightning replaces the model config by the checkpoint's hyper-parameters:
  read weights-only (a pickle that would run code is refused in one line), its phase, and its base model's
  fingerprint against the configured base model's; Lightning's own load of it is weights-only too.
- FSDP strategies are refused at parse time with the reason (:func:`check_strategy`); DDP with a bf16 frozen
  backbone and gradient checkpointing is the multi-GPU route.
- A :class:`~lightning_modules.callbacks.FiniteGuard` stops a diverging run in one line.
- :func:`resolve_config` parses the same YAML files with the same parser but instantiates nothing, so benchmarks
  and evaluation get exactly the arguments ``python train.py fit --config ...`` would use.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonargparse import Namespace, set_parsing_settings
from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_modules.callbacks import FiniteGuard
from lightning_modules.checkpoint import check_checkpoint, read_checkpoint
from lightning_modules.cli_errors import ShortErrorParser, import_class
from models.errors import ConfigurationError, MissingFileError
from models.io import check_writable_dir
from models.personalizer import PersonalizerConfig
from models.weights_only import load_weights_only

# ``--ckpt_path`` values Lightning resolves itself (not files).
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")

FSDP_REFUSED = (
    "FSDP is not supported: Lightning's FSDP precision plugin rejects the recipes' gradient_clip_val, one FSDP "
    "flat parameter cannot hold the bf16 frozen backbone and the fp32 LoRA factors, sampling on rank 0 from a "
    "sharded UNet deadlocks the other ranks, and fingerprints of sharded weights differ from a plain load; use "
    "configs/trainer/ddp.yaml with --model.init_args.torch_dtype bfloat16 and "
    "--model.init_args.gradient_checkpointing true"
)

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
        check_strategy((self.config[subcommand] if subcommand else self.config).get("trainer"))
        if not subcommand:
            return
        config = self.config[subcommand]
        model = config.get("model")
        class_path = model.get("class_path") if isinstance(model, Namespace) else None
        init = model.get("init_args") if isinstance(model, Namespace) else None
        phase = getattr(import_class(class_path), "phase", None) if class_path else None
        if isinstance(init, Namespace):
            check_values(init, config.get("trainer"), phase, config.get("data"))
        encoder = init.get("encoder_checkpoint") if isinstance(init, Namespace) and phase == "tune" else None
        if encoder:
            # Before the base model loads: a missing or foreign encoder, or a pickle that would run code (refused
            # unread), is one line at once. ConceptTuning reads it again and checks it against the base model.
            source = f"encoder_checkpoint {encoder}"
            check_checkpoint(read_checkpoint(encoder, "encoder_checkpoint"), None, "pretrain", source)
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and str(ckpt_path) not in SPECIAL_CKPT_PATHS:
            # Before LightningCLI reads it: Lightning replaces the model config by the checkpoint's
            # hyper-parameters (class_path and base model included, so a pretraining checkpoint would silently
            # turn a tuning run into pretraining, and another backbone's checkpoint would silently train on
            # that backbone), and a foreign file fails deep inside Lightning with a KeyError.
            source = f"--ckpt_path {ckpt_path}"
            meta = check_checkpoint(load_weights_only(ckpt_path, "--ckpt_path"), None, phase, source)
            if isinstance(init, Namespace):
                check_resume_base_model(meta, init, source)

    def before_instantiate_classes(self) -> None:
        # `--trainer.enable_progress_bar false` on a recipe that lists a progress-bar callback (the tuning
        # recipes' StepProgressBar): drop the bar instead of Lightning's MisconfigurationException.
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        trainer = config.get("trainer")
        if trainer is None or trainer.get("enable_progress_bar") is not False or not trainer.get("callbacks"):
            return
        from lightning.pytorch.callbacks import ProgressBar

        def is_bar(callback) -> bool:
            cls = import_class(callback.get("class_path", "")) if isinstance(callback, Namespace) else None
            return isinstance(cls, type) and issubclass(cls, ProgressBar)

        trainer.callbacks = [c for c in trainer.callbacks if not is_bar(c)]

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

    def fit(self, model, **kwargs) -> None:
        """``trainer.fit``, resuming with ``weights_only=True``: Lightning's own load of ``--ckpt_path`` unpickles
        tensors and plain values only, whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says."""
        self.trainer.fit(model, **{**kwargs, "weights_only": True})


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
            "alone, add configs/tune/methods/encoder_only.yaml"
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


def check_strategy(trainer: Namespace | None) -> None:
    """Refuses FSDP (``strategy: fsdp``, ``FSDPStrategy`` and subclasses, ``ModelParallelStrategy``) with the reason.

    Raises:
        ConfigurationError: the trainer's strategy shards the model.
    """
    strategy = trainer.get("strategy") if isinstance(trainer, Namespace) else None
    if isinstance(strategy, Namespace):
        name = str(strategy.get("class_path") or "")
    elif isinstance(strategy, str):
        name = strategy
    elif strategy is not None:
        name = f"{type(strategy).__module__}.{type(strategy).__qualname__}"
    else:
        return
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    cls = import_class(name) if "." in name else None
    sharded = isinstance(cls, type) and issubclass(cls, (FSDPStrategy, ModelParallelStrategy))
    if sharded or "fsdp" in name.lower():
        raise ConfigurationError(f"--trainer.strategy {name}: {FSDP_REFUSED}")


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


class _ParseOnly(TuningEncoderCLI):
    """Parses and checks the config like ``train.py`` but builds nothing."""

    def instantiate_classes(self) -> None:
        pass


def build_cli(
    args: list[str] | None = None, run: bool = True, cls: type = TuningEncoderCLI
) -> TuningEncoderCLI:
    """The CLI on ``args`` (default ``sys.argv``); ``run=False`` only instantiates (no subcommand)."""
    return cls(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf+", "default_env": False},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def optimizer_factory(spec: Any) -> Any:
    """An optimizer factory ``params -> Optimizer`` from a config's ``{class_path, init_args}`` (or a name).

    ``None`` and callables pass through (``ConceptTuning`` defaults to AdamW, lr 1e-3).
    """
    if spec is None or callable(spec):
        return spec
    if isinstance(spec, str):
        spec = {"class_path": spec}
    cls = import_class(spec["class_path"])
    if cls is None:
        raise ConfigurationError(f"optimizer class {spec['class_path']!r} cannot be imported")
    return functools.partial(cls, **(spec.get("init_args") or {}))


@dataclass
class ResolvedConfig:
    """What ``train.py fit`` would build from some YAML files, as classes and keyword arguments.

    Attributes:
        model_class: the model's class (``ConceptTuning``, ``EncoderPretraining``).
        model_kwargs: its ``__init__`` arguments (optimizer as a factory, personalizer as a config).
        data_class: the datamodule's class.
        data_kwargs: its ``__init__`` arguments.
        trainer: the ``trainer`` section (plain values).
        seed: ``seed_everything``.
        config: the whole parsed config as plain values (for the record).
    """

    model_class: type
    model_kwargs: dict[str, Any]
    data_class: type
    data_kwargs: dict[str, Any]
    trainer: dict[str, Any]
    seed: int | None
    config: dict[str, Any]

    def build_model(self, **overrides: Any):
        """The model with ``overrides`` on top of the config's arguments (this loads the backbone)."""
        return self.model_class(**{**self.model_kwargs, **overrides})

    def build_data(self, **overrides: Any):
        """The datamodule with ``overrides`` on top of the config's arguments."""
        return self.data_class(**{**self.data_kwargs, **overrides})


def resolve_config(
    configs: Sequence[str | Path], overrides: Mapping[str, Any] | None = None
) -> ResolvedConfig:
    """Resolves ``--config`` files (later ones override earlier ones) plus dotted overrides, as ``train.py``.

    Args:
        configs: YAML files, e.g. ``["configs/tune/tiny.yaml", "configs/tune/methods/lora.yaml"]``.
        overrides: ``{"model.init_args.alpha": 0.3, "data": "datamodules.ConceptSetDataModule", ...}``, applied
            in order after the files, as the command line would.

    Raises:
        MissingFileError: a config file does not exist.
        ConfigurationError: the parser rejects the config (unknown key, wrong type, unimportable class).
    """
    args: list[str] = []
    for path in configs:
        if not Path(path).is_file():
            raise MissingFileError(f"config {path} does not exist")
        args += ["--config", str(path)]
    for key, value in (overrides or {}).items():
        args.append(f"--{key}={value if isinstance(value, str) else json.dumps(value)}")
    try:
        cli = build_cli(args, run=False, cls=_ParseOnly)
    except SystemExit as err:  # jsonargparse prints the reason and exits
        raise ConfigurationError(f"config {list(configs)} {dict(overrides or {})} does not parse") from err
    cfg = cli.config.as_dict()
    model, data = cfg["model"], cfg["data"]
    kwargs = dict(model.get("init_args") or {})
    if "optimizer" in kwargs:
        kwargs["optimizer"] = optimizer_factory(kwargs["optimizer"])
    if isinstance(kwargs.get("personalizer"), dict):
        kwargs["personalizer"] = PersonalizerConfig(**kwargs["personalizer"])
    return ResolvedConfig(
        model_class=import_class(model["class_path"]),
        model_kwargs=kwargs,
        data_class=import_class(data["class_path"]),
        data_kwargs=dict(data.get("init_args") or {}),
        trainer=dict(cfg.get("trainer") or {}),
        seed=cfg.get("seed_everything"),
        config=cfg,
    )
