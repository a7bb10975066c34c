"""Instance-world batches for the image encoder: "my star", not "a star".

The named-world encoder (``object_pair_batch``) learned what the words name (shape, colour word, pattern kind)
and little of the unnamed instance details (the instance-probe gate,
``toyworld/diagnostics/instance_probe.py``). Here each of N instances of the **training distribution**
(``instance.sample_instance(rng, "train")``: never a test or validation cell, never a held-out category) is
rendered twice in two different random contexts (``instance.random_context``; background, position, size,
jitter): the two renders are positives, every other instance a negative. Instances come in groups of ``group``
of one category (hard negatives): a fraction ``one_detail`` of the groups (by default half) are a base
instance with one detail redrawn per member (hue, saturation, value, aspect, rotation, roundness, points,
pattern kind, angle or period), the others independent instances of that category. The caption side is a
read-out of the category, the only identity word this world's captions state (``labels["category"]``). The
encoder trained so is committed in ``assets/toyworld/instance_image_encoder/``; it does not pass the gate
(docs/research/instance_image_encoder.md).

    python -m toyworld train image-encoder --config configs/toyworld/instance_image_encoder.yaml
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from toyworld.instance.render import render
from toyworld.instance.world import (
    TRAIN_CATEGORIES,
    Instance,
    backgrounds_for,
    instance_split,
    random_context,
    sample_instance,
)
from toyworld.named.world import seeded_rng, to_tensor

# The details a hard negative may differ in (every field of an Instance but its category).
DETAILS: tuple[str, ...] = ("hue", "saturation", "value", "aspect", "rotation", "roundness", "points")
DETAILS += ("pattern", "angle", "period")


def _one_detail_group(rng: np.random.Generator, base: Instance, group: int) -> list[Instance]:
    """``base`` and up to ``group - 1`` copies with one detail taken from another training instance of its
    category; a copy that leaves the training distribution (a held-out cell) or its backgrounds is dropped."""
    out = [base]
    for _ in range(4 * group):
        if len(out) >= group:
            break
        detail = str(rng.choice([d for d in DETAILS if d != "points" or base.category == "star"]))
        other = sample_instance(rng, "train", base.category)
        inst = dataclasses.replace(base, **{detail: getattr(other, detail)})
        if inst not in out and instance_split(inst) == "train" and len(backgrounds_for(inst)) >= 3:
            out.append(inst)
    return out


def instance_pair_batch(
    n_instances: int, seed: int, step: int, group: int = 4, one_detail: float = 0.5, size: int = 32
) -> dict:
    """``2 * n_instances`` renders: each training-distribution instance twice, in two different contexts; groups
    of ``group`` instances of one category, a fraction ``one_detail`` of them differing in one detail each.

    Returns ``pixels`` (2N, 3, size, size) in [-1, 1], ``object_ids`` (2N,), ``labels`` (``{"category": (2N,)}``,
    indices into ``TRAIN_CATEGORIES``) and ``instances`` (2N, the instance of each render)."""
    rng = seeded_rng(seed, 0x69706169, step)
    instances: list[Instance] = []
    while len(instances) < n_instances:
        base = sample_instance(rng, "train")
        if rng.uniform() < one_detail:
            members = _one_detail_group(rng, base, group)
        else:
            members = [base, *(sample_instance(rng, "train", base.category) for _ in range(group - 1))]
        instances += [m for m in members if m not in instances]
    instances = instances[:n_instances]
    renders, ids, insts = [], [], []
    for i, inst in enumerate(instances):
        first = random_context(rng, inst)
        second = random_context(rng, inst)
        while second == first:
            second = random_context(rng, inst)
        for ctx in (first, second):
            renders.append(render(inst, ctx, size, rng))
            ids.append(i)
            insts.append(inst)
    return {
        "pixels": to_tensor(np.stack(renders)),
        "object_ids": torch.tensor(ids),
        "labels": {"category": torch.tensor([TRAIN_CATEGORIES.index(i.category) for i in insts])},
        "instances": insts,
    }
