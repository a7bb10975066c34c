"""The project's LightningCLI, and the one config resolver built on it ("YAML -> module and data arguments").

``train.py`` runs :class:`TuningEncoderCLI`; :func:`resolve_config` parses the same YAML files with the same
parser (defaults, types, ``class_path`` checks, OmegaConf interpolation) but instantiates nothing, so
benchmarks and evaluation get exactly the arguments ``python train.py fit --config ...`` would use, without
loading a model.
"""

from __future__ import annotations

import functools
import importlib
import json
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from lightning_modules.base import check_checkpoint, read_checkpoint
from models.errors import ConfigurationError, MissingFileError
from models.personalizer import PersonalizerConfig

# ``--ckpt_path`` values Lightning resolves itself (not files).
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")


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
        if not ckpt_path or str(ckpt_path) in SPECIAL_CKPT_PATHS:
            return
        model = self.config[subcommand].get("model")
        class_path = model.get("class_path") if isinstance(model, Namespace) else None
        phase = getattr(import_class(class_path), "phase", None) if class_path else None
        check_checkpoint(read_checkpoint(ckpt_path, "--ckpt_path"), None, phase, f"--ckpt_path {ckpt_path}")

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
        parser_kwargs={"parser_mode": "omegaconf", "default_env": False},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def import_class(class_path: str):
    """The class named by a config's ``class_path``, or None if it cannot be imported."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def unwrap_jsonargparse(err: BaseException) -> BaseException:
    """The first exception in ``err``'s cause chain that was not raised inside jsonargparse."""
    while err.__cause__ is not None:
        frames = traceback.extract_tb(err.__traceback__)
        if not frames or "jsonargparse" not in frames[-1].filename:
            break
        err = err.__cause__
    return err


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
        configs: YAML files, e.g. ``["configs/tune/tiny.yaml", "configs/tune/tiny_lora.yaml"]``.
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
