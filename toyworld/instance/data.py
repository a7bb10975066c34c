"""Encoder pretraining on the instance world (``toyworld/instance/world.py``): the dataset and the validation
callback.

The dataset plugs into the ordinary ``datamodules.pretrain.PretrainDataModule`` like ``toyworld.named.data``'s; the
callback is ``toyworld.ValidationIdentity`` with the instance world's validation concepts (never the test concepts)
scored from pixels (``toyworld.instance.pixels``)::

    data: {class_path: datamodules.pretrain.PretrainDataModule,
           init_args: {dataset: {class_path: toyworld.InstanceConceptDataset}}}
    trainer.callbacks: [{class_path: toyworld.instance.data.InstanceValidationIdentity}]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

from datamodules.transforms import CLIP_MEAN, CLIP_STD, DEFAULT_PLACEHOLDER
from toyworld.instance.concepts import concept_instances, input_context, prompt_contexts
from toyworld.instance.render import render
from toyworld.instance.world import Context, Instance, caption, random_context, sample_instance
from toyworld.named.data import ToyWorldConceptDataset
from toyworld.named.validation import ValidationIdentity
from toyworld.named.world import seeded_rng, to_tensor


class InstanceConceptDataset(ToyWorldConceptDataset):
    """Encoder-pretraining items from the instance world: one instance of the training distribution (never a
    held-out cell or category) in a random context per item, its image as both encoder input and diffusion
    target, and its caption with the category word replaced by the placeholder (``"a large <s*> at the top on a
    green background"``): the placeholder must carry the category and every unnamed detail.

    ``target_context="other"`` renders the same instance a second time, in another random context, as the
    diffusion target with that context's caption; the encoder reads the first render (``clip_pixel_values`` and
    ``encoder_pixel_values``). Then nothing of the input's context helps the loss: only the instance does.

    No crop or flip (the caption states the position). Item ``k`` of epoch ``e`` is a pure function of
    ``(seed, e, k)``. Every item is its own instance, so ``concept_id`` is the item's index over all epochs
    (``e * length + k``): no two rows of a batch are the same concept. The tensors are made as
    ``ToyWorldConceptDataset.item`` makes them.

    Args:
        length: items per epoch.
        resolution: side of ``pixel_values`` (32 renders exactly; others are resized).
        clip_size: side of ``clip_pixel_values`` (the image encoder's input size).
        seed: seed of the instances.
        placeholder: pseudo-word in the captions.
        clip_mean: the image encoder's normalisation mean.
        clip_std: the image encoder's normalisation std.
        target_context: ``same`` (the input image is the target, E4T's pretraining) or ``other`` (the target is
            the instance in another context).
    """

    def __init__(
        self,
        length: int = 4096,
        resolution: int = 32,
        clip_size: int = 64,
        seed: int = 0,
        placeholder: str = DEFAULT_PLACEHOLDER,
        clip_mean: Sequence[float] = CLIP_MEAN,
        clip_std: Sequence[float] = CLIP_STD,
        target_context: str = "same",
    ):
        if target_context not in ("same", "other"):
            raise ValueError(f"target_context must be 'same' or 'other', got {target_context!r}")
        self.target_context = target_context
        if resolution < 1 or clip_size < 1:
            raise ValueError(f"resolution and clip_size must be >= 1, got {resolution}, {clip_size}")
        super().__init__(length, resolution, clip_size, "base", seed, placeholder, clip_mean, clip_std)

    def scene(self, epoch: int, k: int) -> tuple[Instance, Context, np.random.Generator]:
        """Item ``k`` of ``epoch``: its instance, its context and the generator that jitters its render."""
        rng = seeded_rng(self.seed, 0x696E7370, epoch, k)
        inst = sample_instance(rng, "train")
        return inst, random_context(rng, inst), rng

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        epoch, k = index if isinstance(index, (tuple, list)) else (self.epoch, index)
        epoch, k = int(epoch), int(k)
        if not 0 <= k < self.length:
            raise IndexError(f"index {k} out of range for {self.length} items")
        inst, ctx, rng = self.scene(epoch, k)
        image = render(inst, ctx, 32, rng)
        if self.target_context == "same":
            prompt = caption(inst.category, ctx, identity=self.placeholder)
            return self.item(image, prompt, epoch * self.length + k, k)
        target = random_context(rng, inst)
        while target == ctx:  # another context: a different background, position or size
            target = random_context(rng, inst)
        prompt = caption(inst.category, target, identity=self.placeholder)
        return self.item(render(inst, target, 32, rng), prompt, epoch * self.length + k, k, input_image=image)


class InstanceValidationIdentity(ValidationIdentity):
    """``ValidationIdentity`` on the instance world's validation concepts (``concept_instances("validation")``:
    held-out instances of the six training categories and two of the held-out validation category ``arrow``):
    each concept's input image (``input_context``), ``prompts_per_concept`` of its prompt contexts, and the
    samples scored from pixels against the input image (``toyworld.instance.pixels.score_images``). Logged per alpha:
    ``identity`` (the pixel identity score), ``identity_acc`` (accuracy at the calibrated threshold) and
    ``prompt`` (background, position and size all as asked). The options are ``ValidationIdentity``'s
    (``n_concepts``: the first n of the 8; ``checker_dir`` is unused)."""

    def _concepts(self):
        return concept_instances("validation")[: self.n_concepts]

    def inputs(self, resolution: int, placeholder: str) -> tuple[torch.Tensor, list[list[str]], list]:
        concepts = self._concepts()
        images = to_tensor(
            np.stack([render(inst, input_context(inst), resolution) for _, _, inst in concepts])
        )
        prompts, wanted = [], []
        for name, _, inst in concepts:
            contexts = prompt_contexts(inst, self.k, self.seed, name)
            prompts.append([caption(inst.category, c, identity=placeholder) for c in contexts])
            wanted.extend(asdict(c) for c in contexts)
        return images, prompts, wanted

    def score(self, samples: torch.Tensor, images: torch.Tensor, wanted: list) -> dict[str, float]:
        from toyworld.instance.pixels import as_uint8, score_images

        x = samples.float().cpu()
        if x.shape[-2:] != (32, 32):
            x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)
        refs = [as_uint8((img + 1) / 2) for img in images]
        cols: dict[str, list[float]] = {
            "pixel_identity": [],
            "pixel_identity_acc": [],
            "pixel_prompt_acc": [],
        }
        per = len(wanted) // len(refs)
        for i, ref in enumerate(refs):
            part = score_images(list(x[i * per : (i + 1) * per]), ref, wanted[i * per : (i + 1) * per])
            for key in cols:
                cols[key].extend(part[key])
        return {
            "identity": float(np.mean(cols["pixel_identity"])),
            "identity_acc": float(np.mean(cols["pixel_identity_acc"])),
            "prompt": float(np.mean(cols["pixel_prompt_acc"])),
        }
