"""Stage 4 of an evaluation, tuning: one Lightning run per concept, or per group of ``concepts_per_batch`` (K)
concepts, with artefact snapshots at every requested step count.

One ``ConceptTuning`` module is built per method (``recipe.TuneRecipe``) and reused for every run: its initial
personalizer weights are restored and its concept state re-initialised before each run, which saves reloading
the backbone per concept; the module lives on its device across runs
(``lightning_modules.resident.ResidentStrategy``: Lightning's teardown would copy it to the host after each run,
inside the timed interval). A single concept is read from the trainer's datamodule (``ConceptDataModule``); a
group of K goes in through ``ConceptTuning.set_concepts`` with the rows of ``ConceptSetDataset`` (each concept's
batches those of its own ``ConceptDataModule``), so each concept is tuned as it would be alone
(``lightning_modules.multi_concept``; with the LoRA factors tuned, each concept its own copy). Methods that tune
weights all concepts share (``shared_tunables``: the encoder, a UNet LoRA, the UNet) run one concept at a time
whatever K is.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer, seed_everything

from datamodules.concept import ConceptDataModule
from datamodules.concept_set import ConceptSetDataset
from evaluation.concepts.base import EvalConcept
from evaluation.recipe import TuneRecipe
from lightning_modules.multi_concept import shared_tunables
from lightning_modules.resident import ResidentStrategy
from lightning_modules.tuning import ConceptTuning
from models.artifact import ConceptArtifact

ARTIFACTS_DIR = "artifacts"  # <out>/artifacts/<method>/<concept>/step_<k>.safetensors


class SnapshotCallback(Callback):
    """Exports the run's concepts at each requested step count during one tuning run.

    Step 0 is the initial prediction (taken at train start, or at fit end when ``max_steps=0`` skips the loop).
    Each snapshot's ``extra["tune_seconds"]`` is the wall time from fit start to that step, snapshot cost
    excluded (it includes the initial predictions, not the backbone loading or token index set-up), divided by
    the number of concepts the run tunes together.

    Args:
        steps: step counts to snapshot.
        save_dirs: folder of ``step_<k>.safetensors`` files, one per concept of the run (slot order).
    """

    def __init__(self, steps: list[int], save_dirs: Sequence[Path]) -> None:
        self.steps = sorted(set(steps))
        self.save_dirs = [Path(d) for d in save_dirs]
        self.paths: dict[int, list[Path]] = {}
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
        elapsed = (time.perf_counter() - self._start - self._overhead) / len(self.save_dirs)
        begin = time.perf_counter()
        self.paths[step] = []
        for slot, folder in enumerate(self.save_dirs):
            artifact = pl_module.build_artifact(slot)  # type: ignore[operator]
            artifact.extra["tune_seconds"] = f"{elapsed:.4f}"
            self.paths[step].append(artifact.save(snapshot_path(folder, step)))
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
        device: torch device of every run (``cpu``, ``cuda``, ``cuda:1``); the module is moved there once, when
            built, and stays there.
        precision: Lightning precision (``32-true``, ``bf16-mixed``, ...).
        concepts_per_batch: concepts tuned together in one run (K) when the method tunes per-concept weights only.
    """

    def __init__(
        self,
        recipe: TuneRecipe,
        device: str = "cpu",
        precision: str = "32-true",
        concepts_per_batch: int = 1,
    ) -> None:
        self.recipe = recipe
        self.device = torch.device(device)
        self.precision = precision
        self.concepts_per_batch = concepts_per_batch
        self._module: ConceptTuning | None = None
        self.seconds, self.tuned = 0.0, 0  # tuning wall time and concepts tuned, over every run

    @property
    def built(self) -> bool:
        """Whether the module (and its backbone) has been built."""
        return self._module is not None

    @property
    def module(self) -> ConceptTuning:
        """The method's module (built on first use: this loads the backbone and moves it to the device)."""
        if self._module is None:
            self._module = self.recipe.module_class(**self.recipe.model_kwargs).to(self.device)
        return self._module

    @property
    def per_batch(self) -> int:
        """Concepts one run tunes: ``concepts_per_batch``, or 1 for a method that tunes shared weights."""
        if self.concepts_per_batch == 1 or shared_tunables(self.module.tune):
            return 1
        return self.concepts_per_batch

    def snapshots(
        self,
        concepts: Sequence[EvalConcept],
        needed: Callable[[EvalConcept], set[int]],
        out: Path,
        steps: list[int],
    ) -> dict[int, ConceptArtifact]:
        """The snapshots of ``concepts[0]`` at its ``needed`` step counts, ``<out>/artifacts/<method>/<concept>/``.

        The saved ones when they all exist (a resumed run); else those of a fresh run snapshotting every one of
        ``steps``, which also tunes the next concepts missing a needed snapshot, :attr:`per_batch` in all.
        """

        root = Path(out) / ARTIFACTS_DIR / self.recipe.method

        def missing(concept: EvalConcept) -> bool:
            return not all(snapshot_path(root / concept.name, k).is_file() for k in needed(concept))

        first = concepts[0]
        if missing(first):
            group = [first, *itertools.islice(filter(missing, concepts[1:]), self.per_batch - 1)]
            begin = time.perf_counter()
            self.tune_group(group, steps, [root / c.name for c in group])
            self.seconds += time.perf_counter() - begin
            self.tuned += len(group)
        return {k: ConceptArtifact.load(snapshot_path(root / first.name, k)) for k in needed(first)}

    def tune(self, concept: EvalConcept, steps: list[int], save_dir: Path) -> dict[int, ConceptArtifact]:
        """Tunes one concept for ``max(steps)`` steps and returns the snapshot at each of ``steps``.

        Returns:
            ``{step: artefact}``, each also saved as ``<save_dir>/step_<k>.safetensors``.
        """
        return self.tune_group([concept], steps, [save_dir])[0]

    def tune_group(
        self, concepts: Sequence[EvalConcept], steps: list[int], save_dirs: Sequence[Path]
    ) -> list[dict[int, ConceptArtifact]]:
        """Tunes concepts together in one run (one: as :meth:`tune`) and returns each one's snapshots.

        Returns:
            per concept, ``{step: artefact}``, each also saved as ``<save_dir>/step_<k>.safetensors``.
        """
        module = self.module
        max_steps = max(steps)
        parts = [
            ConceptDataModule(
                **self.recipe.data_kwargs,
                **concept.data_args,
                steps=max(max_steps, 1),
                placeholder=self.recipe.placeholder,
            )
            for concept in concepts
        ]
        fit: dict[str, Any] = {"datamodule": parts[0]}
        module.reset_concept(concepts[0].name if len(concepts) == 1 else None)
        if len(concepts) > 1:
            # The artefacts are named by the evaluation's concept names (a file's stem by default).
            named = [dataclasses.replace(p.concept, name=c.name) for p, c in zip(parts, concepts)]
            module.set_concepts(named, len(named), parts[0].resolution)
            views = [p.dataset() for p in parts]
            data = ConceptSetDataset(views, len(parts), parts[0].steps, parts[0].batch_size)
            fit = {"train_dataloaders": data.loader(parts[0].num_workers)}
        snapshots = SnapshotCallback(steps, save_dirs)
        if self.recipe.seed is not None:
            seed_everything(int(self.recipe.seed), verbose=False)
        with _quiet_lightning():
            trainer = Trainer(
                accelerator=accelerator(str(self.device)),
                devices=1,
                strategy=ResidentStrategy(self.device),
                precision=self.precision,
                max_steps=max_steps,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                callbacks=[snapshots],
            )
            trainer.fit(module, **fit)
        missing = sorted(set(steps) - set(snapshots.paths))
        if missing:
            names = ", ".join(c.name for c in concepts)
            raise RuntimeError(f"tuning {names} stopped before steps {missing} (at {trainer.global_step})")
        return [
            {k: ConceptArtifact.load(p[j]) for k, p in snapshots.paths.items()} for j in range(len(concepts))
        ]


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
