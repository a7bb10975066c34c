"""The evaluation harness: wires the stages. For each method x concept, tune once (snapshotting every requested
step count), then for each setting generate, score and append rows; finally report.

Stages, each importing only earlier ones: ``config`` -> ``concepts`` -> ``plan`` (with ``recipe``) -> ``tuning``
-> ``generate`` -> ``metrics`` -> ``store`` -> ``report``. Everything that can be checked without a model is
checked first (files, prompts, subject folders, method configs), so configuration errors are one line and cost
nothing. Reruns skip the rows already in ``results.csv`` and reuse the saved snapshots, so an interrupted run
continues where it stopped.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from evaluation.concepts.base import ConceptSet, EvalConcept
from evaluation.concepts.synthetic import SyntheticConcepts
from evaluation.config import EvaluationConfigError, MethodSpec, SamplingSpec, SweepSpec
from evaluation.generate.images import from_uint8, image_relpath, image_seed, save_png
from evaluation.generate.modes import Sampler, autocast_dtype
from evaluation.metrics.nearest_word import NearestWordOf
from evaluation.metrics.suite import MetricSpec, MetricSuite
from evaluation.plan import MethodPlan, Setting, make_plans, plan_inputs, plan_recipes
from evaluation.report.summary import EvaluationResult, ReportOptions, write_report
from evaluation.store.results import METRICS_INFO, ResultsStore, image_row
from evaluation.store.run_state import (
    RECORD_FILE,
    RESULTS_FILE,
    check_run_record,
    merge_records,
    run_record,
    write_json,
)
from evaluation.tuning import ARTIFACTS_DIR, ConceptTuner, snapshot_path
from models.artifact import ConceptArtifact
from models.backbone import DiffusionBackbone

__all__ = ["EvaluationResult", "run_evaluation"]


def run_evaluation(
    out_dir: str = "outputs/eval_tiny",
    tune_config: str = "configs/tune/tiny.yaml",
    methods: list[MethodSpec] | None = None,
    concepts: ConceptSet | None = None,
    sweep: SweepSpec = SweepSpec(),  # noqa: B008 - frozen by convention; jsonargparse shows its fields
    sampling: SamplingSpec = SamplingSpec(),  # noqa: B008
    metrics: MetricSpec = MetricSpec(),  # noqa: B008
    pretrained_model_name_or_path: str | None = None,
    image_encoder_name_or_path: str | None = None,
    encoder_checkpoint: str | None = None,
    tune_overrides: dict[str, Any] | None = None,
    device: str = "cpu",
    precision: str = "32-true",
    inference_autocast: Literal["auto", "bf16", "fp16", "off"] = "auto",
    num_threads: int | None = 1,
    bootstrap_samples: int = 1000,
    concepts_per_batch: int = 1,
    grids: bool = True,
    reference_points: bool = False,
    tensorboard: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> EvaluationResult:
    """Tunes, generates and scores every method x concept x setting; writes results, summary and plots.

    Args:
        out_dir: output folder: ``results.csv``, ``summary.json``, ``metrics.json``, ``tradeoff.png``,
            ``images/``, ``grids/``, ``artifacts/`` (snapshots, reused on reruns), ``run.json``.
        tune_config: base tune YAML (``train.py fit`` format): backbone, placeholder, tuning and data settings.
        methods: methods and ablations (default: one method ``date`` = the tune config as is).
        concepts: the concept set and its prompts, by ``class_path`` (None: ``SyntheticConcepts()``):
            ``evaluation.concepts.synthetic.SyntheticConcepts``, ``evaluation.concepts.dreambench.DreamBenchConcepts``
            or a plug-in such as ``toyworld.ToyWorldConcepts``.
        sweep: tuning steps, alphas and guidance scales (every combination is a setting).
        sampling: sampler, denoising steps, samples per prompt, base seed.
        metrics: CLIP / DINO backbones of the metrics and metric plug-ins.
        pretrained_model_name_or_path: Stable Diffusion folder or id (None: the tune config's).
        image_encoder_name_or_path: CLIP image encoder of the concept encoder (None: the tune config's).
        encoder_checkpoint: pretraining checkpoint (None: the tune config's); overlays may still drop it.
        tune_overrides: values set on the tune config before each method's overlay (dotted keys or sections, e.g.
            ``{"data.init_args.batch_size": 2}``); the three options above, given, win over the same keys here.
        device: device for tuning, sampling and metrics (``cpu``, ``cuda``).
        precision: Lightning precision of tuning (``32-true``, ``bf16-mixed``).
        inference_autocast: ``torch.autocast`` dtype of sampling and scoring: ``auto`` = bf16 on CUDA and off on
            the CPU (where bf16 is slow on many cores and changes the reference numbers), or ``bf16`` / ``fp16`` /
            ``off`` on any device. With CUDA present, TF32 matmuls are enabled either way.
        num_threads: torch CPU threads (None: leave as is); 1 is fastest for tiny models on a shared machine.
        bootstrap_samples: bootstrap resamples of the 95 % intervals (over concepts).
        concepts_per_batch: concepts tuned in one run (K) by methods that allow it (``evaluation/tuning.py``).
        grids: write an image grid per method x setting.
        reference_points: draw the published DreamBench numbers on ``tradeoff.png`` (SD 1.x scale only).
        tensorboard: also log aggregates and grids to ``<out_dir>/tb``.
        progress: show a progress bar and print the summary table.
        overwrite: delete the previous results, images and snapshots in ``out_dir`` first (needed when the
            configuration or a checkpoint changed since they were written).

    Returns:
        The aggregates of every row in ``out_dir``, with this invocation's counts and wall times.

    Raises:
        EvaluationConfigError: a configuration that cannot run (raised before any model is loaded).
    """
    start = time.perf_counter()
    methods = methods if methods is not None else [MethodSpec(name="date")]
    concepts = concepts if concepts is not None else SyntheticConcepts()
    if min(sampling.num_inference_steps, sampling.samples_per_prompt, sampling.batch_size) < 1:
        raise EvaluationConfigError(
            "sampling: num_inference_steps, samples_per_prompt and batch_size must be >= 1"
        )
    if not isinstance(concepts_per_batch, int) or concepts_per_batch < 1:
        raise EvaluationConfigError(f"concepts_per_batch must be an integer >= 1, got {concepts_per_batch!r}")
    out = Path(out_dir)
    given = {
        "pretrained_model_name_or_path": pretrained_model_name_or_path,
        "image_encoder_name_or_path": image_encoder_name_or_path,
        "encoder_checkpoint": encoder_checkpoint,
    }
    overrides = dict(tune_overrides or {})  # then the explicit options: they win
    overrides.update({f"model.init_args.{k}": v for k, v in given.items() if v is not None})
    base, concept_list, plans = make_plans(out, tune_config, methods, concepts, sweep, overrides)
    metrics.check(concept_list)
    recipes, inputs = plan_recipes(plans), plan_inputs(plans)
    record = run_record(
        tune_config, overrides, recipes, methods, concepts, sampling, metrics, inputs, concepts_per_batch
    )
    check_run_record(out, record, overwrite)
    # Nothing above loads a model: configuration errors cost nothing.
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / RECORD_FILE, merge_records(out / RECORD_FILE, record))
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.set_float32_matmul_precision("high")
        sampler = Sampler(out, base, sampling, device, autocast_dtype(inference_autocast, device))
        suite = MetricSuite(metrics, device)
        run = _Run(out, sampler, suite, metrics, device, precision, progress, concepts_per_batch)
        write_json(out / METRICS_INFO, run.suite.describe())
        run.walls["load"] = time.perf_counter() - start
        run.execute(plans, concept_list)
        state = {
            "record": record,
            "metrics": run.suite.describe(),
            "plugins": run.suite.plugins,
            "walls": run.walls,
            "start": start,
            "counts": {"generated": run.n_generated, "tuned": run.n_tuned},
            "autocast": sampler.autocast,
        }
        options = ReportOptions(bootstrap_samples, grids, reference_points, tensorboard, progress)
        return write_report(out, run.store.rows, plans, concept_list, state, options)
    finally:
        torch.set_num_threads(threads)


class _Run:
    """State of one invocation: the results store, metric suite, sampler, counters and timers."""

    def __init__(
        self,
        out: Path,
        sampler: Sampler,
        suite: MetricSuite,
        metrics: MetricSpec,
        device: str,
        precision: str,
        progress: bool,
        concepts_per_batch: int = 1,
    ) -> None:
        self.out, self.sampler, self.suite, self.sampling = out, sampler, suite, sampler.sampling
        self.device, self.progress = device, progress
        self.tuner_args = (device, precision, concepts_per_batch)  # ConceptTuner's
        self.store = ResultsStore(out / RESULTS_FILE, metrics.columns())
        self.walls = {"load": 0.0, "tuning": 0.0, "generation": 0.0, "scoring": 0.0}
        self.n_generated = self.n_tuned = 0
        self.nearest_word = NearestWordOf(metrics.vocabulary, lambda: sampler.backbone_for(None))

    def pending(self, plan: MethodPlan, concept: EvalConcept, setting: Setting) -> list[tuple[int, int]]:
        """(prompt index, sample) pairs of this group that have no row yet."""
        name, s = plan.spec.name, setting
        return [
            (i, k)
            for i in range(len(concept.prompts))
            for k in range(self.sampling.samples_per_prompt)
            if (name, concept.name, s.steps, s.alpha, s.guidance, i, k) not in self.store
        ]

    def execute(self, plans: list[MethodPlan], concepts: list[EvalConcept]) -> None:
        """Tunes (or loads), generates and scores every pending row, appending rows group by group."""
        total = sum(len(self.pending(p, c, s)) for p in plans for c in concepts for s in p.settings)
        bar = tqdm(total=total, desc="evaluate", unit="img", disable=not self.progress, dynamic_ncols=True)
        for plan in plans:
            tuner = ConceptTuner(plan.recipe, *self.tuner_args) if plan.recipe else None
            for i, concept in enumerate(concepts):
                todo = {s: keys for s in plan.settings if (keys := self.pending(plan, concept, s))}
                if not todo:
                    continue
                arts: dict[int, ConceptArtifact | None]
                if tuner is not None:
                    bar.set_postfix_str(f"{plan.spec.name}/{concept.name}: tuning")
                    arts = tuner.snapshots(concepts[i:], partial(self._needed, plan), self.out, plan.steps)
                elif plan.kind == "plain_words":
                    arts = {0: None}
                elif plan.kind == "export":
                    folder = self.out / ARTIFACTS_DIR / str(plan.spec.export_of) / concept.name
                    arts = {
                        k: ConceptArtifact.load(snapshot_path(folder, k)) for k in {s.steps for s in todo}
                    }
                else:
                    arts = {plan.artifacts[concept.name].steps: plan.artifacts[concept.name]}
                backbone = self.sampler.backbone_for(tuner)
                fingerprint = backbone.fingerprint()
                if any(a is not None and a.fingerprint != fingerprint for a in arts.values()):
                    raise EvaluationConfigError(
                        f"artefacts of {plan.spec.name}/{concept.name} were made on another base model "
                        f"than {backbone.name_or_path!r}"
                    )
                references = concept.load_references()
                for setting, keys in todo.items():
                    bar.set_postfix_str(f"{plan.spec.name}/{concept.name}/{setting.label}")
                    self._group(backbone, plan, concept, setting, arts[setting.steps], keys, references, bar)
            if tuner is not None:
                self.walls["tuning"] += tuner.seconds
                self.n_tuned += tuner.tuned
        bar.close()

    def _needed(self, plan: MethodPlan, concept: EvalConcept) -> set[int]:
        """The step counts of the concept's settings that still have rows to write."""
        return {s.steps for s in plan.settings if self.pending(plan, concept, s)}

    def _group(
        self,
        backbone: DiffusionBackbone,
        plan: MethodPlan,
        concept: EvalConcept,
        setting: Setting,
        art: ConceptArtifact | None,
        keys: list[tuple[int, int]],
        references: torch.Tensor,
        bar: Any,
    ) -> None:
        """Generates the missing images of one method x concept x setting, scores them, appends their rows.

        Batches are fixed slices of the group's full (prompt, sample) list, so a missing image is regenerated
        with the same batch-mates it was first generated with (and alone when ``batch_size`` is 1).
        """
        missing, images, rows = set(keys), [], []
        tune_seconds = art.extra.get("tune_seconds") if art is not None else None
        context = {
            "tune_seconds": float(tune_seconds) if tune_seconds is not None else None,
            "nearest_word": self.nearest_word(art) if plan.kind in ("tuned", "artifacts") else "",
            "sampler": self.sampling.sampler,
            "inference_steps": self.sampling.num_inference_steps,
            "clip_backbone": self.suite.clip_backbone,
            "dino_backbone": self.suite.dino_backbone or "",
        }
        group = [(i, k) for i in range(len(concept.prompts)) for k in range(self.sampling.samples_per_prompt)]
        size = max(self.sampling.batch_size, 1)
        for batch in (group[j : j + size] for j in range(0, len(group), size)):
            if missing.isdisjoint(batch):
                continue
            seeds = [image_seed(self.sampling.seed, concept.name, i, k) for i, k in batch]
            begin = time.perf_counter()
            with self.sampler.inference_context():
                arrays = self.sampler.generate(
                    backbone, plan, concept, setting, art, [i for i, _ in batch], seeds
                )
            for (prompt_idx, sample), seed, array in zip(batch, seeds, arrays):
                if (prompt_idx, sample) not in missing:
                    continue  # regenerated only as a batch-mate; its row and PNG already exist
                rel = image_relpath(plan.spec.name, setting, concept.name, prompt_idx, sample)
                save_png(array, self.out / rel)
                images.append(from_uint8(array))
                rows.append(
                    image_row(plan.spec.name, setting, concept, prompt_idx, sample, seed, rel, context)
                )
                self.n_generated += 1
                bar.update(1)
            self.walls["generation"] += time.perf_counter() - begin
        begin = time.perf_counter()
        with self.sampler.inference_context():
            scores = self.suite.score(
                torch.stack(images).to(self.device),
                references,
                concept,
                [r["prompt_idx"] for r in rows],
                self.sampler.base.placeholder,
            )
        self.walls["scoring"] += time.perf_counter() - begin
        for i, row in enumerate(rows):
            row.update({k: (v[i] if v is not None else None) for k, v in scores.items()})
        self.store.append(rows)
