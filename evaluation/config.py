"""Stage 1 of an evaluation, its configuration: the typed run-wide options of ``evaluate.py run`` (methods, the
swept settings, sampling). jsonargparse turns these dataclasses into documented ``--group.option`` flags and YAML
sections (``configs/evaluate/*.yaml``). The concept set and the metrics are typed by their own stages
(``evaluation.concepts.ConceptSet`` variants, ``evaluation.metrics.suite.MetricSpec``).

Stages, each importing only earlier ones: config -> concepts -> plan (recipe) -> tuning -> generate -> metrics
-> store -> report; ``harness.py`` wires them.
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
        overlay: tune YAML merged over ``tune_config`` (e.g. ``configs/tune/methods/textual_inversion.yaml``).
        overrides: values set on the merged tune config, by dotted key
            (``{"model.init_args.nn_weight": 0.0}``) or as nested sections (``{"model": {"init_args": ...}}``).
        artifacts: folder of concept artefacts ``<concept>.safetensors`` to evaluate as they are (no tuning);
            each is one setting with the artefact's own step count.
        plain_words: no concept at all: the prompts with the placeholder replaced by the concept's plain words
            (what a user gets for free from the base model; needs concepts with plain words, e.g. the toy world's).
        export_of: the name of an earlier tuned method whose concepts are exported (``export_format``), loaded
            into a plain diffusers ``StableDiffusionPipeline`` with ``load_lora_weights`` +
            ``load_textual_inversion`` and sampled there: the single-path approximation (alpha 1) users get.
        export_format: ``diffusers`` (``ConceptArtifact.export_diffusers``) or ``kohya``
            (``ConceptArtifact.export_kohya``, the web UIs' files; the prompt word is the file name).
        steps: tuning step counts to evaluate for this method (default: ``sweep.steps``, capped at the
            overlay's ``trainer.max_steps`` when the overlay sets one, as ``methods/encoder_only.yaml`` does).
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
