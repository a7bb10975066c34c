"""The evaluation harness: for each method x concept, tune once (snapshotting every requested step count), then
for each setting generate, score and append rows; finally aggregate, draw grids and the trade-off plot.

Everything that can be checked without a model is checked first (files, prompts, subject folders, method
configs), so configuration errors are one line and cost nothing. Reruns skip the rows already in
``results.csv`` and reuse the saved snapshots, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from evaluation.checker_metrics import NearestWords, format_word_table, nearest_word_table, word_of_token
from evaluation.concepts import EvalConcept
from evaluation.exported import ExportedSampler
from evaluation.generate import (
    Setting,
    from_uint8,
    generate_images,
    generate_plain,
    image_relpath,
    image_seed,
    initial_latents,
    save_png,
)
from evaluation.plan import MethodPlan, check_metric_files, make_plans, plan_inputs, plan_recipes
from evaluation.plot import REFERENCE_POINTS, REFERENCE_PROTOCOLS, plot_tradeoff
from evaluation.report import aggregate, format_table, log_tensorboard, write_grids, write_json
from evaluation.results import METRICS_INFO, ResultsStore
from evaluation.run_state import RECORD_FILE, check_run_record, merge_records, run_record
from evaluation.scoring import MetricSuite
from evaluation.spec import (
    ConceptSetSpec,
    EvaluationConfigError,
    MethodSpec,
    MetricSpec,
    SamplingSpec,
    SweepSpec,
)
from evaluation.tuning import ConceptTuner, TuneRecipe, snapshot_path
from models.artifact import ConceptArtifact
from models.backbone import DEFAULT_IMAGE_ENCODER, DiffusionBackbone
from models.loading import load_backbone


@dataclass
class EvaluationResult:
    """What one invocation did: aggregates of every row in the folder, counts and wall times (seconds)."""

    out_dir: Path
    aggregates: list[dict[str, Any]]
    n_rows: int
    n_generated: int
    n_tuned: int
    wall_seconds: dict[str, float]
    table: str


def run_evaluation(
    out_dir: str = "outputs/eval_tiny",
    tune_config: str = "configs/tune/tiny.yaml",
    methods: list[MethodSpec] | None = None,
    concepts: ConceptSetSpec = ConceptSetSpec(),  # noqa: B008 - frozen by convention; jsonargparse shows its fields
    sweep: SweepSpec = SweepSpec(),  # noqa: B008
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
        concepts: the concept set and its prompts.
        sweep: tuning steps, alphas and guidance scales (every combination is a setting).
        sampling: sampler, denoising steps, samples per prompt, base seed.
        metrics: CLIP / DINO backbones of the metrics.
        pretrained_model_name_or_path: Stable Diffusion folder or id (None: the tune config's).
        image_encoder_name_or_path: CLIP image encoder of the concept encoder (None: the tune config's).
        encoder_checkpoint: pretraining checkpoint (None: the tune config's); overlays may still drop it.
        tune_overrides: values set on the tune config before each method's overlay (dotted keys or sections,
            e.g. ``{"data.init_args.batch_size": 2}``).
        device: device for tuning, sampling and metrics (``cpu``, ``cuda``).
        precision: Lightning precision of tuning (``32-true``, ``bf16-mixed``).
        inference_autocast: ``torch.autocast`` dtype of sampling and scoring: ``auto`` = bf16 on CUDA and off on
            the CPU (where bf16 is slow on many cores and changes the reference numbers), or ``bf16`` / ``fp16`` /
            ``off`` on any device. With CUDA present, TF32 matmuls are enabled either way.
        num_threads: torch CPU threads (None: leave as is); 1 is fastest for tiny models on a shared machine.
        bootstrap_samples: bootstrap resamples of the 95 % intervals (over concepts).
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
    if min(sampling.num_inference_steps, sampling.samples_per_prompt, sampling.batch_size) < 1:
        raise EvaluationConfigError(
            "sampling: num_inference_steps, samples_per_prompt and batch_size must be >= 1"
        )
    out = Path(out_dir)
    given = {
        "pretrained_model_name_or_path": pretrained_model_name_or_path,
        "image_encoder_name_or_path": image_encoder_name_or_path,
        "encoder_checkpoint": encoder_checkpoint,
    }
    overrides = {f"model.init_args.{k}": v for k, v in given.items() if v is not None}
    overrides.update(tune_overrides or {})
    base, concept_list, plans = make_plans(out, tune_config, methods, concepts, sweep, overrides)
    check_metric_files(metrics, concept_list)
    record = run_record(
        tune_config, overrides, plan_recipes(plans), methods, concepts, sampling, metrics, plan_inputs(plans)
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
        run = _Run(out, base, sampling, MetricSuite(metrics, device), device, precision, progress)
        run.autocast_dtype = autocast_dtype(inference_autocast, device)
        run.vocabulary = metrics.vocabulary
        write_json(out / METRICS_INFO, run.suite.describe())
        run.walls["load"] = time.perf_counter() - start
        run.execute(plans, concept_list)
        return run.report(
            plans, concept_list, record, start, bootstrap_samples, grids, reference_points, tensorboard
        )
    finally:
        torch.set_num_threads(threads)


class _Run:
    """State of one invocation: the results store, metric suite, sampling backbone, counters and timers."""

    def __init__(
        self,
        out: Path,
        base: TuneRecipe,
        sampling: SamplingSpec,
        suite: MetricSuite,
        device: str,
        precision: str,
        progress: bool,
    ) -> None:
        self.out, self.base, self.sampling, self.suite = out, base, sampling, suite
        self.device, self.precision, self.progress = device, precision, progress
        self.store = ResultsStore(out / "results.csv")
        self.walls = {"load": 0.0, "tuning": 0.0, "generation": 0.0, "scoring": 0.0}
        self.n_generated = self.n_tuned = 0
        self.backbone: DiffusionBackbone | None = None
        self.autocast_dtype: torch.dtype | None = None
        self.exported: ExportedSampler | None = None
        self.vocabulary: str | None = None
        self.words: NearestWords | None = None

    def inference_context(self) -> contextlib.AbstractContextManager:
        """Autocast for sampling and scoring (a no-op when ``autocast_dtype`` is None)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=self.autocast_dtype)

    def pending(self, plan: MethodPlan, concept: EvalConcept, setting: Setting) -> list[tuple[int, int]]:
        """(prompt index, sample) pairs of this group that have no row yet."""
        name, s = plan.spec.name, setting
        return [
            (i, k)
            for i in range(len(concept.prompts))
            for k in range(self.sampling.samples_per_prompt)
            if (name, concept.name, s.steps, s.alpha, s.guidance, i, k) not in self.store
        ]

    def _sampling_backbone(self, tuner: ConceptTuner | None) -> DiffusionBackbone:
        if self.backbone is None and tuner is not None and tuner.built and not tuner.module.modifies_backbone:
            # Same weights: reuse instead of loading again (never a UNet carrying a method's peft adapter).
            self.backbone = tuner.module.backbone
        if self.backbone is None:
            kw = self.base.model_kwargs
            dtype = kw.get("torch_dtype")
            self.backbone = load_backbone(  # SD 1.x / 2.x or SDXL, by the folder's model_index.json
                kw["pretrained_model_name_or_path"],
                kw.get("image_encoder_name_or_path", DEFAULT_IMAGE_ENCODER),
                placeholder=self.base.placeholder,
                torch_dtype=getattr(torch, dtype) if dtype else None,
                **({"variant": kw["variant"]} if kw.get("variant") else {}),
            )
        return self.backbone.to(self.device)

    def execute(self, plans: list[MethodPlan], concepts: list[EvalConcept]) -> None:
        """Tunes (or loads), generates and scores every pending row, appending rows group by group."""
        total = sum(len(self.pending(p, c, s)) for p in plans for c in concepts for s in p.settings)
        bar = tqdm(total=total, desc="evaluate", unit="img", disable=not self.progress, dynamic_ncols=True)
        for plan in plans:
            tuner = (
                ConceptTuner(plan.recipe, _accelerator(self.device), self.precision) if plan.recipe else None
            )
            for concept in concepts:
                todo = {s: keys for s in plan.settings if (keys := self.pending(plan, concept, s))}
                if not todo:
                    continue
                arts: dict[int, ConceptArtifact | None]
                if tuner is not None:
                    bar.set_postfix_str(f"{plan.spec.name}/{concept.name}: tuning")
                    arts = dict(self._snapshots(tuner, plan, concept, {s.steps for s in todo}))
                elif plan.kind == "plain_words":
                    arts = {0: None}
                elif plan.kind == "export":
                    folder = self.out / "artifacts" / str(plan.spec.export_of) / concept.name
                    arts = {
                        k: ConceptArtifact.load(snapshot_path(folder, k)) for k in {s.steps for s in todo}
                    }
                else:
                    arts = {plan.artifacts[concept.name].steps: plan.artifacts[concept.name]}
                backbone = self._sampling_backbone(tuner)
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
        bar.close()

    def _snapshots(
        self, tuner: ConceptTuner, plan: MethodPlan, concept: EvalConcept, needed: set[int]
    ) -> dict[int, ConceptArtifact]:
        """The saved snapshots when all needed ones exist, else those of a fresh tuning run."""
        folder = self.out / "artifacts" / plan.spec.name / concept.name
        paths = {k: snapshot_path(folder, k) for k in needed}
        if all(p.is_file() for p in paths.values()):
            return {k: ConceptArtifact.load(p) for k, p in paths.items()}
        begin = time.perf_counter()
        arts = tuner.tune(concept, plan.steps, folder)
        self.walls["tuning"] += time.perf_counter() - begin
        self.n_tuned += 1
        return arts

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
        nearest = self.nearest_word(art) if plan.kind in ("tuned", "artifacts") else ""
        group = [(i, k) for i in range(len(concept.prompts)) for k in range(self.sampling.samples_per_prompt)]
        size = max(self.sampling.batch_size, 1)
        for batch in (group[j : j + size] for j in range(0, len(group), size)):
            if missing.isdisjoint(batch):
                continue
            seeds = [image_seed(self.sampling.seed, concept.name, i, k) for i, k in batch]
            begin = time.perf_counter()
            with self.inference_context():
                arrays = self._generate(backbone, plan, concept, setting, art, [i for i, _ in batch], seeds)
            for (prompt_idx, sample), seed, array in zip(batch, seeds, arrays):
                if (prompt_idx, sample) not in missing:
                    continue  # regenerated only as a batch-mate; its row and PNG already exist
                rel = image_relpath(plan.spec.name, setting, concept.name, prompt_idx, sample)
                save_png(array, self.out / rel)
                images.append(from_uint8(array))
                rows.append(
                    {
                        "method": plan.spec.name,
                        "setting": setting.label,
                        "steps": setting.steps,
                        "alpha": setting.alpha,
                        "guidance": setting.guidance,
                        "concept": concept.name,
                        "class_noun": concept.class_noun,
                        "prompt_idx": prompt_idx,
                        "prompt": concept.prompts[prompt_idx],
                        "sample": sample,
                        "seed": seed,
                        "image": rel,
                        "tune_seconds": float(tune_seconds) if tune_seconds is not None else None,
                        "concept_words": concept.words,
                        "concept_kind": concept.kind or "",
                        "nearest_word": nearest,
                        "sampler": self.sampling.sampler,
                        "inference_steps": self.sampling.num_inference_steps,
                        "clip_backbone": self.suite.clip_backbone,
                        "dino_backbone": self.suite.dino_backbone or "",
                        "metrics_info": METRICS_INFO,
                    }
                )
                self.n_generated += 1
                bar.update(1)
            self.walls["generation"] += time.perf_counter() - begin
        begin = time.perf_counter()
        prompts = [r["prompt"] for r in rows]
        with self.inference_context():
            scores = self.suite.score(
                torch.stack(images).to(self.device),
                references,
                prompts,
                concept.words,
                self.base.placeholder,
                concept.input_reference_index,
                [concept.attributes[r["prompt_idx"]] for r in rows] if concept.attributes else None,
            )
        self.walls["scoring"] += time.perf_counter() - begin
        for i, row in enumerate(rows):
            row.update({k: (v[i] if v is not None else None) for k, v in scores.items()})
        self.store.append(rows)

    def _generate(
        self,
        backbone: DiffusionBackbone,
        plan: MethodPlan,
        concept: EvalConcept,
        setting: Setting,
        art: ConceptArtifact | None,
        prompt_ids: list[int],
        seeds: list[int],
    ) -> list[Any]:
        """One batch of images of a method: dual path, plain words, or the export in plain diffusers."""
        s, placeholder = self.sampling, self.base.placeholder
        prompts = [concept.prompts[i] for i in prompt_ids]
        if plan.kind == "plain_words":
            words = [p.replace(placeholder, concept.words) for p in prompts]
            return generate_plain(
                backbone, words, seeds, setting, s.num_inference_steps, s.sampler, s.negative_prompt
            )
        assert art is not None
        if plan.kind == "export":
            if self.exported is None or self.exported.export_format != plan.spec.export_format:
                self.exported = ExportedSampler(
                    self.base.model_kwargs["pretrained_model_name_or_path"],
                    plan.spec.export_format,
                    s.sampler,
                    self.device,
                )
            folder = self.out / "exports" / plan.spec.name / concept.name / f"s{art.steps}"
            word = self.exported.load(art, folder, concept.name)
            texts = [sampling_prompt(art, p, concept.class_noun).replace(placeholder, word) for p in prompts]
            latents = initial_latents(backbone, seeds)
            return self.exported.generate(texts, latents, setting, s.num_inference_steps, s.negative_prompt)
        return generate_images(
            backbone,
            art,
            [sampling_prompt(art, p, concept.class_noun) for p in prompts],
            seeds,
            setting,
            s.num_inference_steps,
            s.sampler,
            s.negative_prompt,
        )

    def nearest_word(self, art: ConceptArtifact | None) -> str:
        """The nearest word of a learned v* (``metrics.vocabulary`` words, else the artefact's own token);
        empty for a v* that is not learned (one-shot LoRA keeps the identifier's embedding)."""
        if art is None:
            return ""
        tuned = set(str(art.extra.get("tuned", "")).split(","))
        if not ({"embedding", "encoder"} & tuned or art.extra.get("init") == "encoder"):
            return ""
        if self.vocabulary is None:
            return word_of_token(art.nearest_token)
        if self.words is None:
            backbone = self._sampling_backbone(None)
            self.words = NearestWords(backbone.token_embedding_table(), backbone.tokenizer, self.vocabulary)
        return self.words(art.v_star)

    def report(
        self,
        plans: list[MethodPlan],
        concepts: list[EvalConcept],
        record: dict[str, Any],
        start: float,
        bootstrap_samples: int,
        grids: bool,
        reference_points: bool,
        tensorboard: bool,
    ) -> EvaluationResult:
        """Writes ``summary.json``, the grids, ``tradeoff.png`` (and TensorBoard logs) from every row."""
        begin = time.perf_counter()
        rows = self.store.rows
        aggregates = aggregate(rows, n_boot=bootstrap_samples)
        grid_paths = write_grids(self.out, rows, {c.name: c.load_input() for c in concepts}) if grids else []
        if any(a.get("identity_acc") and a.get("prompt_acc") for a in aggregates):
            # The checker's exact reading is the main plot; the CLIP similarities are the second.
            plot_tradeoff(
                aggregates,
                self.out / "tradeoff.png",
                x="prompt_acc",
                y="identity_acc",
                title="Checker: identity vs prompt accuracy (points: tuning steps; bars: 95% CI)",
            )
            plot_tradeoff(aggregates, self.out / "tradeoff_clip.png", reference_points=reference_points)
        else:
            plot_tradeoff(aggregates, self.out / "tradeoff.png", reference_points=reference_points)
        words = nearest_word_table(rows)
        if words["words"]:
            (self.out / "nearest_words.md").write_text(format_word_table(words) + "\n")
        kinds = sorted({r["concept_kind"] for r in rows if r.get("concept_kind")})
        by_kind = {
            k: aggregate([r for r in rows if r.get("concept_kind") == k], n_boot=bootstrap_samples)
            for k in kinds
        }
        if tensorboard:
            log_tensorboard(self.out / "tb", aggregates, grid_paths)
        self.walls["report"] = time.perf_counter() - begin
        self.walls["total"] = time.perf_counter() - start
        summary: dict[str, Any] = {
            "aggregates": aggregates,
            "aggregates_by_concept_kind": by_kind,
            "nearest_words": words,
            "aggregation": "mean over each concept's images, then over concepts; 95% CI: percentile bootstrap "
            f"over concepts ({bootstrap_samples} resamples, seed 0)",
            "metrics": self.suite.describe(),
            "config": record,
            "wall_seconds": self.walls,
            "counts": {"rows": len(self.store), "generated": self.n_generated, "tuned": self.n_tuned},
            "deduplicated_settings": {p.spec.name: p.aliases for p in plans if p.aliases},
            "inference_autocast": str(self.autocast_dtype).replace("torch.", "")
            if self.autocast_dtype
            else "off",
            "environment": {"torch": torch.__version__, "num_threads": torch.get_num_threads()},
        }
        if reference_points:
            summary["reference_points"] = {
                "source": "DreamBench (METHOD.md), SD 1.x scale",
                "points": REFERENCE_POINTS,
                "protocols": REFERENCE_PROTOCOLS,
            }
        write_json(self.out / "summary.json", summary)
        table = format_table(aggregates)
        if self.progress:
            print(table)
            print(
                f"{len(self.store)} rows in {self.out / 'results.csv'} ({self.n_generated} generated now); "
                f"summary.json, tradeoff.png; {self.walls['total']:.1f} s"
            )
        return EvaluationResult(
            self.out, aggregates, len(self.store), self.n_generated, self.n_tuned, dict(self.walls), table
        )


def sampling_prompt(art: ConceptArtifact, prompt: str, class_noun: str) -> str:
    """The prompt a method samples with: DreamBench's, or for an instance-prompt method (one-shot LoRA) the same
    prompt with "sks <class noun>" where it says the placeholder (v* is the embedding of "sks", so
    ``"<s*> dog"`` is the text "sks dog"). CLIP-T always scores the DreamBench prompt with the class noun."""
    if art.extra.get("instance_prompt"):
        return prompt.replace(art.placeholder, f"{art.placeholder} {class_noun}")
    return prompt


def autocast_dtype(mode: str, device: str) -> torch.dtype | None:
    """The autocast dtype of ``inference_autocast`` on ``device`` (None: no autocast)."""
    if mode == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]


def _accelerator(device: str) -> str:
    return "cpu" if device == "cpu" else "gpu" if device.startswith("cuda") else device
