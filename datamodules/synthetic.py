"""Procedural concepts: distinct, file-free, seeded images for tests, smoke runs and held-out evaluation.

Concept ``i`` of seed ``s`` has a kind (``KINDS``), a palette and geometry derived from ``(s, i)`` only, drawn
in normalised coordinates, so :func:`render_concept` gives the same picture at any pixel size and in any
process. Kinds are balanced: ``i % len(KINDS)`` indexes a seed-dependent permutation of ``KINDS``.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from datamodules.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_PLACEHOLDER,
    ViewSpec,
    item_generator,
    split_index,
)

KINDS: tuple[str, ...] = ("shapes", "textures", "stripes", "blobs", "checker", "rings")
_MASK63 = (1 << 63) - 1


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed & _MASK63, *keys])


def concept_kind(seed: int, i: int) -> str:
    """The kind of concept ``i`` under ``seed`` (balanced over ``KINDS``)."""
    order = _rng(seed, 0x6B696E64).permutation(len(KINDS))
    return KINDS[int(order[i % len(KINDS)])]


def concept_name(seed: int, i: int) -> str:
    """A readable, unique name such as ``"stripes_03"``."""
    return f"{concept_kind(seed, i)}_{i:02d}"


def _palette(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` well-separated saturated colours, float in [0, 1], shape ``(n, 3)``."""
    hue0 = rng.uniform()
    hues = (hue0 + np.arange(n) / n + rng.uniform(-0.08, 0.08, n)) % 1.0
    sats = rng.uniform(0.55, 1.0, n)
    vals = rng.uniform(0.35, 1.0, n)
    vals[rng.integers(n)] = rng.uniform(0.85, 1.0)  # at least one bright colour
    return np.array([colorsys.hsv_to_rgb(h, s, v) for h, s, v in zip(hues, sats, vals)])


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    t = (np.arange(size) + 0.5) / size
    return np.meshgrid(t, t, indexing="xy")  # x: columns, y: rows, both (size, size) in (0, 1)


def _indexed(index: np.ndarray, palette: np.ndarray) -> np.ndarray:
    return palette[np.asarray(index, dtype=np.int64) % len(palette)]


def _stripes(rng: np.random.Generator, size: int) -> np.ndarray:
    x, y = _grid(size)
    theta, freq, phase = rng.uniform(0, np.pi), rng.uniform(3, 8), rng.uniform()
    t = ((x - 0.5) * np.cos(theta) + (y - 0.5) * np.sin(theta)) * freq + phase
    return _indexed(np.floor(t), _palette(rng, int(rng.integers(2, 4))))


def _checker(rng: np.random.Generator, size: int) -> np.ndarray:
    x, y = _grid(size)
    theta, cells = rng.choice([0.0, np.pi / 4]) + rng.uniform(-0.15, 0.15), rng.uniform(3, 7)
    u = (x - 0.5) * np.cos(theta) - (y - 0.5) * np.sin(theta)
    v = (x - 0.5) * np.sin(theta) + (y - 0.5) * np.cos(theta)
    return _indexed(np.floor(u * cells) + np.floor(v * cells), _palette(rng, 2))


def _rings(rng: np.random.Generator, size: int) -> np.ndarray:
    x, y = _grid(size)
    cx, cy, freq = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(4, 9)
    r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2) * freq
    return _indexed(np.floor(r), _palette(rng, int(rng.integers(2, 4))))


def _blobs(rng: np.random.Generator, size: int) -> np.ndarray:
    x, y = _grid(size)
    field = np.zeros_like(x)
    for _ in range(int(rng.integers(4, 8))):
        cx, cy, sigma = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.07, 0.16)
        field += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
    level = (field > 0.45).astype(np.int64) + (field > 1.1).astype(np.int64)
    return _indexed(level, _palette(rng, 3))


def _textures(rng: np.random.Generator, size: int) -> np.ndarray:
    noise = np.zeros((size, size))
    for octave, cells in enumerate((int(rng.integers(3, 6)), int(rng.integers(8, 13)))):
        coarse = Image.fromarray(rng.uniform(0, 1, (cells, cells)).astype(np.float32))
        noise += 0.5**octave * np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC))
    noise = (noise - noise.min()) / max(float(np.ptp(noise)), 1e-8)
    pal = _palette(rng, 3)
    stops = np.linspace(0, 1, len(pal))
    return np.stack([np.interp(noise, stops, pal[:, c]) for c in range(3)], axis=-1)


def _shapes(rng: np.random.Generator, size: int) -> np.ndarray:
    pal = _palette(rng, 4)
    img = Image.new("RGB", (size, size), tuple(int(c * 255) for c in pal[0]))
    draw = ImageDraw.Draw(img)
    for k in range(int(rng.integers(3, 7))):
        colour = tuple(int(c * 255) for c in pal[1 + k % 3])
        cx, cy, rad = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.25)
        shape = int(rng.integers(3))
        box = [(cx - rad) * size, (cy - rad) * size, (cx + rad) * size, (cy + rad) * size]
        if shape == 0:
            draw.ellipse(box, fill=colour)
        elif shape == 1:
            draw.rectangle(box, fill=colour)
        else:
            sides, rot = int(rng.integers(3, 7)), rng.uniform(0, 2 * np.pi)
            draw.regular_polygon(
                (cx * size, cy * size, rad * size), sides, rotation=float(np.degrees(rot)), fill=colour
            )
    return np.asarray(img, dtype=np.float64) / 255.0


_RENDERERS = {
    "shapes": _shapes,
    "textures": _textures,
    "stripes": _stripes,
    "blobs": _blobs,
    "checker": _checker,
    "rings": _rings,
}


def render_concept(seed: int, i: int, size: int = 64) -> Image.Image:
    """Renders concept ``i`` of ``seed`` without augmentation (its "real image").

    Args:
        seed: Concept-set seed.
        i: Concept id (``>= 0``).
        size: Side in pixels.

    Returns:
        RGB PIL image of size ``(size, size)``.
    """
    if i < 0:
        raise ValueError(f"synthetic concept id must be >= 0, got {i}")
    kind = concept_kind(seed, i)
    arr = _RENDERERS[kind](_rng(seed, 0x636F6E63, i), size)
    return Image.fromarray(np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8))


class SyntheticConceptDataset(Dataset):
    """Augmented views of procedural concepts, one random prompt each; needs no files.

    Item ``k`` shows concept ``concept_ids[k % len(concept_ids)]`` (consecutive items are different
    concepts, so even an unshuffled batch holds several), augmented with randomness from
    ``(augment_seed, epoch, k)``. Length is ``len(concept_ids) * samples_per_concept``.

    Args:
        num_concepts: Size of the concept set; ids are ``0 .. num_concepts - 1``.
        resolution: Side ``R`` of ``pixel_values``.
        clip_size: Side ``C`` of ``clip_pixel_values``.
        concept_ids: Ids this dataset serves (e.g. all but a held-out few); ``None`` = all.
        samples_per_concept: Items per concept per epoch.
        seed: Seed of the concept set (kinds, palettes, geometry).
        augment_seed: Seed of crops, flips and templates; ``None`` = ``seed``.
        render_size: Side of the rendered image before augmentation; ``None`` = ``2 * max(R, C)``.
        clip_mean: Per-channel mean of the image encoder's normalisation.
        clip_std: Per-channel std of the image encoder's normalisation.
        scale: Random-resized-crop area range.
        flip_p: Horizontal-flip probability.
        placeholder: Pseudo-word string put into the prompt templates.
        templates: Prompt templates with one ``{}`` slot; defaults to ``PROMPT_TEMPLATES``.

    Attributes:
        concept_names: Name of every concept id in the set, e.g. ``"stripes_03"`` (indexed by id).
        class_nouns: Kind of every concept id, e.g. ``"stripes"`` (indexed by id).
    """

    def __init__(
        self,
        num_concepts: int = 64,
        resolution: int = 32,
        clip_size: int = 32,
        concept_ids: Sequence[int] | None = None,
        samples_per_concept: int = 8,
        seed: int = 0,
        augment_seed: int | None = None,
        render_size: int | None = None,
        clip_mean: Sequence[float] = CLIP_MEAN,
        clip_std: Sequence[float] = CLIP_STD,
        scale: tuple[float, float] = (0.8, 1.0),
        flip_p: float = 0.5,
        placeholder: str = DEFAULT_PLACEHOLDER,
        templates: Sequence[str] | None = None,
    ) -> None:
        if num_concepts < 1:
            raise ValueError(f"num_concepts must be >= 1, got {num_concepts}")
        if samples_per_concept < 1:
            raise ValueError(f"samples_per_concept must be >= 1, got {samples_per_concept}")
        ids = list(range(num_concepts)) if concept_ids is None else [int(c) for c in concept_ids]
        if not ids:
            raise ValueError("concept_ids is empty")
        bad = [c for c in ids if not 0 <= c < num_concepts]
        if bad:
            raise ValueError(f"concept_ids {bad} outside 0..{num_concepts - 1}")
        self.num_concepts = num_concepts
        self.concept_ids = ids
        self.samples_per_concept = samples_per_concept
        self.views = ViewSpec.build(
            resolution, clip_size, clip_mean, clip_std, scale, flip_p, placeholder, templates
        )
        self.seed = seed
        self.augment_seed = seed if augment_seed is None else augment_seed
        self.render_size = render_size or 2 * max(resolution, clip_size)
        self.concept_names = [concept_name(seed, i) for i in range(num_concepts)]
        self.class_nouns = [concept_kind(seed, i) for i in range(num_concepts)]
        self.epoch = 0
        self._cache: dict[int, Image.Image] = {}

    def __len__(self) -> int:
        return len(self.concept_ids) * self.samples_per_concept

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch used by integer indices (``(epoch, i)`` indices carry their own)."""
        self.epoch = int(epoch)

    def render(self, i: int) -> Image.Image:
        """Un-augmented image of concept id ``i``, ``(render_size, render_size)`` RGB (cached)."""
        if not 0 <= i < self.num_concepts:
            raise IndexError(f"concept id {i} outside 0..{self.num_concepts - 1}")
        if i not in self._cache:
            self._cache[i] = render_concept(self.seed, i, self.render_size)
        return self._cache[i]

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, torch.Tensor | str | int]:
        """Returns one item.

        Args:
            index: ``k`` or ``(epoch, k)``.

        Returns:
            ``pixel_values`` (3, R, R) in [-1, 1], ``clip_pixel_values`` (3, C, C), ``prompt`` (str),
            ``concept_id`` (global concept id) and ``index`` (``k``).
        """
        epoch, k = split_index(index, self.epoch)
        if not 0 <= k < len(self):
            raise IndexError(f"index {k} out of range for {len(self)} items")
        cid = self.concept_ids[k % len(self.concept_ids)]
        item = self.views.item(self.render(cid), item_generator(self.augment_seed, epoch, k))
        return {**item, "concept_id": cid, "index": k}
