"""Encoder pretraining data from the toy world (``toyworld/named/world.py``): one scene per item, its caption with the
object's words replaced by the placeholder. The dataset plugs into the ordinary
``datamodules.pretrain.PretrainDataModule`` (its ``dataset`` argument), which brings the resumable loader::

    data:
      class_path: datamodules.pretrain.PretrainDataModule
      init_args:
        dataset:
          class_path: toyworld.named.data.ToyWorldConceptDataset
          init_args: {length: 4096, split: base, seed: 0}
        batch_size: 16
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from datamodules.transforms import CLIP_MEAN, CLIP_STD, DEFAULT_PLACEHOLDER
from toyworld.named.world import (
    COLOUR_NAMES,
    PATTERNS,
    SHAPES,
    Scene,
    caption,
    random_scene,
    render,
    seeded_rng,
)

IDENTITIES: tuple[tuple[str, str, str], ...] = tuple(
    (shape, colour, pattern) for shape in SHAPES for colour in COLOUR_NAMES for pattern in PATTERNS
)


def identity_id(scene: Scene) -> int:
    """Index of the scene's identity (shape, colour, pattern) among all ``IDENTITIES``: its concept id."""
    return IDENTITIES.index(scene.identity)


class ToyWorldConceptDataset(Dataset):
    """Encoder-pretraining items from the world: one scene per item, its image as both encoder input and
    diffusion target, and its caption with the object's words replaced by the placeholder
    (``"a large <s*> on the left on a green background"``).

    No crop or flip: the caption states the position, which a flip would contradict. Item ``k`` of epoch ``e``
    is a pure function of ``(seed, e, k)``. ``concept_id`` is the identity's index (``identity_id``), so two
    scenes of the same object are never each other's negatives in the contrastive loss.

    Args:
        length: items per epoch.
        resolution: side of ``pixel_values`` (a multiple of 32 renders exactly; others are resized).
        clip_size: side of ``clip_pixel_values``.
        split: ``base`` (held-out shapes and combinations excluded, the default) or ``all``.
        seed: seed of the scenes.
        placeholder: pseudo-word in the captions.
        clip_mean: the image encoder's normalisation mean.
        clip_std: the image encoder's normalisation std.
    """

    def __init__(
        self,
        length: int = 4096,
        resolution: int = 32,
        clip_size: int = 32,
        split: str = "base",
        seed: int = 0,
        placeholder: str = DEFAULT_PLACEHOLDER,
        clip_mean: Sequence[float] = CLIP_MEAN,
        clip_std: Sequence[float] = CLIP_STD,
    ):
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.length, self.resolution, self.clip_size = length, resolution, clip_size
        self.split, self.seed, self.placeholder = split, seed, placeholder
        self.clip_mean = torch.tensor(clip_mean).view(3, 1, 1)
        self.clip_std = torch.tensor(clip_std).view(3, 1, 1)
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def scene(self, epoch: int, k: int) -> Scene:
        return random_scene(seeded_rng(self.seed, 0x70726574, epoch, k), self.split)

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        epoch, k = index if isinstance(index, (tuple, list)) else (self.epoch, index)
        if not 0 <= k < self.length:
            raise IndexError(f"index {k} out of range for {self.length} items")
        scene = self.scene(int(epoch), int(k))
        img = render(scene, 32, seeded_rng(self.seed, 0x6A697474, int(epoch), int(k)))
        return self.item(img, caption(scene, identity=self.placeholder), identity_id(scene), int(k))

    def item(self, image, prompt: str, concept_id: int, k: int, input_image=None) -> dict:
        """The batch item of a 32 px uint8 render ``(32, 32, 3)``: diffusion target at ``resolution`` in [-1, 1],
        encoder input at ``clip_size`` normalised as the image encoder expects.

        ``input_image``: another render the encoder reads instead of the target (a target in another context);
        it is then also given at ``resolution`` as ``encoder_pixel_values`` (the UNet feature branch's input).
        """
        x = torch.from_numpy(image).permute(2, 0, 1).float()[None]
        x_in = x if input_image is None else torch.from_numpy(input_image).permute(2, 0, 1).float()[None]
        clip = (
            F.interpolate(x_in, size=self.clip_size, mode="bicubic", antialias=True)
            if self.clip_size != 32
            else x_in
        )
        out = {
            "pixel_values": self.diffusion_pixels(x),
            "clip_pixel_values": ((clip[0] / 255.0).clamp(0, 1) - self.clip_mean) / self.clip_std,
            "prompt": prompt,
            "concept_id": concept_id,
            "index": k,
        }
        if input_image is not None:
            out["encoder_pixel_values"] = self.diffusion_pixels(x_in)
        return out

    def diffusion_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """(1, 3, 32, 32) uint8-valued float -> (3, resolution, resolution) in [-1, 1]."""
        if self.resolution != 32:
            x = F.interpolate(x, size=self.resolution, mode="bilinear", antialias=True)
        return (x[0] / 127.5 - 1.0).clamp(-1, 1)
