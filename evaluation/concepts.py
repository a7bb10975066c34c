"""Concept sets for evaluation: held-out synthetic concepts (offline default) or DreamBench subjects.

Each concept carries what the harness needs: how to build its tuning data (a ``ConceptDataModule`` argument),
its input image (for grids), its real images (identity references), its class noun (CLIP-T) and its prompts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from datamodules.synthetic import concept_kind, concept_name, render_concept
from datamodules.transforms import augment, item_generator, load_rgb, pil_to_uint8_tensor, resize_center_crop
from evaluation.dreambench import DEFAULT_PROMPTS_FILE, DEFAULT_SUBJECTS_FILE, check_prompts, load_dreambench
from evaluation.spec import ConceptSetSpec, EvaluationConfigError

# Seed offset of the synthetic references' crops, so they are not the tuning data's own augmentations.
_REFERENCE_SEED_OFFSET = 0x5EF


@dataclass
class EvalConcept:
    """One concept to personalize and score.

    Attributes:
        name: unique name, used in paths and results (e.g. ``stripes_60``, ``dog6``).
        class_noun: replaces the placeholder in CLIP-T prompts (e.g. ``stripes``, ``dog``).
        prompts: evaluation prompts, each containing the placeholder.
        data_args: the concept's ``ConceptDataModule`` arguments (``image=...`` or ``synthetic_concept=...``).
        load_input: returns the one image the concept is learned from.
        load_references: returns the real images, (M, 3, H, W) float in [0, 1].
        input_reference_index: which of the references is the input image (None: none is); identity is also
            reported without it, since comparing with the input image rewards copying it.
        plain_words: the concept said in words (toy world: ``"red striped heart"``): CLIP-T replaces the
            placeholder by them (by ``class_noun`` when None), and the ``plain_words`` method prompts with them.
        attributes: per prompt, the scene it asks for (toy world: shape, colour, pattern, background, position,
            size), which the attribute checker compares its readings with.
        kind: the concept's kind (toy world: ``novel_shape`` or ``held_out_combo``), for per-kind summaries.
    """

    name: str
    class_noun: str
    prompts: list[str]
    data_args: dict[str, Any]
    load_input: Callable[[], Image.Image] = field(repr=False)
    load_references: Callable[[], Tensor] = field(repr=False)
    input_reference_index: int | None = None
    plain_words: str | None = None
    attributes: list[dict[str, str]] | None = None
    kind: str | None = None

    @property
    def words(self) -> str:
        """What replaces the placeholder in CLIP-T prompts: the plain words, else the class noun."""
        return self.plain_words or self.class_noun


def synthetic_references(seed: int, concept_id: int, num: int, size: int) -> Tensor:
    """Real images of a synthetic concept: its render plus ``num - 1`` fixed random crops / flips of it.

    Returns:
        (num, 3, size, size) float in [0, 1].
    """
    if num < 1:
        raise EvaluationConfigError(f"concepts.num_references must be >= 1, got {num}")
    big = render_concept(seed, concept_id, 2 * size)
    views = [resize_center_crop(big, size)]
    for k in range(1, num):
        views.append(augment(big, size, item_generator(seed + _REFERENCE_SEED_OFFSET, concept_id, k)))
    return torch.stack([pil_to_uint8_tensor(v) for v in views]).float() / 255.0


def _synthetic(spec: ConceptSetSpec, placeholder: str) -> list[EvalConcept]:
    if not spec.prompts:
        raise EvaluationConfigError(
            "concepts.prompts is required for synthetic concepts (with the placeholder)"
        )
    prompts = _checked(spec.prompts, placeholder, "concepts.prompts", spec.max_prompts)
    if not spec.synthetic_ids:
        raise EvaluationConfigError("concepts.synthetic_ids is empty")
    if any(i < 0 for i in spec.synthetic_ids):
        raise EvaluationConfigError(f"concepts.synthetic_ids must be >= 0, got {spec.synthetic_ids}")
    concepts = []
    for cid in spec.synthetic_ids:
        s, n, size = spec.synthetic_seed, spec.num_references, spec.reference_size
        concepts.append(
            EvalConcept(
                name=concept_name(s, cid),
                class_noun=concept_kind(s, cid),
                prompts=list(prompts),
                data_args={"synthetic_concept": cid, "synthetic_seed": s},
                load_input=lambda s=s, cid=cid, size=size: render_concept(s, cid, size),
                load_references=lambda s=s, cid=cid, n=n, size=size: synthetic_references(s, cid, n, size),
                input_reference_index=0,  # the un-augmented render: the image the concept is tuned from
            )
        )
    return concepts


def _dreambench(spec: ConceptSetSpec, placeholder: str) -> list[EvalConcept]:
    if not spec.dreambench_root:
        raise EvaluationConfigError("concepts.dreambench_root is required for concepts.kind=dreambench")
    root = Path(spec.dreambench_root)
    if not root.is_dir():
        raise EvaluationConfigError(f"DreamBench root {root} does not exist (concepts.dreambench_root)")
    try:
        subjects = load_dreambench(
            root,
            subjects=spec.subjects,
            input_image_index=spec.input_image_index,
            prompts_file=spec.prompts_file or DEFAULT_PROMPTS_FILE,
            subjects_file=spec.subjects_file or DEFAULT_SUBJECTS_FILE,
            placeholder=placeholder,
        )
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise EvaluationConfigError(str(err).strip("'\"")) from err
    concepts = []
    for sub in subjects:
        prompts = spec.prompts if spec.prompts else sub.prompts
        prompts = _checked(prompts, placeholder, f"prompts of subject {sub.name!r}", spec.max_prompts)
        paths, size = list(sub.image_paths), spec.reference_size
        concepts.append(
            EvalConcept(
                name=sub.name,
                class_noun=sub.class_noun,
                prompts=prompts,
                data_args={"image": str(sub.input_image), "class_noun": sub.class_noun},
                load_input=lambda p=sub.input_image: load_rgb(p),
                load_references=lambda paths=paths, size=size: _load_references(paths, size),
                input_reference_index=paths.index(sub.input_image),
            )
        )
    return concepts


def _load_references(paths: list[Path], size: int) -> Tensor:
    views = [resize_center_crop(load_rgb(p), size) for p in paths]
    return torch.stack([pil_to_uint8_tensor(v) for v in views]).float() / 255.0


def _checked(prompts: list[str], placeholder: str, where: str, max_prompts: int | None) -> list[str]:
    try:
        checked = check_prompts(prompts, placeholder, where)
    except ValueError as err:
        raise EvaluationConfigError(str(err)) from err
    if max_prompts is not None:
        if max_prompts < 1:
            raise EvaluationConfigError(f"concepts.max_prompts must be >= 1, got {max_prompts}")
        checked = checked[:max_prompts]
    return checked


def load_concepts(spec: ConceptSetSpec, placeholder: str) -> list[EvalConcept]:
    """Builds the concept set; every prompt is checked for the placeholder and every folder for existence.

    Args:
        spec: which concepts and prompts.
        placeholder: the pseudo-word the prompts must contain (the tuning config's ``placeholder``).

    Raises:
        EvaluationConfigError: a prompt without the placeholder, a missing subject folder or root, an empty set,
            or duplicate concept names.
    """
    if spec.kind == "toyworld":
        from evaluation.toyworld_concepts import toyworld_concepts  # imports EvalConcept from here

        concepts = toyworld_concepts(spec.toyworld, spec.num_references, placeholder)
    elif spec.kind == "synthetic":
        concepts = _synthetic(spec, placeholder)
    else:
        concepts = _dreambench(spec, placeholder)
    names = [c.name for c in concepts]
    if len(set(names)) != len(names):
        raise EvaluationConfigError(f"duplicate concept names {names}")
    return concepts
