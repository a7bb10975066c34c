"""The instance world's base-training stream: seeded batches of training-distribution instances and their
captions."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import IterableDataset

from toyworld.instance.render import render
from toyworld.instance.world import POSITION_PHRASE, Context, Instance, random_context, sample_instance
from toyworld.named.world import _article, seeded_rng, to_tensor


class InstanceWorldStream(IterableDataset):
    """An endless, seeded stream of base-training batches ``{"pixels", "captions", "instances", "contexts"}``:
    instances of the training distribution only (never a held-out cell or category), captions with the category
    and context (each context word dropped with ``drop_prob``; the empty caption with ``empty_prob``).

    Args:
        batch_size: scenes per batch.
        seed: batch ``step`` is a pure function of (seed, step): resumable with ``start_step``.
        drop_prob: probability of dropping each context attribute from the caption.
        empty_prob: probability of the empty caption (for classifier-free guidance).
        size: image size in pixels.
    """

    def __init__(
        self,
        batch_size: int = 64,
        seed: int = 0,
        drop_prob: float = 0.15,
        empty_prob: float = 0.1,
        size: int = 32,
        start_step: int = 0,
    ):
        super().__init__()
        self.batch_size, self.seed, self.size = batch_size, seed, size
        self.drop_prob, self.empty_prob, self.start_step = drop_prob, empty_prob, start_step

    def _caption(self, rng: np.random.Generator, inst: Instance, ctx: Context) -> str:
        if rng.uniform() < self.empty_prob:
            return ""
        words = []
        if rng.uniform() >= self.drop_prob:
            words.append(ctx.size)
        words.append(inst.category)
        if rng.uniform() >= self.drop_prob:
            words.append(POSITION_PHRASE[ctx.position])
        if rng.uniform() >= self.drop_prob:
            words.append(f"on {_article(ctx.background)} {ctx.background} background")
        return " ".join([_article(words[0]), *words])

    def batch(self, step: int) -> dict:
        rng = seeded_rng(self.seed, 0x696E7374, step)
        instances = [sample_instance(rng, "train") for _ in range(self.batch_size)]
        contexts = [random_context(rng, i) for i in instances]
        images = np.stack([render(i, c, self.size, rng) for i, c in zip(instances, contexts)])
        captions = [self._caption(rng, i, c) for i, c in zip(instances, contexts)]
        return {
            "pixels": to_tensor(images),
            "captions": captions,
            "instances": instances,
            "contexts": contexts,
        }

    def __iter__(self) -> Iterator[dict]:
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1
