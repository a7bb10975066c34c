"""Typed options of ``evaluate.py run``: what to evaluate (methods, concepts), the swept settings, sampling and
the metric backbones. jsonargparse turns these dataclasses into documented ``--group.option`` flags and YAML
sections (``configs/evaluate/*.yaml``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


class EvaluationConfigError(ValueError):
    """A configuration that cannot run (missing file, prompt without placeholder, ...); raised before any work."""


@dataclass
class MethodSpec:
    """One method or ablation: a tuning recipe (tune YAML + overlay + overrides) or a folder of artefacts.

    Args:
        name: name in results and plots (e.g. ``date``, ``textual_inversion``); also a folder name.
        overlay: tune YAML merged over ``tune_config`` (e.g. ``configs/tune/tiny_textual_inversion.yaml``).
        overrides: values set on the merged tune config, by dotted key
            (``{"model.init_args.nn_weight": 0.0}``) or as nested sections (``{"model": {"init_args": ...}}``).
        artifacts: folder of concept artefacts ``<concept>.safetensors`` to evaluate as they are (no tuning);
            each is one setting with the artefact's own step count.
        plain_words: no concept at all: the prompts with the placeholder replaced by the concept's plain words
            (what a user gets for free from the base model; needs concepts with plain words, e.g. the toy world).
        export_of: the name of an earlier tuned method whose concepts are exported (``export_format``), loaded
            into a plain diffusers ``StableDiffusionPipeline`` with ``load_lora_weights`` +
            ``load_textual_inversion`` and sampled there: the single-path approximation (alpha 1) users get.
        export_format: ``diffusers`` (``ConceptArtifact.export_diffusers``) or ``kohya``
            (``ConceptArtifact.export_kohya``, the web UIs' files; the prompt word is the file name).
        steps: tuning step counts to evaluate for this method (default: ``sweep.steps``, capped at the
            overlay's ``trainer.max_steps`` when the overlay sets one, as ``tiny_encoder_only.yaml`` does).
        alphas: dual-path alphas for this method (default: ``sweep.alphas``).
        guidance_scales: classifier-free guidance scales for this method (default: ``sweep.guidance_scales``).
    """

    name: str
    overlay: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    artifacts: str | None = None
    plain_words: bool = False
    export_of: str | None = None
    export_format: Literal["diffusers", "kohya"] = "diffusers"
    steps: list[int] | None = None
    alphas: list[float] | None = None
    guidance_scales: list[float] | None = None


@dataclass
class ToyWorldSpec:
    """Held-out concepts of the toy world (``datamodules.toyworld``) and the contexts they are asked in.

    Args:
        concepts_dir: folder of the concepts' input images and ``concepts.json`` (``python -m datamodules.toyworld
            write-concepts``): per concept its ``name``, ``image``, ``kind``, ``class_noun``, ``words``,
            ``template`` (the input image's caption with ``{}``) and the input scene's ``attributes``.
        names: the concepts to evaluate, in order (None: all of ``concepts.json``).
        num_prompts: prompts per concept: distinct (background, position, size) contexts drawn with ``seed``,
            never the input image's context and never a background of the object's colour.
        seed: seed of the prompt contexts and of the reference contexts.
    """

    concepts_dir: str = "assets/toyworld/concepts"
    names: list[str] | None = None
    num_prompts: int = 6
    seed: int = 0


@dataclass
class ConceptSetSpec:
    """Which concepts to personalize and with which prompts.

    Args:
        kind: ``synthetic`` (held-out procedural concepts, offline), ``dreambench`` (subject folders) or
            ``toyworld`` (held-out toy-world concepts, ``toyworld``; prompts and their checked attributes are
            generated, ``prompts`` is ignored).
        synthetic_ids: synthetic concept ids (use ids held out of pretraining: the tiny pretraining holds out
            the last 4 of 64, i.e. 60-63).
        synthetic_seed: seed of the synthetic concept set (as in the pretraining config).
        num_references: real images per synthetic concept for identity metrics: the un-augmented render plus
            ``num_references - 1`` fixed random crops / flips of it (toy world: the input render plus renders of
            the concept in ``num_references - 1`` other random contexts).
        reference_size: pixel size of the synthetic reference images.
        prompts: evaluation prompts with the placeholder; required for ``synthetic``; for ``dreambench`` they
            replace the object / live-subject lists.
        max_prompts: use only the first N prompts of each concept (None: all).
        dreambench_root: DreamBench ``dataset/`` folder (one sub-folder per subject).
        subjects: DreamBench subjects to evaluate, in order (None: all of ``subjects_file``).
        input_image_index: index of the one image each subject is learned from (sorted file names).
        prompts_file: DreamBench prompt lists (None: ``evaluation/data/dreambench_prompts.json``).
        subjects_file: DreamBench subjects and class nouns (None: ``evaluation/data/dreambench_subjects.json``).
        toyworld: the toy-world concepts and contexts (``kind: toyworld``).
    """

    kind: Literal["synthetic", "dreambench", "toyworld"] = "synthetic"
    synthetic_ids: list[int] = field(default_factory=lambda: [60, 61])
    synthetic_seed: int = 0
    num_references: int = 4
    reference_size: int = 64
    prompts: list[str] | None = None
    max_prompts: int | None = None
    dreambench_root: str | None = None
    subjects: list[str] | None = None
    input_image_index: int = 0
    prompts_file: str | None = None
    subjects_file: str | None = None
    toyworld: ToyWorldSpec = field(default_factory=ToyWorldSpec)


@dataclass
class SweepGrid:
    """One more cartesian grid of settings (e.g. an alpha grid at one step count); None = the sweep's list.

    Args:
        steps: tuning step counts.
        alphas: dual-path alphas.
        guidance_scales: guidance scales.
    """

    steps: list[int] | None = None
    alphas: list[float] | None = None
    guidance_scales: list[float] | None = None


@dataclass
class SweepSpec:
    """Settings that make a trade-off curve; every combination is one point per method.

    Args:
        steps: tuning step counts, snapshotted from one tuning run per concept (0 = the initial prediction).
        alphas: dual-path blend at sampling (1 = adapted path only, 0 = vanilla model on the hard prompt).
        guidance_scales: classifier-free guidance scales.
        grids: further grids whose settings are added to ``steps x alphas x guidance_scales`` (duplicates are
            evaluated once); a method's own ``steps`` / ``alphas`` / ``guidance_scales`` replace the same list in
            every grid.
    """

    steps: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8, 12])
    alphas: list[float] = field(default_factory=lambda: [0.5, 1.0])
    guidance_scales: list[float] = field(default_factory=lambda: [7.5])
    grids: list[SweepGrid] = field(default_factory=list)


@dataclass
class SamplingSpec:
    """How images are generated. Each image starts from the noise of its own seed; batches are fixed slices of
    a (method, concept, setting) group's (prompt, sample) list, so a missing image is regenerated exactly by
    regenerating its batch (with ``batch_size: 1``, alone).

    Args:
        num_inference_steps: denoising steps.
        sampler: ``ddim`` or ``dpm`` (DPM-Solver++ multistep).
        samples_per_prompt: images per (concept, prompt, setting).
        seed: base seed; image seed = SHA-256 of (seed, concept, prompt index, sample index), shared by all
            methods and settings so that they are compared on the same initial noise.
        negative_prompt: text of the unconditional branch.
        batch_size: images per sampling call (1: each image alone; larger is faster on a GPU).
    """

    num_inference_steps: int = 50
    sampler: Literal["ddim", "dpm"] = "ddim"
    samples_per_prompt: int = 4
    seed: int = 0
    negative_prompt: str = ""
    batch_size: int = 1


@dataclass
class MetricSpec:
    """Backbones of the identity (CLIP-I, DINO) and prompt (CLIP-T) similarities.

    Args:
        clip: CLIP model folder or cached hub id for CLIP-I and CLIP-T.
        dino: DINO ViT folder or cached hub id for the DINO score (None: skip DINO).
        tiny_models_dir: if set, use (and build when missing) the tiny offline CLIP and DINO models in this
            folder instead of ``clip`` / ``dino``; their numbers only test the plumbing.
        batch_size: images per metric forward pass.
        clip_tokenizer: folder of the CLIP tokenizer when ``clip`` has none (the toy world's pipeline/tokenizer).
        clip_processor: folder of the ``preprocessor_config.json`` when ``clip`` has none.
        checker: attribute-checker folder (``models.checker``, toy world): per image, identity accuracy (shape,
            colour, pattern all as the concept's; and each alone) and prompt accuracy (background, position,
            size all as asked; and each alone). Needs concepts with checked attributes (``kind: toyworld``).
        vocabulary: words file (one a line, ``#`` comments) the nearest word of each v* is searched among
            (None: the artefact's own nearest token).
    """

    clip: str = "openai/clip-vit-base-patch32"
    dino: str | None = "facebook/dino-vits16"
    tiny_models_dir: str | None = None
    batch_size: int = 32
    clip_tokenizer: str | None = None
    clip_processor: str | None = None
    checker: str | None = None
    vocabulary: str | None = None
