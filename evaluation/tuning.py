"""Per-concept tuning for evaluation: a method's recipe from the tune YAMLs, one Lightning run per concept, and
artefact snapshots at every requested step count.

A recipe is ``tune_config`` <- ``tune_overrides`` <- the method's ``overlay`` <- the method's ``overrides``
(OmegaConf merge, then interpolation), the same files ``train.py fit`` reads. One ``ConceptTuning`` module is
built per method and reused for every concept: its initial personalizer weights are restored and its concept
state re-initialised before each run, which saves reloading the backbone per concept.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning import Callback, LightningModule, Trainer, seed_everything
from omegaconf import OmegaConf

from datamodules.concept import ConceptDataModule
from evaluation.concepts import EvalConcept
from evaluation.spec import EvaluationConfigError, MethodSpec
from lightning_modules.tuning import ConceptTuning
from models.artifact import ConceptArtifact
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


def _optimizer_factory(spec: Any) -> Any:
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
    kwargs["optimizer"] = _optimizer_factory(kwargs.get("optimizer"))
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
    if check_checkpoint and checkpoint is not None and not Path(checkpoint).is_file():
        raise EvaluationConfigError(
            f"pretraining checkpoint {checkpoint} (method {method.name!r}) does not exist: run "
            "`python train.py fit --config configs/pretrain/tiny.yaml` or pass --encoder_checkpoint"
        )
    return TuneRecipe(
        method=method.name,
        config=resolved,
        module_class=module_class,
        model_kwargs=kwargs,
        data_kwargs=data,
        max_steps_cap=None if cap is None else int(cap),
        seed=resolved.get("seed_everything"),
    )


class SnapshotCallback(Callback):
    """Exports the concept at each requested step count during one tuning run.

    Step 0 is the initial prediction (taken at train start, or at fit end when ``max_steps=0`` skips the loop).
    Each snapshot's ``extra["tune_seconds"]`` is the wall time from fit start to that step, snapshot cost
    excluded (it includes the initial prediction, not the backbone loading or token index set-up).

    Args:
        steps: step counts to snapshot.
        save_dir: folder of ``step_<k>.safetensors`` files.
    """

    def __init__(self, steps: list[int], save_dir: Path) -> None:
        self.steps = sorted(set(steps))
        self.save_dir = Path(save_dir)
        self.paths: dict[int, Path] = {}
        self._start = 0.0
        self._overhead = 0.0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start, self._overhead = time.perf_counter(), 0.0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._maybe_snapshot(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._maybe_snapshot(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._maybe_snapshot(trainer, pl_module)

    def _maybe_snapshot(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = int(trainer.global_step)
        if step not in self.steps or step in self.paths:
            return
        elapsed = time.perf_counter() - self._start - self._overhead
        begin = time.perf_counter()
        artifact = pl_module.build_artifact()  # type: ignore[operator]
        artifact.extra["tune_seconds"] = f"{elapsed:.4f}"
        self.paths[step] = artifact.save(snapshot_path(self.save_dir, step))
        self._overhead += time.perf_counter() - begin


def snapshot_path(save_dir: Path, step: int) -> Path:
    """``<save_dir>/step_<kkkk>.safetensors``."""
    return Path(save_dir) / f"step_{step:04d}.safetensors"


class ConceptTuner:
    """Tunes concepts with one method, building its module once.

    Args:
        recipe: the resolved method.
        accelerator: Lightning accelerator (``cpu``, ``gpu``, ``auto``).
        precision: Lightning precision (``32-true``, ``bf16-mixed``, ...).
    """

    def __init__(self, recipe: TuneRecipe, accelerator: str = "cpu", precision: str = "32-true") -> None:
        self.recipe = recipe
        self.accelerator = accelerator
        self.precision = precision
        self._module: ConceptTuning | None = None

    @property
    def built(self) -> bool:
        """Whether the module (and its backbone) has been built."""
        return self._module is not None

    @property
    def module(self) -> ConceptTuning:
        """The method's module (built on first use: this loads the backbone)."""
        if self._module is None:
            self._module = self.recipe.module_class(**self.recipe.model_kwargs)
        return self._module

    def tune(self, concept: EvalConcept, steps: list[int], save_dir: Path) -> dict[int, ConceptArtifact]:
        """Tunes one concept for ``max(steps)`` steps and returns the snapshot at each of ``steps``.

        Returns:
            ``{step: artefact}``, each also saved as ``<save_dir>/step_<k>.safetensors``.
        """
        module = self.module
        module.reset_concept(concept.name)
        max_steps = max(steps)
        data = ConceptDataModule(
            **self.recipe.data_kwargs,
            **concept.data_args,
            steps=max(max_steps, 1),
            placeholder=self.recipe.placeholder,
        )
        snapshots = SnapshotCallback(steps, save_dir)
        if self.recipe.seed is not None:
            seed_everything(int(self.recipe.seed), verbose=False)
        with _quiet_lightning():
            trainer = Trainer(
                accelerator=self.accelerator,
                devices=1,
                precision=self.precision,
                max_steps=max_steps,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                callbacks=[snapshots],
            )
            trainer.fit(module, data)
        missing = sorted(set(steps) - set(snapshots.paths))
        if missing:
            raise RuntimeError(
                f"tuning {concept.name} stopped before steps {missing} (at {trainer.global_step})"
            )
        return {k: ConceptArtifact.load(p) for k, p in snapshots.paths.items()}


class _quiet_lightning:
    """Silences Lightning's per-fit banners and hints so the evaluation progress bar stays readable."""

    _names = ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero")

    def __enter__(self) -> None:
        self._levels = {n: logging.getLogger(n).level for n in self._names}
        for name in self._names:
            logging.getLogger(name).setLevel(logging.WARNING)
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # the frozen backbone

    def __exit__(self, *exc: Any) -> None:
        self._warnings.__exit__(*exc)
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
