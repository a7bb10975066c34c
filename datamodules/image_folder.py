"""Unlabeled, mixed-domain image folders for encoder pretraining (no classes, no masks)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from datamodules.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_PLACEHOLDER,
    IMAGE_EXTENSIONS,
    ImageLoadError,
    ViewSpec,
    item_generator,
    load_rgb,
    split_index,
)


class SkippedImageWarning(UserWarning):
    """Issued once per unreadable image file that a dataset skipped."""


def scan_images(root: str | Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[str]:
    """Lists the image files under ``root`` recursively, sorted.

    Extensions match case-insensitively; hidden files and folders (name starting with ``.``, e.g. macOS
    ``._x.jpg`` resource forks) are ignored; symlinked folders are followed.

    Args:
        root: Folder to scan.
        extensions: Accepted suffixes, lower case, with the dot.

    Returns:
        Sorted absolute paths (sorted for a deterministic index -> file mapping).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        NotADirectoryError: ``root`` is not a folder.
        ValueError: ``root`` holds no image file.
    """
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise FileNotFoundError(f"image root not found: {root}")
    if not root_path.is_dir():
        raise NotADirectoryError(f"image root is not a folder: {root}")
    exts = tuple(e.lower() for e in extensions)
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root_path, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(exts):
                found.append(str((Path(dirpath) / name).resolve()))
    if not found:
        raise ValueError(f"no image files ({', '.join(exts)}) under image root: {root}")
    return sorted(found)


class ImageFolderDataset(Dataset):
    """Every image under one or more folders, each one augmented view + one random prompt per item.

    Item ``i`` is file ``i`` of the sorted scan (roots concatenated in the given order); its crop, flip and
    template are a pure function of ``(seed, epoch, i)``. An unreadable file is skipped at ``__getitem__``:
    one :class:`SkippedImageWarning` names it, it is added to :attr:`skipped`, and the item is replaced by the
    next readable file (``i + 1``, ``i + 2``, ... modulo length, deterministic), so a bad file never stops an
    epoch. With ``num_workers > 0`` each worker process holds its own copy of :attr:`skipped`, so the count
    seen in the main process covers only the items it loaded itself.

    Args:
        roots: Image folders (or a single folder), scanned recursively for jpg/jpeg/png/webp/bmp.
        resolution: Side ``R`` of ``pixel_values`` (the backbone's pixel resolution).
        clip_size: Side ``C`` of ``clip_pixel_values`` (the image encoder's input size).
        clip_mean: Per-channel mean of the image encoder's normalisation.
        clip_std: Per-channel std of the image encoder's normalisation.
        scale: Random-resized-crop area range (fraction of the largest centred square).
        flip_p: Horizontal-flip probability.
        seed: Seed of every per-item random choice.
        placeholder: Pseudo-word string put into the prompt templates.
        templates: Prompt templates with one ``{}`` slot; defaults to ``PROMPT_TEMPLATES``.

    Raises:
        FileNotFoundError: a root does not exist.
        ValueError: a root has no image file, or no root is given.
    """

    def __init__(
        self,
        roots: Sequence[str | Path] | str | Path,
        resolution: int = 32,
        clip_size: int = 32,
        clip_mean: Sequence[float] = CLIP_MEAN,
        clip_std: Sequence[float] = CLIP_STD,
        scale: tuple[float, float] = (0.8, 1.0),
        flip_p: float = 0.5,
        seed: int = 0,
        placeholder: str = DEFAULT_PLACEHOLDER,
        templates: Sequence[str] | None = None,
    ) -> None:
        if isinstance(roots, (str, Path)):
            roots = [roots]
        if not roots:
            raise ValueError("ImageFolderDataset needs at least one image root")
        self.roots = [str(r) for r in roots]
        self.files: list[str] = [f for root in self.roots for f in scan_images(root)]
        self.views = ViewSpec.build(
            resolution, clip_size, clip_mean, clip_std, scale, flip_p, placeholder, templates
        )
        self.seed = seed
        self.epoch = 0
        self.skipped: set[str] = set()

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch used by integer indices (``(epoch, i)`` indices carry their own)."""
        self.epoch = int(epoch)

    def _load(self, index: int):
        """Loads file ``index`` or the next readable one; returns ``(image, file_index)``."""
        n = len(self.files)
        for step in range(n):
            j = (index + step) % n
            path = self.files[j]
            if path in self.skipped:
                continue
            try:
                return load_rgb(path), j
            except (ImageLoadError, OSError) as err:
                self.skipped.add(path)
                warnings.warn(f"skipping unreadable image {path}: {err}", SkippedImageWarning, stacklevel=3)
        raise RuntimeError(
            f"no readable image left under {', '.join(self.roots)} ({n} files, all unreadable)"
        )

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, torch.Tensor | str | int]:
        """Returns one item.

        Args:
            index: ``i`` or ``(epoch, i)``.

        Returns:
            ``pixel_values`` (3, R, R) in [-1, 1], ``clip_pixel_values`` (3, C, C), ``prompt`` (str),
            ``concept_id`` (index of the file actually loaded) and ``index`` (``i``).
        """
        epoch, i = split_index(index, self.epoch)
        if not 0 <= i < len(self.files):
            raise IndexError(f"index {i} out of range for {len(self.files)} images")
        img, file_index = self._load(i)
        item = self.views.item(img, item_generator(self.seed, epoch, i))
        return {**item, "concept_id": file_index, "index": i}
