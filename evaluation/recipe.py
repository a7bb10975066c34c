"""A tuning method's recipe from the tune YAMLs, resolved and checked without loading any model (part of the
plan stage; ``tuning.py`` runs it).

A recipe is ``tune_config`` <- ``tune_overrides`` <- the method's ``overlay`` <- the method's ``overrides``
(OmegaConf merge, then interpolation), the same files ``train.py fit`` reads.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from datamodules.concept import ConceptDataModule
from evaluation.config import EvaluationConfigError, MethodSpec
from lightning_modules.tuning import ConceptTuning
from models.errors import MissingFileError
from models.personalizer import PersonalizerConfig

# Per-concept arguments the harness sets itself; the tune config's values for them are ignored.
_CONCEPT_DATA_ARGS = (
    "image",
    "synthetic_concept",
    "synthetic_seed",
    "steps",
    "class_noun",
    "placeholder",
    "templates",
)


@dataclass
class TuneRecipe:
    """A tuning method resolved from YAML.

    Attributes:
        method: method name.
        config: the resolved tune config (``model`` / ``data`` / ``trainer`` sections), recorded in the summary.
        module_class: ``ConceptTuning`` or a subclass.
        model_kwargs: the module's ``__init__`` arguments (optimizer as a factory, personalizer as a config).
        data_kwargs: ``ConceptDataModule`` arguments shared by all concepts.
        max_steps_cap: ``trainer.max_steps`` set by the overlay (e.g. 0 for encoder-only), else None.
        seed: ``seed_everything`` of the config (None: unset).
    """

    method: str
    config: dict[str, Any]
    module_class: type[ConceptTuning]
    model_kwargs: dict[str, Any]
    data_kwargs: dict[str, Any]
    max_steps_cap: int | None
    seed: int | None

    @property
    def placeholder(self) -> str:
        """The pseudo-word the method's prompts use."""
        return str(self.model_kwargs.get("placeholder", "<s*>"))

    @property
    def encoder_checkpoint(self) -> str | None:
        """The pretraining checkpoint the method starts from (None: none)."""
        return self.model_kwargs.get("encoder_checkpoint")


def _load_yaml(path: str, what: str):
    if not Path(path).is_file():
        raise EvaluationConfigError(f"{what} {path} does not exist")
    return OmegaConf.load(path)


def _apply_overrides(cfg, overrides: dict[str, Any]) -> None:
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=True)


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise EvaluationConfigError(f"cannot import {class_path!r}: {err}") from err


def optimizer_factory(spec: Any) -> Any:
    """The ``optimizer`` of a tune config (a class path, or ``{class_path, init_args}``) as a factory."""
    if spec is None or callable(spec):
        return spec
    if isinstance(spec, str):
        return _import(spec)
    return functools.partial(_import(spec["class_path"]), **spec.get("init_args", {}))


def _check_kwargs(target: Any, kwargs: dict[str, Any], where: str) -> None:
    try:
        inspect.signature(target).bind_partial(**kwargs)
    except TypeError as err:
        raise EvaluationConfigError(f"{where}: {err}") from err


def resolve_recipe(
    tune_config: str,
    method: MethodSpec,
    tune_overrides: dict[str, Any],
    export_dir: str,
    check_checkpoint: bool = True,
) -> TuneRecipe:
    """Resolves a tuning method; every file is checked, no model is loaded.

    Args:
        tune_config: base tune YAML (``configs/tune/tiny.yaml``).
        method: the method (its ``overlay`` and ``overrides``).
        tune_overrides: run-wide values set before the overlay (dotted keys or nested sections).
        export_dir: where the module writes its final artefact (``<export_dir>/<concept>.safetensors``).
        check_checkpoint: require the pretraining checkpoint (if any) to exist.

    Raises:
        EvaluationConfigError: a missing YAML or checkpoint, a model that is not ``ConceptTuning``, or arguments
            its ``__init__`` / ``ConceptDataModule`` do not take.
    """
    cfg = _load_yaml(tune_config, "tune config")
    _apply_overrides(cfg, tune_overrides)
    cap = None
    if method.overlay:
        overlay = _load_yaml(method.overlay, f"overlay of method {method.name!r}")
        cap = OmegaConf.select(overlay, "trainer.max_steps", default=None)
        cfg = OmegaConf.merge(cfg, overlay)
    _apply_overrides(cfg, method.overrides)
    try:
        resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    except Exception as err:  # interpolation errors come in several types
        raise EvaluationConfigError(f"method {method.name!r}: cannot resolve its tune config: {err}") from err
    model = resolved.get("model") or {}
    module_class = _import(model.get("class_path", "lightning_modules.ConceptTuning"))
    if not (isinstance(module_class, type) and issubclass(module_class, ConceptTuning)):
        raise EvaluationConfigError(
            f"method {method.name!r}: model.class_path {model.get('class_path')!r} is not a ConceptTuning"
        )
    kwargs = dict(model.get("init_args") or {})
    kwargs["optimizer"] = optimizer_factory(kwargs.get("optimizer"))
    if isinstance(kwargs.get("personalizer"), dict):
        kwargs["personalizer"] = PersonalizerConfig(**kwargs["personalizer"])
    kwargs.update(export_dir=export_dir, export_diffusers=False, method=method.name, sample_every_n_steps=0)
    _check_kwargs(module_class.__init__, {"self": None, **kwargs}, f"method {method.name!r} model.init_args")
    data = {
        k: v
        for k, v in ((resolved.get("data") or {}).get("init_args") or {}).items()
        if k not in _CONCEPT_DATA_ARGS
    }
    _check_kwargs(
        ConceptDataModule.__init__, {"self": None, **data}, f"method {method.name!r} data.init_args"
    )
    checkpoint = kwargs.get("encoder_checkpoint")
    if check_checkpoint and checkpoint is not None:
        _check_encoder_checkpoint(str(checkpoint), method.name)
    return TuneRecipe(
        method=method.name,
        config=resolved,
        module_class=module_class,
        model_kwargs=kwargs,
        data_kwargs=data,
        max_steps_cap=None if cap is None else int(cap),
        seed=resolved.get("seed_everything"),
    )


def _check_encoder_checkpoint(checkpoint: str, method: str) -> None:
    """Reads the method's encoder now, before any tuning: a missing one, one of another phase, or a pickle that
    would run code (refused unread, :mod:`lightning_modules.checkpoint`) is one line here."""
    from lightning_modules.checkpoint import check_checkpoint, read_checkpoint

    try:
        ckpt = read_checkpoint(checkpoint, f"pretraining checkpoint (method {method!r})")
    except MissingFileError:
        raise EvaluationConfigError(
            f"pretraining checkpoint {checkpoint} (method {method!r}) does not exist: run "
            "`python train.py fit --config configs/pretrain/tiny.yaml` or pass --encoder_checkpoint"
        ) from None
    check_checkpoint(
        ckpt, None, phase="pretrain", source=f"pretraining checkpoint {checkpoint} (method {method!r})"
    )
