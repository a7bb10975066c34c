"""The instance world's concepts for evaluation (``toyworld/instance/world.py``): held-out instances of known categories
and instances of held-out categories, one input image each, asked for in other contexts. They plug into
``evaluate.py run`` as a concept set, with the pixel metric (``toyworld.instance.pixels.PixelIdentityMetric``)::

    concepts: {class_path: toyworld.instance.concepts.InstanceConcepts,
               init_args: {concepts_dir: assets/toyworld/instance_concepts}}
    metrics: {plugins: [{class_path: toyworld.instance.pixels.PixelIdentityMetric}]}

The folder has the world's layout (``<name>.png`` + ``concepts.json``, written by ``python -m toyworld
instance-concepts``); each entry also holds the instance's details (``instance``), from which the references are
rendered.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.transforms import load_rgb
from evaluation.concepts.base import EvalConcept
from evaluation.config import EvaluationConfigError
from toyworld.instance.render import render
from toyworld.instance.world import (
    HELD_OUT_CATEGORIES,
    TEST_CATEGORIES,
    TRAIN_CATEGORIES,
    VALIDATION_CATEGORIES,
    Context,
    Instance,
    all_contexts,
    backgrounds_for,
    caption,
    instance_split,
    sample_instance,
)
from toyworld.named.concepts import CONCEPTS_FILE, ToyWorldConcepts, read_concept_index
from toyworld.named.world import COLOURS, seeded_rng

_KEYS = ("name", "image", "kind", "class_noun", "words", "template", "attributes", "instance", "split")
_REFERENCE_SALT = 0x5EF


def _entry(entry: dict[str, Any], where: str) -> Instance:
    missing = [k for k in _KEYS if k not in entry]
    if missing:
        raise EvaluationConfigError(f"{where}: instance concept entry lacks {missing}")
    try:
        inst = Instance.from_json(entry["instance"])
        split = instance_split(inst)
    except (KeyError, TypeError, ValueError) as e:
        raise EvaluationConfigError(
            f"{where}: concept {entry['name']!r} has bad instance details: {e}"
        ) from e
    if split == "train":
        raise EvaluationConfigError(
            f"{where}: concept {entry['name']!r} is an instance of the base training distribution"
        )
    if split != entry["split"]:
        raise EvaluationConfigError(
            f"{where}: concept {entry['name']!r} says split {entry['split']!r} but its instance is in {split!r}"
        )
    if "{}" not in entry["template"]:
        raise EvaluationConfigError(f"{where}: template of {entry['name']!r} has no '{{}}'")
    return inst


class InstanceConcepts(ToyWorldConcepts):
    """Concepts of the instance world (see the module docstring); the options are ``ToyWorldConcepts``'s.

    Args:
        concepts_dir: folder written by ``python -m toyworld instance-concepts`` (test:
            ``assets/toyworld/instance_concepts``, validation: ``assets/toyworld/instance_validation_concepts``).
        names: the concepts to evaluate, in order (None: all).
        num_prompts: prompts per concept: distinct (background, position, size) contexts drawn with ``seed`` and
            the concept's name, never the input image's, never a background close to the object's colours.
        seed: seed of the prompt and reference contexts.
        num_references: the input image plus renders of the instance in ``num_references - 1`` other contexts.
    """

    def __init__(
        self,
        concepts_dir: str = "assets/toyworld/instance_concepts",
        names: list[str] | None = None,
        num_prompts: int = 6,
        seed: int = 0,
        num_references: int = 4,
    ) -> None:
        super().__init__(concepts_dir, names, num_prompts, seed, num_references)

    def load(self, placeholder: str) -> list[EvalConcept]:
        """Each concept: tuned from its image with its own caption as the only template; ``attributes[i]`` is the
        category and context prompt ``i`` asks for; ``kind`` is ``held_out_instance`` / ``held_out_category``
        (or the ``validation_`` kinds).

        Raises:
            EvaluationConfigError: a missing folder, file or name, an entry of the training distribution, bad counts.
        """
        folder = Path(self.concepts_dir)
        index = folder / CONCEPTS_FILE
        concepts = []
        for name, entry in read_concept_index(folder, self.names, self.num_references, "instance-concepts"):
            inst = _entry(entry, str(index))
            image = folder / entry["image"]
            try:
                contexts = prompt_contexts(inst, self.num_prompts, self.seed, name)
                others = prompt_contexts(inst, self.num_references - 1, self.seed, name, _REFERENCE_SALT)
            except ValueError as e:
                raise EvaluationConfigError(f"concept {name!r}: {e}") from e
            references = [input_context(inst), *others]
            concepts.append(
                EvalConcept(
                    name=name,
                    class_noun=entry["class_noun"],
                    prompts=[caption(inst.category, c, identity=placeholder) for c in contexts],
                    data_args={
                        "image": str(image),
                        "class_noun": entry["class_noun"],
                        "templates": [entry["template"]],
                    },
                    load_input=lambda p=image: load_rgb(p),
                    load_references=lambda i=inst, cs=references: _references(i, cs),
                    input_reference_index=0,
                    plain_words=entry["words"],
                    attributes=[
                        {
                            "category": inst.category,
                            "background": c.background,
                            "position": c.position,
                            "size": c.size,
                        }
                        for c in contexts
                    ],
                    kind=entry["kind"],
                )
            )
        return concepts


def _references(inst: Instance, contexts: list[Context]) -> torch.Tensor:
    arrays = np.stack([render(inst, c) for c in contexts])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255.0


def input_context(inst: Instance) -> Context:
    """A concept's input-image context: large, in the center, on the allowed background farthest from its colour."""
    main = inst.rgb()
    bg = max(backgrounds_for(inst), key=lambda b: float(np.linalg.norm(np.array(COLOURS[b], float) - main)))
    return Context(bg, "center", "large")


def prompt_contexts(inst: Instance, n: int, seed: int, name: str = "", salt: int = 0) -> list[Context]:
    """``n`` distinct contexts drawn with (seed, concept name, salt), never the input image's (prompt ``i`` is the
    same for any ``n > i``)."""
    pool = [c for c in all_contexts(inst) if c != input_context(inst)]
    if not 0 <= n <= len(pool):
        raise ValueError(f"need between 0 and {len(pool)} contexts, got {n}")
    key = int.from_bytes(hashlib.sha256(f"{name}|{salt}".encode()).digest()[:7], "big")
    return [pool[i] for i in seeded_rng(seed, 0x70637478, key).permutation(len(pool))[:n]]


# The concept sets: (kind, category, count) per split. Test: 3 held-out instances of each training category (the
# main kind) and 3 instances of each held-out test category (the hard kind); validation: 1 + 2 the same way.
TEST_PLAN: tuple[tuple[str, str, int], ...] = (
    *(("held_out_instance", c, 3) for c in TRAIN_CATEGORIES),
    *(("held_out_category", c, 3) for c in TEST_CATEGORIES),
)
VALIDATION_PLAN: tuple[tuple[str, str, int], ...] = (
    *(("validation_instance", c, 1) for c in TRAIN_CATEGORIES),
    *(("validation_category", c, 2) for c in VALIDATION_CATEGORIES),
)
CONCEPT_SEED = {"test": 0x7465, "validation": 0x7661}


def concept_instances(split: str, times: int = 1) -> list[tuple[str, str, Instance]]:
    """The concepts of ``split`` (``test`` or ``validation``): (name, kind, instance), seeded.

    ``times`` (validation only) draws that many times the plan's count per entry from the entry's same generator, so
    the concepts of ``times=1`` come first in each entry and are unchanged (a larger validation set that contains
    the smaller one). The test set is fixed.

    Raises:
        ValueError: ``times < 1``, or ``times > 1`` for the test split.
    """
    plan = {"test": TEST_PLAN, "validation": VALIDATION_PLAN}[split]
    if times < 1 or (times > 1 and split != "validation"):
        raise ValueError(f"times must be 1, or >= 1 for the validation split; got {times} for {split!r}")
    out = []
    for ci, (kind, category, count) in enumerate(plan):
        rng = seeded_rng(CONCEPT_SEED[split], ci)
        for j in range(count * times):
            # Rounded as concepts.json holds it, so the folder's renders are the instance's.
            inst = Instance.from_json(sample_instance(rng, split, category).to_json())
            out.append((f"{category}_{'val' if split == 'validation' else split}{j}", kind, inst))
    return out


def write_instance_concepts(out: str | Path, split: str = "test", times: int = 1) -> str:
    """Writes ``<name>.png`` (32 px, no jitter, :func:`input_context`) for every concept of ``split`` and
    ``concepts.json`` (the world's keys; ``attributes`` is the input's category and context, ``instance`` its
    details)."""
    from PIL import Image

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, kind, inst in concept_instances(split, times):
        ctx = input_context(inst)
        Image.fromarray(render(inst, ctx)).save(folder / f"{name}.png")
        held_cat = inst.category in HELD_OUT_CATEGORIES
        rows.append(
            {
                "name": name,
                "image": f"{name}.png",
                "kind": kind,
                "class_noun": "object" if held_cat else inst.category,
                "words": inst.category,
                "template": caption(inst.category, ctx, identity="{}"),
                "attributes": {"category": inst.category, **asdict(ctx)},
                "instance": inst.to_json(),
                "split": split,
            }
        )
    (folder / "concepts.json").write_text(json.dumps(rows, indent=1) + "\n")
    return str(folder)
