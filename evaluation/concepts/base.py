"""The concept of an evaluation and the base of every concept set.

Each concept carries what the harness needs: how to build its tuning data (a ``ConceptDataModule`` argument),
its input image (for grids), its real images (identity references), its class noun (CLIP-T) and its prompts.
A concept set's options are its ``__init__`` arguments; those that change existing rows are its resume key.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from torch import Tensor

from evaluation.config import EvaluationConfigError

PLACEHOLDER = "<s*>"


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
        plain_words: the concept said in words (e.g. ``"red striped heart"``): CLIP-T replaces the
            placeholder by them (by ``class_noun`` when None), and the ``plain_words`` method prompts with them.
        attributes: per prompt, what it asks for (e.g. a scene's shape, colour, ..., size), which a checking
            metric plugin compares its readings with.
        kind: the concept's kind (e.g. ``novel_shape`` or ``held_out_combination``), for per-kind summaries.
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


class ConceptSet:
    """A set of concepts, configured by its ``__init__`` arguments (the ``concepts:`` YAML section with a
    ``class_path``), that loads itself.

    ``row_selection`` names the options that only add or drop concepts or prompts (a resumed run may change
    them); every other option changes existing rows and is part of :meth:`resume_key`.
    """

    row_selection: tuple[str, ...] = ()

    def load(self, placeholder: str) -> list[EvalConcept]:
        """The concepts; every prompt is checked for ``placeholder`` and every file for existence.

        Raises:
            EvaluationConfigError: anything that cannot run.
        """
        raise NotImplementedError(f"{type(self).__name__} does not define load()")

    def settings(self) -> dict[str, Any]:
        """Every option (``__init__`` argument) with its value."""
        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        return {n: getattr(self, n) for n in names}

    def resume_key(self) -> dict[str, Any]:
        """The class and the options that change existing rows: a folder resumes only when they are equal."""
        cls = type(self)
        key = {k: v for k, v in self.settings().items() if k not in self.row_selection}
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", **key}


def check_prompts(prompts: Sequence[str], placeholder: str = PLACEHOLDER, where: str = "") -> list[str]:
    """Returns ``prompts`` as a list after checking that each one contains the placeholder.

    Raises:
        ValueError: naming the first prompt without the placeholder (and ``where`` it came from).
    """
    for prompt in prompts:
        if not isinstance(prompt, str) or placeholder not in prompt:
            source = f" in {where}" if where else ""
            raise ValueError(f"prompt {prompt!r}{source} does not contain the placeholder {placeholder!r}")
    return list(prompts)


def checked_prompts(prompts: list[str], placeholder: str, where: str, max_prompts: int | None) -> list[str]:
    """:func:`check_prompts` as a configuration error, cut to the first ``max_prompts`` (None: all)."""
    try:
        checked = check_prompts(prompts, placeholder, where)
    except ValueError as err:
        raise EvaluationConfigError(str(err)) from err
    if max_prompts is not None:
        if max_prompts < 1:
            raise EvaluationConfigError(f"concepts.max_prompts must be >= 1, got {max_prompts}")
        checked = checked[:max_prompts]
    return checked


def load_concepts(concepts: ConceptSet, placeholder: str) -> list[EvalConcept]:
    """The concept set's concepts, with unique names.

    Raises:
        EvaluationConfigError: whatever the set raises, or duplicate concept names.
    """
    loaded = concepts.load(placeholder)
    names = [c.name for c in loaded]
    if len(set(names)) != len(names):
        raise EvaluationConfigError(f"duplicate concept names {names}")
    return loaded
