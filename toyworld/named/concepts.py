"""Toy-world concepts for evaluation: held-out identities, one input image each, prompts that change the context.
They plug into ``evaluate.py run`` as a concept set (``concepts: {class_path: toyworld.ToyWorldConcepts}``).

A concept is an identity (colour, pattern, shape) the base model never saw: a novel shape (``HELD_OUT_SHAPES``) or a
held-out combination (``HELD_OUT_COMBOS``). It is learned from ONE image at a fixed context (large, in the center,
on a contrasting background; ``assets/toyworld/concepts/``) and asked for in other contexts ("a small <s*> on the
left on a yellow background"); the attribute checker then reads whether the identity stayed and the context
changed as asked.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from datamodules.transforms import load_rgb
from evaluation.concepts.base import ConceptSet, EvalConcept
from evaluation.config import EvaluationConfigError
from toyworld.named.world import (
    ATTRIBUTES,
    COLOUR_NAMES,
    HELD_OUT_CONCEPTS,
    HELD_OUT_SHAPES,
    POSITIONS,
    SIZES,
    VALUES,
    Scene,
    caption,
    is_held_out,
    render,
)

RESOLUTION = 32  # the world's native size: the base model, checker and tiny CLIP all work at 32 px
CONCEPTS_FILE = "concepts.json"
_KEYS = ("name", "image", "kind", "class_noun", "words", "template", "attributes")
_REFERENCE_SALT = 0x5EF


def _rng(seed: int, name: str, salt: int = 0) -> np.random.Generator:
    digest = int.from_bytes(hashlib.sha256(f"{seed}|{name}|{salt}".encode()).digest()[:8], "big")
    return np.random.default_rng(digest)


def other_contexts(colour: str, exclude: tuple[str, str, str]) -> list[tuple[str, str, str]]:
    """Every (background, position, size) the world allows for an object of ``colour``, ``exclude`` left out."""
    return [
        (b, p, s)
        for b in COLOUR_NAMES
        if b != colour
        for p in POSITIONS
        for s in SIZES
        if (b, p, s) != exclude
    ]


def prompt_contexts(
    colour: str, n: int, seed: int, name: str, exclude: tuple[str, str, str], salt: int = 0
) -> list[tuple[str, str, str]]:
    """``n`` distinct contexts drawn with (seed, concept name, salt), never ``exclude`` (the input's)."""
    pool = other_contexts(colour, exclude)
    if not 0 <= n <= len(pool):
        raise EvaluationConfigError(f"need between 0 and {len(pool)} contexts per concept, got {n}")
    return [pool[i] for i in _rng(seed, name, salt).permutation(len(pool))[:n]]


def _check_entry(entry: dict[str, Any], where: str) -> Scene:
    missing = [k for k in _KEYS if k not in entry]
    if missing:
        raise EvaluationConfigError(f"{where}: concept entry lacks {missing}")
    attrs = entry["attributes"]
    bad = [a for a in ATTRIBUTES if attrs.get(a) not in VALUES[a]]
    if bad:
        raise EvaluationConfigError(f"{where}: concept {entry['name']!r} has unknown values of {bad}")
    scene = Scene(**{a: attrs[a] for a in ATTRIBUTES})
    # Validation concepts (kind "validation", toyworld.named.validation) are objects of the base distribution on
    # purpose: settings are chosen on them, never on the held-out test concepts. Novel-shape validation concepts
    # (kind "validation_novel_shape") have a held-out shape in a look no test concept has.
    held_out = is_held_out(scene)
    kind = entry.get("kind")
    if kind == "validation" and held_out:
        raise EvaluationConfigError(
            f"{where}: validation concept {entry['name']!r} is a held-out test object"
        )
    if kind == "validation_novel_shape" and (
        scene.shape not in HELD_OUT_SHAPES or scene.identity in HELD_OUT_CONCEPTS
    ):
        raise EvaluationConfigError(
            f"{where}: novel-shape validation concept {entry['name']!r} must be a held-out shape in a look no "
            "test concept has"
        )
    if kind not in ("validation", "validation_novel_shape") and not held_out:
        raise EvaluationConfigError(
            f"{where}: concept {entry['name']!r} ({entry['words']}) is in the base training distribution"
        )
    if "{}" not in entry["template"]:
        raise EvaluationConfigError(f"{where}: template of {entry['name']!r} has no '{{}}'")
    return scene


def _references(scenes: list[Scene]) -> Tensor:
    arrays = np.stack([render(s, RESOLUTION) for s in scenes])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255.0


class ToyWorldConcepts(ConceptSet):
    """Held-out concepts of the toy world and the contexts they are asked in (see the module docstring).

    Args:
        concepts_dir: folder of the concepts' input images and ``concepts.json`` (``python -m toyworld
            write-concepts``): per concept its ``name``, ``image``, ``kind``, ``class_noun``, ``words``,
            ``template`` (the input image's caption with ``{}``) and the input scene's ``attributes``.
        names: the concepts to evaluate, in order (None: all of ``concepts.json``).
        num_prompts: prompts per concept: distinct (background, position, size) contexts drawn with ``seed``,
            never the input image's context and never a background of the object's colour.
        seed: seed of the prompt contexts and of the reference contexts.
        num_references: real images per concept for identity metrics: the input render plus renders of the
            concept in ``num_references - 1`` other random contexts.
    """

    # More names or prompts only add rows (prompt i is the same for any num_prompts > i).
    row_selection = ("names", "num_prompts")

    def __init__(
        self,
        concepts_dir: str = "assets/toyworld/concepts",
        names: list[str] | None = None,
        num_prompts: int = 6,
        seed: int = 0,
        num_references: int = 4,
    ) -> None:
        self.concepts_dir, self.names, self.num_prompts = concepts_dir, names, num_prompts
        self.seed, self.num_references = seed, num_references

    def load(self, placeholder: str) -> list[EvalConcept]:
        """The concepts; see :func:`toyworld_concepts`."""
        return toyworld_concepts(self, placeholder)


def read_concept_index(
    folder: Path, names: list[str] | None, num_references: int, write_command: str
) -> list[tuple[str, dict]]:
    """The ``(name, entry)`` pairs of ``names`` (None: all) from ``folder/concepts.json``, each with its image file.

    Raises:
        EvaluationConfigError: a missing index or image, an unknown name, ``num_references < 1``; the message names
            ``python -m toyworld <write_command>`` as the way to write the folder.
    """
    index = Path(folder) / CONCEPTS_FILE
    if not index.is_file():
        raise EvaluationConfigError(
            f"{index} does not exist (concepts.concepts_dir; write it with `python -m toyworld {write_command}`)"
        )
    entries = {e["name"]: e for e in json.loads(index.read_text())}
    names = list(names) if names is not None else list(entries)
    unknown = [n for n in names if n not in entries]
    if unknown or not names:
        raise EvaluationConfigError(f"concepts.names {unknown or names} not in {index} ({list(entries)})")
    if num_references < 1:
        raise EvaluationConfigError(f"concepts.num_references must be >= 1, got {num_references}")
    for name in names:
        image = Path(folder) / entries[name]["image"]
        if not image.is_file():
            raise EvaluationConfigError(f"input image {image} of concept {name!r} does not exist")
    return [(name, entries[name]) for name in names]


def toyworld_concepts(spec: ToyWorldConcepts, placeholder: str) -> list[EvalConcept]:
    """The evaluation concepts of the toy world (see the module docstring).

    Each concept is tuned from its image file with its own caption as the only template (``data_args``). Its
    ``attributes[i]`` is the scene prompt ``i`` asks for; its references are the input image (index 0) and renders
    of the concept in ``num_references - 1`` other random contexts; ``class_noun`` is the shape word (``object``
    for a novel shape, which has no word); ``plain_words`` is e.g. ``"red striped star"``.

    Raises:
        EvaluationConfigError: a missing folder, file or concept name, an entry of the base distribution, bad counts.
    """
    folder = Path(spec.concepts_dir)
    index = folder / CONCEPTS_FILE
    concepts = []
    for name, entry in read_concept_index(folder, spec.names, spec.num_references, "write-concepts"):
        scene = _check_entry(entry, str(index))
        image = folder / entry["image"]
        input_ctx = (scene.background, scene.position, scene.size)
        prompts = [
            Scene(scene.shape, scene.colour, scene.pattern, *c)
            for c in prompt_contexts(scene.colour, spec.num_prompts, spec.seed, name, input_ctx)
        ]
        others = prompt_contexts(
            scene.colour, spec.num_references - 1, spec.seed, name, input_ctx, _REFERENCE_SALT
        )
        references = [scene] + [Scene(scene.shape, scene.colour, scene.pattern, *c) for c in others]
        concepts.append(
            EvalConcept(
                name=name,
                class_noun=entry["class_noun"],
                prompts=[caption(s, identity=placeholder) for s in prompts],
                data_args={
                    "image": str(image),
                    "class_noun": entry["class_noun"],
                    "templates": [entry["template"]],
                },
                load_input=lambda p=image: load_rgb(p),
                load_references=lambda scenes=references: _references(scenes),
                input_reference_index=0,
                plain_words=entry["words"],
                attributes=[{a: getattr(s, a) for a in ATTRIBUTES} for s in prompts],
                kind=entry["kind"],
            )
        )
    return concepts
