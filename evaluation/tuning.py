"""Stage 4 of an evaluation, tuning: one Lightning run per concept, with artefact snapshots at every requested
step count.

One ``ConceptTuning`` module is built per method (``recipe.TuneRecipe``) and reused for every concept: its
initial personalizer weights are restored and its concept state re-initialised before each run, which saves
reloading the backbone per concept. ``ConceptTuning`` reads the concept's data from the trainer's datamodule
(``ConceptDataModule``); the module's typed-input rework will change the call in :meth:`ConceptTuner.tune`.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

from lightning import Callback, LightningModule, Trainer, seed_everything

from datamodules.concept import ConceptDataModule
from evaluation.concepts.base import EvalConcept
from evaluation.recipe import TuneRecipe
from lightning_modules.tuning import ConceptTuning
from models.artifact import ConceptArtifact

ARTIFACTS_DIR = "artifacts"  # <out>/artifacts/<method>/<concept>/step_<k>.safetensors


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


def accelerator(device: str) -> str:
    """The Lightning accelerator of a torch device string (``cpu``, ``cuda:0`` -> ``gpu``)."""
    return "cpu" if device == "cpu" else "gpu" if device.startswith("cuda") else device


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
