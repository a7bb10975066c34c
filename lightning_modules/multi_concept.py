"""Several concepts in one batch: which concept each slot holds, and the tuning step that keeps them apart.

Each batch row belongs to one concept (its ``slot``). The step gives every concept what it would get tuned alone
with the same seeds: its rows' noise and timesteps from the generator of ``(seed, its step, rank)``, the mean
diffusion loss over its own rows, its own nearest-token pull, and penalties; the total is the SUM over concepts,
so the gradient reaching a concept's v*, cores and (with ``factors`` tuned) its own copy of the LoRA factors
(:mod:`models.slot_factors`) is exactly its single-concept gradient. The optimizer is elementwise (AdamW), so the
rows of its state are per concept too; methods that train weights every concept shares (``SHARED_TUNABLES``)
cannot be batched and are refused by ``ConceptTuning.set_concepts``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from datamodules.concept import TuningConcept
from losses import add_noise, check_finite, gather_neighbours, nearest_pull
from models.errors import ConfigurationError

# Tuned weights shared by all concepts of a batch (the encoder, a static UNet LoRA, the UNet). The LoRA factors
# are not among them: each concept tunes its own copy (models/slot_factors.py).
SHARED_TUNABLES = frozenset({"encoder", "unet_lora", "unet"})


@dataclass
class ConceptSlots:
    """``total`` concepts tuned ``per_batch`` (K) at a time: group ``g`` holds concepts ``g*K .. g*K+K-1``.

    Attributes:
        total: number of concepts.
        per_batch: K (capped at ``total``).
        group: the group being tuned.
        started_at: the global step at which ``group`` started.
    """

    total: int
    per_batch: int
    group: int = 0
    started_at: int = 0

    def __post_init__(self) -> None:
        self.per_batch = min(self.per_batch, self.total)

    @property
    def groups(self) -> int:
        return math.ceil(self.total / self.per_batch)

    def size(self, group: int) -> int:
        """Concepts in ``group`` (the last one may hold fewer than K)."""
        return min(self.per_batch, self.total - group * self.per_batch)

    def index(self, slot: int) -> int:
        """Index of the concept in ``slot`` of the current group."""
        if not 0 <= slot < self.size(self.group):
            raise IndexError(f"slot {slot} is empty in group {self.group}")
        return self.group * self.per_batch + slot

    def steps_done(self, global_step: int) -> int:
        """Tuning steps the current group has taken."""
        return global_step - self.started_at


def shared_tunables(tune: Sequence[str]) -> list[str]:
    """The weights in ``tune`` that every concept of a batch would share; empty: the method can be batched."""
    return sorted(SHARED_TUNABLES & set(tune))


def check_concepts(
    concepts: Sequence[TuningConcept], per_batch: int, tune: Sequence[str]
) -> list[TuningConcept]:
    """The concepts as a list, if ``tune`` can tune them ``per_batch`` at a time.

    Raises:
        ConfigurationError: no concepts, ``per_batch < 1``, or several concepts with a method that trains weights
            every concept shares.
    """
    concepts = list(concepts)
    if not concepts or per_batch < 1:
        raise ConfigurationError(f"nothing to tune: {len(concepts)} concepts, {per_batch} per batch")
    shared = shared_tunables(tune)
    if len(concepts) > 1 and shared:
        raise ConfigurationError(
            f"tune={list(tune)} trains weights all concepts share ({', '.join(shared)}): tune one concept per run"
        )
    return concepts


def with_rows(param: nn.Parameter, rows: int) -> nn.Parameter:
    """``param`` if it has ``rows`` rows, else a zero parameter of that many rows (same trailing shape, grad flag)."""
    if param.shape[0] == rows:
        return param
    return nn.Parameter(param.new_zeros(rows, *param.shape[1:]), param.requires_grad)


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """CPU generator of one concept's step: the key of ``PersonalizationModule.step_generator`` at ``step``."""
    key = (seed * 1_000_003 + step) * 65_537 + rank
    return torch.Generator().manual_seed(key % (2**63))


def slot_rows(slots: torch.Tensor) -> list[tuple[int, slice]]:
    """``(slot, rows)`` for each run of equal slots; rows of one concept are contiguous in a batch."""
    slots = slots.tolist()
    runs, start = [], 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[start]:
            runs.append((int(slots[start]), slice(start, i)))
            start = i
    if len({s for s, _ in runs}) != len(runs):
        raise ValueError(f"a concept's rows must be contiguous in the batch, got slots {slots}")
    return runs


def multi_concept_step(module, batch: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """``PersonalizationModule.model_step`` for a batch of several concepts (see the module docstring).

    Args:
        module: a ``ConceptTuning``.
        batch: rows as ``ConceptSetDataModule`` makes them, with ``slot`` (B,) and ``step`` (B,).

    Returns:
        ``(losses, extras)``: ``losses["loss"]`` is the sum over concepts (the optimised value); the other
        terms are means over concepts, comparable with a single-concept run's.
    """
    bb = module.backbone
    slots = torch.as_tensor(batch["slot"])
    runs = slot_rows(slots)
    step = int(torch.as_tensor(batch["step"])[0])
    rank = module.global_rank
    parts = []
    for _, rows in runs:  # each concept's rows draw from the generator its own run would use, in its order
        generator = step_generator(module.seed, step, rank)
        with torch.no_grad():
            latents = module.target_latents(batch["pixel_values"][rows], generator)
        parts.append(add_noise(bb.scheduler, latents, generator=generator))
    noisy = torch.cat([p.noisy for p in parts])
    timesteps = torch.cat([p.timesteps for p in parts])
    target = torch.cat([p.target for p in parts])
    v_star, cores = module.predict_concepts(batch, noisy, timesteps)
    neighbours = hard_ids = None
    if module.alpha < 1.0 or module.nn_weight > 0:
        table = bb.token_rows()
        neighbours, neighbour_ids = gather_neighbours(module.token_index, table, v_star, max(module.nn_k, 1))
        hard_ids = module.hard_prompt_ids(batch, neighbour_ids)
        nn_v_star, neighbours = bb.similarity_space(v_star), bb.similarity_space(neighbours)
    ids = bb.tokenize(list(batch["prompt"]), require_placeholder=True)
    pred = bb.personalized_unet(
        noisy, timesteps, ids, v_star, module.lora_deltas(cores, slots), module.alpha, hard_ids
    ).float()
    terms: dict[str, list[torch.Tensor]] = {}
    for _, rows in runs:
        term = dict(module.diffusion_loss(pred[rows], target[rows].float()))
        if module.nn_weight > 0:  # one concept per slot: the pull toward its nearest tokens
            term["loss/nn_pull"] = nearest_pull(nn_v_star[rows], neighbours[rows])
        if module.norm_penalty.weight > 0:
            term.update(module.norm_penalty(v_star[rows]))
        if module.core_penalty.weight > 0:
            c = cores[rows]
            term.update(module.core_penalty([c[:, i] for i in range(c.shape[1])]))
        for key, value in term.items():
            terms.setdefault(key, []).append(value)
    total = torch.stack(terms["loss/diffusion"]).sum()
    if "loss/nn_pull" in terms:
        total = total + module.nn_weight * torch.stack(terms["loss/nn_pull"]).sum()
    for key in ("loss/norm_penalty", "loss/core_penalty"):
        if key in terms:
            total = total + torch.stack(terms[key]).sum()
    losses = {key: torch.stack(values).mean() for key, values in terms.items()}
    losses["loss"] = total
    check_finite(losses)
    return losses, {"v_star": v_star, "cores": cores}
