"""Inference-time tuning data: augmented copies of ONE concept image (paper: one image, <= 12 steps)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import Dataset

from datamodules.pretrain import EpochSampler, ResumableDataLoader, world_info
from datamodules.synthetic import concept_kind, concept_name, render_concept
from datamodules.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_PLACEHOLDER,
    ViewSpec,
    check_augment_args,
    check_image_size,
    item_generator,
    load_rgb,
    resize_center_crop,
    split_index,
    to_clip_tensor,
    to_diffusion_tensor,
    to_rgb,
)
from models.errors import ConfigurationError


@dataclass(frozen=True)
class TuningConcept:
    """One concept to tune: what ``ConceptTuning`` needs besides its batches.

    Attributes:
        name: artefact name (``<name>.safetensors``).
        image: the one input image (RGB).
        class_noun: the concept's class noun (``init: class_noun``, instance prompts, artefact metadata); None if
            unknown.
        templates: prompt templates with one ``{}`` for the placeholder (None: ``PROMPT_TEMPLATES``).
        concept_id: the ``concept_id`` of its batch rows.
    """

    name: str
    image: Image.Image
    class_noun: str | None = None
    templates: tuple[str, ...] | None = None
    concept_id: int = 0

    def views(
        self,
        resolution: int,
        clip_size: int,
        clip_mean: Sequence[float] = CLIP_MEAN,
        clip_std: Sequence[float] = CLIP_STD,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The un-augmented image as the encoder's prediction reads it.

        Returns:
            ``(pixels (1, 3, R, R) in [-1, 1], clip_pixels (1, 3, C, C) normalised)``.
        """
        pixels = to_diffusion_tensor(resize_center_crop(self.image, resolution), resolution)
        clip_pixels = to_clip_tensor(self.image, clip_size, tuple(clip_mean), tuple(clip_std))
        return pixels.unsqueeze(0), clip_pixels.unsqueeze(0)


class SingleConceptDataset(Dataset):
    """``num_samples`` augmented views (random resized crop, flip) of one image, one random prompt each.

    Item ``k`` is a pure function of ``(seed, epoch, k)``.

    Args:
        image: Path of the concept image, or the image itself.
        resolution: Side ``R`` of ``pixel_values``.
        clip_size: Side ``C`` of ``clip_pixel_values``.
        num_samples: Dataset length.
        seed: Seed of every crop, flip and template.
        concept_id: Value of every item's ``concept_id``.
        clip_mean: Per-channel mean of the image encoder's normalisation.
        clip_std: Per-channel std of the image encoder's normalisation.
        scale: Random-resized-crop area range.
        flip_p: Horizontal-flip probability.
        placeholder: Pseudo-word string put into the prompt templates.
        templates: Prompt templates with one ``{}`` slot; defaults to ``PROMPT_TEMPLATES``.

    Raises:
        FileNotFoundError: ``image`` is a path that does not exist.
        ImageLoadError: ``image`` is a file that cannot be decoded.
    """

    def __init__(
        self,
        image: str | Path | Image.Image,
        resolution: int = 32,
        clip_size: int = 32,
        num_samples: int = 48,
        seed: int = 0,
        concept_id: int = 0,
        clip_mean: Sequence[float] = CLIP_MEAN,
        clip_std: Sequence[float] = CLIP_STD,
        scale: tuple[float, float] = (0.8, 1.0),
        flip_p: float = 0.5,
        placeholder: str = DEFAULT_PLACEHOLDER,
        templates: Sequence[str] | None = None,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.image = to_rgb(image).copy() if isinstance(image, Image.Image) else load_rgb(image)
        self.views = ViewSpec.build(
            resolution, clip_size, clip_mean, clip_std, scale, flip_p, placeholder, templates
        )
        self.num_samples = num_samples
        self.seed = seed
        self.concept_id = concept_id
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch used by integer indices (``(epoch, k)`` indices carry their own)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, torch.Tensor | str | int]:
        """Returns one item.

        Args:
            index: ``k`` or ``(epoch, k)``.

        Returns:
            ``pixel_values`` (3, R, R) in [-1, 1], ``clip_pixel_values`` (3, C, C), ``prompt`` (str),
            ``concept_id`` and ``index`` (``k``).
        """
        epoch, k = split_index(index, self.epoch)
        if not 0 <= k < self.num_samples:
            raise IndexError(f"index {k} out of range for {self.num_samples} samples")
        item = self.views.item(self.image, item_generator(self.seed, epoch, k))
        return {**item, "concept_id": self.concept_id, "index": k}


class ConceptDataModule(LightningDataModule):
    """Data for inference-time tuning on one concept: one epoch is exactly ``steps`` batches.

    The concept is an image file or a procedural concept (e.g. one of ``PretrainDataModule``'s held-out
    ids); it is loaded or rendered in ``__init__``, so a missing or unreadable image fails before tuning.
    Under a distributed strategy every rank gets ``steps`` batches of its own augmentations.

    Args:
        image: Path of the concept image (exactly one of ``image`` / ``synthetic_concept``).
        synthetic_concept: Id of a synthetic concept to use instead of a file.
        synthetic_seed: Seed of the synthetic concept set (match ``PretrainDataModule.synthetic_seed``).
        resolution: Side ``R`` of ``pixel_values`` (the backbone's pixel resolution, VAE input).
        clip_size: Side ``C`` of ``clip_pixel_values`` (the image encoder's input size).
        clip_mean: Per-channel mean of the image encoder's normalisation.
        clip_std: Per-channel std of the image encoder's normalisation.
        scale: Random-resized-crop area range (fraction of the largest square that fits).
        flip_p: Horizontal-flip probability.
        batch_size: Augmented copies per tuning step.
        steps: Tuning steps; the dataset holds ``steps * batch_size`` items, so one epoch = ``steps`` batches.
        placeholder: Pseudo-word string in the prompts, e.g. ``"a photo of a <s*>"``.
        class_noun: Class noun of the concept for prompt-similarity evaluation; ``None`` = the synthetic
            concept's kind (files: ``None``).
        seed: Seed of every crop, flip and template.
        num_workers: DataLoader worker processes.
        templates: prompt templates with one ``{}`` for the placeholder (default: ``PROMPT_TEMPLATES``, "a photo
            of a {}", ...); e.g. the toy world's caption of the concept image, "a large {} in the center on a blue
            background".

    Raises:
        ConfigurationError: both or neither of ``image`` and ``synthetic_concept`` are given, or a count is < 1.
        MissingFileError: ``image`` does not exist.
        ImageLoadError: ``image`` cannot be decoded.
        ImageTooSmallError: ``image``'s short side is below ``min_image_side(resolution)``; between that and
            ``resolution`` a :class:`SmallImageWarning` is issued.
    """

    def __init__(
        self,
        image: str | None = None,
        synthetic_concept: int | None = None,
        synthetic_seed: int = 0,
        resolution: int = 32,
        clip_size: int = 32,
        clip_mean: tuple[float, float, float] = CLIP_MEAN,
        clip_std: tuple[float, float, float] = CLIP_STD,
        scale: tuple[float, float] = (0.8, 1.0),
        flip_p: float = 0.5,
        batch_size: int = 4,
        steps: int = 12,
        placeholder: str = DEFAULT_PLACEHOLDER,
        class_noun: str | None = None,
        seed: int = 0,
        num_workers: int = 0,
        templates: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if (image is None) == (synthetic_concept is None):
            raise ConfigurationError(
                "ConceptDataModule needs exactly one of image=<path> or synthetic_concept=<id>, "
                f"got image={image!r}, synthetic_concept={synthetic_concept!r}"
            )
        if batch_size < 1 or steps < 1:
            raise ConfigurationError(
                f"batch_size and steps must be >= 1, got batch_size={batch_size}, steps={steps}"
            )
        check_augment_args(scale, flip_p)  # before any work, not at the first batch
        if image is not None:
            self.concept_image: Image.Image = load_rgb(image)
            check_image_size(self.concept_image.size, resolution, image)
            self.concept_name = Path(image).stem
            self.concept_id = 0
            self.class_noun = class_noun
        else:
            assert synthetic_concept is not None
            size = 2 * max(resolution, clip_size)  # as SyntheticConceptDataset renders it
            self.concept_image = render_concept(synthetic_seed, synthetic_concept, size)
            self.concept_name = concept_name(synthetic_seed, synthetic_concept)
            self.concept_id = synthetic_concept
            self.class_noun = class_noun or concept_kind(synthetic_seed, synthetic_concept)
        self.batch_size = batch_size
        self.steps = steps
        self.num_workers = num_workers
        self.seed = seed
        # The size check above used it; ConceptTuning checks again if the model's resolution differs.
        self.resolution = resolution
        self.concept = TuningConcept(
            name=self.concept_name,
            image=self.concept_image,
            class_noun=self.class_noun,
            templates=tuple(templates) if templates else None,
            concept_id=self.concept_id,
        )
        self._dataset_args = dict(
            resolution=resolution,
            clip_size=clip_size,
            clip_mean=clip_mean,
            clip_std=clip_std,
            scale=scale,
            flip_p=flip_p,
            placeholder=placeholder,
            seed=seed,
            concept_id=self.concept_id,
            templates=templates,
        )

    @property
    def concepts(self) -> list[TuningConcept]:
        """The one concept, as ``ConceptTuning`` reads the concepts of the data it is fitted on."""
        return [self.concept]

    def dataset(self, world: int = 1) -> SingleConceptDataset:
        """The ``steps * batch_size`` augmented views of each of ``world`` ranks (item ``(epoch, k)``)."""
        return SingleConceptDataset(
            self.concept_image, num_samples=self.steps * self.batch_size * world, **self._dataset_args
        )

    def train_dataloader(self) -> ResumableDataLoader:
        """``steps`` batches of ``batch_size`` augmented views, in index order, resumable."""
        world, rank = world_info(self)
        dataset = self.dataset(world)
        sampler = EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=False, seed=self.seed)
        return ResumableDataLoader(
            dataset,
            sampler=sampler,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
