"""Datasets and LightningDataModules: image folders, procedural concepts, one-image tuning data.

Every item is a dict: ``pixel_values`` (3, R, R) float32 in [-1, 1] (VAE input), ``clip_pixel_values``
(3, C, C) float32 CLIP-normalised from the same augmented view, ``prompt`` (str, e.g. "a photo of a <s*>"),
``concept_id`` (int) and ``index`` (int). All randomness is a function of ``(seed, epoch, index)``.
"""

from datamodules.concept import ConceptDataModule, SingleConceptDataset, TuningConcept
from datamodules.concept_set import ConceptSetDataModule, read_concept_list
from datamodules.image_folder import ImageFolderDataset, SkippedImageWarning, scan_images
from datamodules.pretrain import EpochSampler, PretrainDataModule, ResumableDataLoader
from datamodules.synthetic import KINDS, SyntheticConceptDataset, concept_kind, concept_name, render_concept
from datamodules.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_EXTENSIONS,
    PROMPT_TEMPLATES,
    ImageLoadError,
    ImageTooSmallError,
    SmallImageWarning,
    augment,
    item_generator,
    load_rgb,
    to_clip_tensor,
    to_diffusion_tensor,
    to_rgb,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGE_EXTENSIONS",
    "KINDS",
    "PROMPT_TEMPLATES",
    "ConceptDataModule",
    "ConceptSetDataModule",
    "EpochSampler",
    "ImageFolderDataset",
    "ImageLoadError",
    "ImageTooSmallError",
    "PretrainDataModule",
    "ResumableDataLoader",
    "SingleConceptDataset",
    "SkippedImageWarning",
    "SmallImageWarning",
    "SyntheticConceptDataset",
    "TuningConcept",
    "augment",
    "concept_kind",
    "concept_name",
    "item_generator",
    "load_rgb",
    "read_concept_list",
    "render_concept",
    "scan_images",
    "to_clip_tensor",
    "to_diffusion_tensor",
    "to_rgb",
]
