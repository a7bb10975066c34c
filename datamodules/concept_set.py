"""Tuning data for many concepts at once: K concepts per batch, each with its own augmented views and prompts.

Input: a folder of images (with an optional ``concepts.json``: a list of ``{"name", "image", "class_noun",
"template"}`` entries, as ``python -m datamodules.toyworld write-concepts`` writes it) or a list file (one image
per line: ``path[<TAB>class_noun[<TAB>template]]``, paths relative to the file, ``#`` comments). An image that
cannot be read or is too small is skipped with a one-line reason (``skipped``); the others are tuned.

Batch ``(g, s)`` (group ``g``, step ``s``) holds, for each concept ``j`` of group ``g`` in turn, the rows
``s * B .. s * B + B - 1`` of that concept's :class:`~datamodules.concept.SingleConceptDataset` (epoch 0): exactly
the batch ``s`` a :class:`~datamodules.concept.ConceptDataModule` of that one image with the same seed gives.
The loader is resumable: Lightning checkpoints how many batches it gave, and a run resumed from a mid-run
checkpoint goes on from the next batch (``ConceptTuning`` keeps the group being tuned in its checkpoint).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.concept import SingleConceptDataset, TuningConcept
from datamodules.image_folder import scan_images
from datamodules.pretrain import world_info
from datamodules.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_PLACEHOLDER,
    check_augment_args,
    check_image_size,
    load_rgb,
)
from models.errors import ConfigurationError, MissingFileError, TuningEncoderError

CONCEPTS_FILE = "concepts.json"


def read_concept_list(images: str | Path) -> list[dict]:
    """Entries ``{"name", "image" (path), "class_noun", "template"}`` of a folder or a list file (not loaded).

    Raises:
        MissingFileError: ``images`` does not exist.
        ConfigurationError: a malformed ``concepts.json`` or list line, or no image at all.
    """
    root = Path(images)
    if not root.exists():
        raise MissingFileError(f"images {images} does not exist (a folder of images or a list file)")
    entries: list[dict] = []
    if root.is_dir() and (root / CONCEPTS_FILE).is_file():
        try:
            raw = json.loads((root / CONCEPTS_FILE).read_text())
            entries = [
                {"name": e.get("name") or Path(e["image"]).stem, "image": root / e["image"],
                 "class_noun": e.get("class_noun"), "template": e.get("template")}
                for e in raw
            ]  # fmt: skip
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigurationError(
                f"{root / CONCEPTS_FILE} is not a list of concept entries: {err}"
            ) from err
    elif root.is_dir():
        try:
            paths = scan_images(root)
        except ValueError as err:
            raise ConfigurationError(str(err)) from err
        entries = [
            {"name": Path(p).stem, "image": Path(p), "class_noun": None, "template": None} for p in paths
        ]
    else:
        for n, line in enumerate(root.read_text().splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            fields = [f.strip() for f in line.split("\t")]
            if len(fields) > 3:
                raise ConfigurationError(f"{root}:{n}: expected path[<TAB>class_noun[<TAB>template]]")
            path = (root.parent / fields[0]) if not Path(fields[0]).is_absolute() else Path(fields[0])
            noun = fields[1] if len(fields) > 1 and fields[1] else None
            template = fields[2] if len(fields) > 2 and fields[2] else None
            entries.append({"name": path.stem, "image": path, "class_noun": noun, "template": template})
    if not entries:
        raise ConfigurationError(f"images {images} names no image")
    names = [e["name"] for e in entries]
    if len(set(names)) != len(names):
        raise ConfigurationError(f"images {images}: two images share a name (artefact file name): {names}")
    for e in entries:
        if e["template"] is not None and "{}" not in e["template"]:
            raise ConfigurationError(f"template of {e['name']!r} has no '{{}}': {e['template']!r}")
    return entries


class ConceptSetDataset(Dataset):
    """The rows of every batch in order; item ``i`` is row ``i`` of the flattened ``(group, step, slot, view)``."""

    def __init__(
        self, datasets: list[SingleConceptDataset], per_batch: int, steps: int, batch_size: int
    ) -> None:
        self.datasets, self.batch_size = datasets, batch_size
        self.rows: list[tuple[int, int, int, int, int]] = []  # (concept, group, step, slot, view)
        self.batches: list[list[int]] = []
        for g, first in enumerate(range(0, len(datasets), per_batch)):
            members = range(first, min(first + per_batch, len(datasets)))
            for s in range(steps):
                start = len(self.rows)
                self.rows += [(c, g, s, c - first, b) for c in members for b in range(batch_size)]
                self.batches.append(list(range(start, len(self.rows))))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        c, g, s, j, b = self.rows[i]
        item = self.datasets[c][(0, s * self.batch_size + b)]
        return {**item, "slot": j, "group": g, "step": s}

    def loader(self, num_workers: int = 0) -> ConceptSetLoader:
        """The batches in order (``groups * steps`` of them), resumable."""
        return ConceptSetLoader(self, num_workers)


class _BatchList(Sampler[list[int]]):
    """Fixed batches in order; ``start`` skips that many on the next iteration only (set by a resume)."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches, self.start = batches, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        start, self.start = self.start, 0
        return iter(self.batches[start:])


class ConceptSetLoader(DataLoader):
    """The batches of a :class:`ConceptSetDataset` in order, with the position Lightning checkpoints
    (``state_dict``: batches given so far); ``len()`` stays the full count while resuming, as Lightning expects."""

    def __init__(self, dataset: ConceptSetDataset, num_workers: int = 0) -> None:
        super().__init__(dataset, batch_sampler=_BatchList(dataset.batches), num_workers=num_workers)
        self._given = 0

    def __iter__(self) -> Iterator[Any]:
        self._given = self.batch_sampler.start
        for batch in super().__iter__():
            self._given += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches": int(self._given)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """The next iteration starts after ``state_dict["batches"]`` batches (none left: a fresh pass)."""
        given = int(state_dict["batches"])
        self.batch_sampler.start = self._given = given if given < len(self.batch_sampler) else 0


class ConceptSetDataModule(LightningDataModule):
    """Data for tuning many concepts, K per batch (``concepts_per_batch``), each for ``steps`` steps.

    Args:
        images: a folder of images or a list file (see the module docstring).
        concepts_per_batch: K; None = every usable image in one batch. More than the usable images is an error.
        class_noun: class noun of images whose entry names none.
        templates: prompt templates of images whose entry names none (default: ``PROMPT_TEMPLATES``).
        resolution: Side ``R`` of ``pixel_values``.
        clip_size: Side ``C`` of ``clip_pixel_values``.
        clip_mean: Per-channel mean of the image encoder's normalisation.
        clip_std: Per-channel std of the image encoder's normalisation.
        scale: Random-resized-crop area range.
        flip_p: Horizontal-flip probability.
        batch_size: augmented views per concept and step (B); a batch holds K * B rows.
        steps: tuning steps per concept.
        placeholder: Pseudo-word string in the prompts.
        seed: seed of every crop, flip and template (each concept's views are those of its own tuning run).
        num_workers: DataLoader worker processes.

    Raises:
        ConfigurationError: no usable image, K larger than the usable images, counts < 1, or a distributed run.
        MissingFileError: ``images`` does not exist.
    """

    def __init__(
        self,
        images: str,
        concepts_per_batch: int | None = None,
        class_noun: str | None = None,
        templates: list[str] | None = None,
        resolution: int = 32,
        clip_size: int = 32,
        clip_mean: tuple[float, float, float] = CLIP_MEAN,
        clip_std: tuple[float, float, float] = CLIP_STD,
        scale: tuple[float, float] = (0.8, 1.0),
        flip_p: float = 0.5,
        batch_size: int = 4,
        steps: int = 12,
        placeholder: str = DEFAULT_PLACEHOLDER,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1 or steps < 1 or (concepts_per_batch is not None and concepts_per_batch < 1):
            raise ConfigurationError(
                f"batch_size, steps and concepts_per_batch must be >= 1, got {batch_size}, {steps}, "
                f"{concepts_per_batch}"
            )
        check_augment_args(scale, flip_p)
        self.concepts: list[TuningConcept] = []
        self.skipped: list[tuple[str, str]] = []  # (image, one-line reason)
        for entry in read_concept_list(images):
            try:
                image = load_rgb(entry["image"])
                check_image_size(image.size, resolution, str(entry["image"]))
            except (TuningEncoderError, OSError) as err:
                reason = " ".join(str(err).split())
                self.skipped.append((str(entry["image"]), reason))
                warnings.warn(f"skipping {entry['image']}: {reason}", stacklevel=2)
                continue
            template = entry["template"]
            self.concepts.append(
                TuningConcept(
                    name=entry["name"],
                    image=image,
                    class_noun=entry["class_noun"] or class_noun,
                    templates=(template,) if template else (tuple(templates) if templates else None),
                    concept_id=len(self.concepts),
                )
            )
        if not self.concepts:
            raise ConfigurationError(f"images {images}: no usable image ({len(self.skipped)} skipped)")
        k = concepts_per_batch or len(self.concepts)
        if k > len(self.concepts):
            raise ConfigurationError(
                f"concepts_per_batch={k} exceeds the {len(self.concepts)} usable images in {images}"
            )
        self.concepts_per_batch, self.batch_size, self.steps = k, batch_size, steps
        self.resolution, self.num_workers = resolution, num_workers
        self._view_args = dict(
            resolution=resolution, clip_size=clip_size, clip_mean=clip_mean, clip_std=clip_std, scale=scale,
            flip_p=flip_p, placeholder=placeholder, seed=seed, num_samples=steps * batch_size,
        )  # fmt: skip

    def dataset(self) -> ConceptSetDataset:
        """Every batch's rows; ``.batches`` lists the row indices of each batch."""
        views = [
            SingleConceptDataset(c.image, concept_id=c.concept_id, templates=c.templates, **self._view_args)
            for c in self.concepts
        ]
        return ConceptSetDataset(views, self.concepts_per_batch, self.steps, self.batch_size)

    def train_dataloader(self) -> ConceptSetLoader:
        """``groups * steps`` batches of ``K * B`` rows (the last group may hold fewer concepts)."""
        if world_info(self)[0] > 1:
            raise ConfigurationError("ConceptSetDataModule runs on one device (devices: 1)")
        return self.dataset().loader(self.num_workers)
