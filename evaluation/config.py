"""Stage 1 of an evaluation, its configuration: the typed run-wide options of ``evaluate.py run`` (methods, the
swept settings, sampling). jsonargparse turns these dataclasses into documented ``--group.option`` flags and YAML
sections (``configs/evaluate/*.yaml``). The concept set and the metrics are typed by their own stages
(``evaluation.concepts.ConceptSet`` variants, ``evaluation.metrics.suite.MetricSpec``).

Stages, each importing only earlier ones: config -> concepts -> plan (recipe) -> tuning -> generate -> metrics
-> store -> report; ``harness.py`` wires them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import MISSING, dataclass, field, fields
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


def _config_files(argv: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(path, mapping)`` of each YAML file named by ``--config`` in ``argv``, in order; a missing or malformed file,
    or one that is not a mapping, is skipped (the parser names it itself)."""
    import yaml

    paths = [b for a, b in zip(argv, argv[1:]) if a == "--config"]
    paths += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(data, dict):
            yield path, data


def check_stacked_methods(argv: list[str]) -> None:
    """Refuses a method that would silently inherit fields from another method of an earlier ``--config``.

    jsonargparse (4.x, measured) replaces the ``methods`` list when a later config's list has another length, but
    merges it item by item, by position, when the lengths are equal: a method that does not set ``plain_words``,
    ``overlay``, ``steps``, ... then takes the value of whichever method sat at its index before (an ablation
    would run the encoder-only overlay, or be the plain words). Each field such an item leaves out must be the
    default, or the same in the earlier item. Reads only the YAML files named by ``--config``; anything else is
    left to the parser.

    Raises:
        EvaluationConfigError: one line naming the file, the method, the fields and where they would come from.
    """
    defaults = {
        f.name: f.default if f.default_factory is MISSING else f.default_factory() for f in fields(MethodSpec)
    }
    # per index: the fields set so far, and the file that set them
    merged: list[tuple[dict[str, Any], str]] = []
    for path, data in _config_files(argv):
        items = data.get("methods")
        if not isinstance(items, list):
            continue
        items = [item if isinstance(item, dict) else {} for item in items]
        if len(items) != len(merged):  # another length: the list is replaced
            merged = [(dict(item), path) for item in items]
            continue
        for i, item in enumerate(items):
            earlier, source = merged[i]
            inherited = sorted(
                k for k, v in earlier.items() if k not in item and k in defaults and v != defaults[k]
            )
            if inherited:
                raise EvaluationConfigError(
                    f"{path}: methods[{i}] ({item.get('name')}) would inherit {', '.join(inherited)} from "
                    f"methods[{i}] ({earlier.get('name')}) of {source} (a methods list of the same length is "
                    f"merged item by item): set {'them' if len(inherited) > 1 else 'it'} in {path}"
                )
            merged[i] = ({**earlier, **item}, path)


def replaced_tune_overrides(argv: list[str]) -> list[str]:
    """Notes for each ``--config`` whose ``tune_overrides`` drops keys an earlier one set.

    jsonargparse (4.x, measured) replaces a mapping option given again by a later config instead of merging it: the
    keys the earlier ``tune_overrides`` set and the later one leaves out fall back to the tune config's own values
    (the attention-only encoder for the SD recipe's, the named world's vocabulary for the instance world's, ...).
    Reads only the YAML files named by ``--config``.

    Returns:
        one line per such config, naming it, the earlier config and the keys that fall back.
    """
    notes: list[str] = []
    earlier: tuple[dict[str, Any], str] | None = None
    for path, data in _config_files(argv):
        overrides = data.get("tune_overrides")
        if not isinstance(overrides, dict):
            continue
        if earlier is not None:
            dropped = sorted(k for k in earlier[0] if k not in overrides)
            if dropped:
                notes.append(
                    f"{path}: its tune_overrides replace those of {earlier[1]} (a mapping given again is not "
                    f"merged): {', '.join(dropped)} fall back to the tune config's values"
                )
        earlier = (overrides, path)
    return notes
