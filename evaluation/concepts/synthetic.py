"""Held-out procedural concepts (``datamodules.synthetic``): the offline default concept set."""

from __future__ import annotations

import torch
from torch import Tensor

from datamodules.synthetic import concept_kind, concept_name, render_concept
from datamodules.transforms import augment, item_generator, pil_to_uint8_tensor, resize_center_crop
from evaluation.concepts.base import ConceptSet, EvalConcept, checked_prompts
from evaluation.config import EvaluationConfigError

# Seed offset of the synthetic references' crops, so they are not the tuning data's own augmentations.
REFERENCE_SEED_OFFSET = 0x5EF


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
        views.append(augment(big, size, item_generator(seed + REFERENCE_SEED_OFFSET, concept_id, k)))
    return torch.stack([pil_to_uint8_tensor(v) for v in views]).float() / 255.0


class SyntheticConcepts(ConceptSet):
    """Held-out synthetic concepts, offline, with the same prompts for every concept.

    Args:
        synthetic_ids: synthetic concept ids (use ids held out of pretraining: the tiny pretraining holds out
            the last 4 of 64, i.e. 60-63).
        synthetic_seed: seed of the synthetic concept set (as in the pretraining config).
        prompts: evaluation prompts with the placeholder (required).
        num_references: real images per concept for identity metrics: the un-augmented render plus
            ``num_references - 1`` fixed random crops / flips of it.
        reference_size: pixel size of the reference images.
        max_prompts: use only the first N prompts (None: all).
    """

    row_selection = ("synthetic_ids", "max_prompts")

    def __init__(
        self,
        synthetic_ids: list[int] | None = None,
        synthetic_seed: int = 0,
        prompts: list[str] | None = None,
        num_references: int = 4,
        reference_size: int = 64,
        max_prompts: int | None = None,
    ) -> None:
        self.synthetic_ids = list(synthetic_ids) if synthetic_ids is not None else [60, 61]
        self.synthetic_seed, self.prompts, self.num_references = synthetic_seed, prompts, num_references
        self.reference_size, self.max_prompts = reference_size, max_prompts

    def load(self, placeholder: str) -> list[EvalConcept]:
        if not self.prompts:
            raise EvaluationConfigError(
                "concepts.prompts is required for synthetic concepts (with the placeholder)"
            )
        prompts = checked_prompts(self.prompts, placeholder, "concepts.prompts", self.max_prompts)
        if not self.synthetic_ids:
            raise EvaluationConfigError("concepts.synthetic_ids is empty")
        if any(i < 0 for i in self.synthetic_ids):
            raise EvaluationConfigError(f"concepts.synthetic_ids must be >= 0, got {self.synthetic_ids}")
        concepts = []
        for cid in self.synthetic_ids:
            s, n, size = self.synthetic_seed, self.num_references, self.reference_size
            concepts.append(
                EvalConcept(
                    name=concept_name(s, cid),
                    class_noun=concept_kind(s, cid),
                    prompts=list(prompts),
                    data_args={"synthetic_concept": cid, "synthetic_seed": s},
                    load_input=lambda s=s, cid=cid, size=size: render_concept(s, cid, size),
                    load_references=lambda s=s, cid=cid, n=n, size=size: synthetic_references(
                        s, cid, n, size
                    ),
                    input_reference_index=0,  # the un-augmented render: the image the concept is tuned from
                )
            )
        return concepts
