"""The instance world: "my star", not "a star". Each object is a named category plus instance details no caption
ever states.

- **Category** (the class noun, one word in captions): the shape family, e.g. ``star``. Six categories are seen in
  base training (``TRAIN_CATEGORIES``); ``heart`` and ``moon`` are held out for the test concepts and ``arrow`` for
  the validation concepts (``HELD_OUT_CATEGORIES``): the hard kind.
- **Instance details** (:class:`Instance`, never in a caption): the exact colour (continuous hue, saturation,
  value), the outline's variation within its family (``aspect``, ``rotation``, ``roundness``; ``points`` for a
  star) and the pattern (kind ``plain | stripes | checks | dots``, ``angle``, ``period``). The pattern lives in the
  object's own frame (period in units of its radius), so it scales with the object and identity does not depend on
  the size the prompt asks for.
- **Context** (named in captions, as in ``toyworld/named/world.py``): background (one of the world's eight colour
  names, always a plain colour far from the object's two tones, so the object can be segmented from pixels;
  :func:`backgrounds_for`), position (``left | right | top | bottom | center``) and size (``small | large``).

Captions name the category and the context only, with **no colour word**: ``"a large star at the top on a green
background"``. Why none, not even a coarse one: a colour word would let the words alone fix part of the identity,
so the "random instance of the same category" reference row (what the words give) would no longer be what a class
noun gives, and the hue bins of the held-out split would partly be nameable; with no colour word every instance
detail is equally unnamed, like a dog's exact coat in "a dog". Base training therefore shows many visibly
different instances for the same words (:class:`InstanceWorldStream`).

**Held-out split** (seeded, :func:`cell_split`): the detail space of each training category is cut into cells
(12 hue bins x 4 pattern kinds); per category a seeded permutation gives ``TEST_CELLS_PER_CATEGORY`` test cells and
``VALIDATION_CELLS_PER_CATEGORY`` validation cells, the rest is the training distribution. Held-out instances
(the main kind) are drawn inside held-out cells; the training stream never yields an instance in a held-out
cell nor of a held-out category. Test and validation concepts use disjoint cells and disjoint held-out categories.

Concepts (``toyworld/instance/concepts.py``) are written like the world's and served to ``evaluate.py run``;
``toyworld/instance/pixels.py`` measures identity and prompt from pixels. Command line: ``python -m toyworld
instance-concepts | instance-render | instance-calibrate``.
"""

from __future__ import annotations

import colorsys
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from toyworld.named.world import COLOURS, _article, seeded_rng

TRAIN_CATEGORIES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
TEST_CATEGORIES: tuple[str, ...] = ("heart", "moon")  # held out of training: the test's hard kind
VALIDATION_CATEGORIES: tuple[str, ...] = ("arrow",)  # held out of training: the validation's hard kind
HELD_OUT_CATEGORIES: tuple[str, ...] = TEST_CATEGORIES + VALIDATION_CATEGORIES
CATEGORIES: tuple[str, ...] = TRAIN_CATEGORIES + HELD_OUT_CATEGORIES
PATTERN_KINDS: tuple[str, ...] = ("plain", "stripes", "checks", "dots")
HUE_BINS, TEST_CELLS_PER_CATEGORY, VALIDATION_CELLS_PER_CATEGORY, SPLIT_SEED = 12, 8, 4, 16
BACKGROUNDS: tuple[str, ...] = tuple(COLOURS)
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
SIZES: tuple[str, ...] = ("small", "large")
CONTEXT: tuple[str, ...] = ("background", "position", "size")
POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
ANCHORS: dict[str, tuple[float, float]] = {  # object centre (x, y) as a fraction of the image
    "left": (0.33, 0.5),
    "right": (0.67, 0.5),
    "top": (0.5, 0.33),
    "bottom": (0.5, 0.67),
    "center": (0.5, 0.5),
}
# No part of an object is farther than this from its centre (fraction of the image side).
RADIUS: dict[str, float] = {"small": 0.18, "large": 0.28}
DARK = 0.45  # a pattern's second tone: the object colour at this brightness (as in world.render)
MIN_CONTRAST = 100.0  # RGB distance between each object tone and an allowed background
# Rotation range per category (degrees): beyond it a family turns into another (a square at 45 deg is a diamond).
_ROTATION = {"circle": (0.0, 180.0), "star": (0.0, 360.0), "moon": (0.0, 360.0), "arrow": (0.0, 360.0)}
_ROTATION |= {"square": (-15.0, 15.0), "diamond": (-15.0, 15.0), "triangle": (-20.0, 20.0)}
_ROTATION |= {"cross": (-20.0, 20.0), "heart": (-25.0, 25.0)}
_ASPECT = {"circle": (0.65, 1.0), "diamond": (0.5, 0.85), "cross": (0.7, 1.0)}  # others: (0.75, 1.0)


@dataclass(frozen=True)
class Instance:
    """One object: its category (named) and its instance details (never named).

    Attributes:
        category: the shape family, the one word captions say (``CATEGORIES``).
        hue: degrees in [0, 360); ``saturation`` in [0.55, 0.95] and ``value`` in [0.7, 0.95] (HSV).
        aspect: minor / major extent of the outline, in (0, 1] (the outline is squeezed along its minor axis).
        rotation: degrees, within the category's range.
        roundness: in [0, 1], the family's own free parameter (a square's corner rounding, a star's inner radius,
            a cross's arm width, a triangle's skew, a diamond's bulge, a heart's lobes, a moon's bite, an arrow's head).
        points: a star's number of points (4-7); 0 for other categories.
        pattern: ``PATTERN_KINDS``; ``angle`` in degrees [0, 180); ``period`` in units of the object's radius.
    """

    category: str
    hue: float
    saturation: float
    value: float
    aspect: float
    rotation: float
    roundness: float
    points: int
    pattern: str
    angle: float
    period: float

    def rgb(self) -> np.ndarray:
        """The object's main colour, float RGB in 0..255."""
        return np.array(colorsys.hsv_to_rgb(self.hue / 360.0, self.saturation, self.value)) * 255.0

    def tones(self) -> tuple[np.ndarray, np.ndarray]:
        """The main colour and the pattern's dark tone."""
        c = self.rgb()
        return c, c * DARK

    def cell(self) -> tuple[str, int, str]:
        """The split cell: (category, hue bin, pattern kind)."""
        return (self.category, int(self.hue // (360 / HUE_BINS)) % HUE_BINS, self.pattern)

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Instance:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Context:
    """The named context of a scene."""

    background: str
    position: str
    size: str


def cell_split(seed: int = SPLIT_SEED) -> dict[str, set[tuple[str, int, str]]]:
    """The seeded split of every training category's detail cells into ``test``, ``validation`` and ``train``."""
    out: dict[str, set[tuple[str, int, str]]] = {"test": set(), "validation": set(), "train": set()}
    for ci, category in enumerate(TRAIN_CATEGORIES):
        cells = [(category, h, p) for h in range(HUE_BINS) for p in PATTERN_KINDS]
        order = seeded_rng(seed, 0x63656C6C, ci).permutation(len(cells))
        for rank, i in enumerate(order):
            if rank < TEST_CELLS_PER_CATEGORY:
                out["test"].add(cells[i])
            elif rank < TEST_CELLS_PER_CATEGORY + VALIDATION_CELLS_PER_CATEGORY:
                out["validation"].add(cells[i])
            else:
                out["train"].add(cells[i])
    return out


_SPLIT = cell_split()


def instance_split(inst: Instance) -> str:
    """``train``, ``validation`` or ``test``: where an instance belongs (its category, else its cell)."""
    if inst.category in TEST_CATEGORIES:
        return "test"
    if inst.category in VALIDATION_CATEGORIES:
        return "validation"
    for split, cells in _SPLIT.items():
        if inst.cell() in cells:
            return split
    raise ValueError(f"unknown category {inst.category!r}")


def backgrounds_for(inst: Instance) -> list[str]:
    """The named backgrounds far enough (``MIN_CONTRAST``) from both of the object's tones."""
    tones = inst.tones()
    return [
        b
        for b in BACKGROUNDS
        if min(float(np.linalg.norm(np.array(COLOURS[b], float) - t)) for t in tones) >= MIN_CONTRAST
    ]


def _details(rng: np.random.Generator, category: str, hue_bin: int | None, pattern: str | None) -> Instance:
    width = 360 / HUE_BINS
    hue = float(rng.uniform(0, 360) if hue_bin is None else (hue_bin + rng.uniform(0.02, 0.98)) * width)
    lo, hi = _ROTATION[category]
    alo, ahi = _ASPECT.get(category, (0.75, 1.0))
    return Instance(
        category=category,
        hue=hue,
        saturation=float(rng.uniform(0.55, 0.95)),
        value=float(rng.uniform(0.7, 0.95)),
        aspect=float(rng.uniform(alo, ahi)),
        rotation=float(rng.uniform(lo, hi)),
        roundness=float(rng.uniform(0, 1)),
        points=int(rng.integers(4, 8)) if category == "star" else 0,
        pattern=pattern if pattern is not None else PATTERN_KINDS[int(rng.integers(len(PATTERN_KINDS)))],
        angle=float(rng.uniform(0, 180)),
        period=float(rng.uniform(0.5, 0.85)),
    )


def sample_instance(rng: np.random.Generator, split: str = "train", category: str | None = None) -> Instance:
    """An instance of ``split`` (``train``: the base-training distribution; ``test`` / ``validation``: held out,
    in that split's cells or categories; ``any``: the whole detail space of ``category``), with at least three
    allowed backgrounds."""
    if split not in ("train", "test", "validation", "any"):
        raise ValueError(f"split must be train, test, validation or any, got {split!r}")
    if category is not None and category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; known: {', '.join(CATEGORIES)}")
    for _ in range(1000):
        if split == "any":
            inst = _details(rng, category or CATEGORIES[int(rng.integers(len(CATEGORIES)))], None, None)
        elif category in HELD_OUT_CATEGORIES:
            inst = _details(rng, category, None, None)
        else:
            cells = sorted(c for c in _SPLIT[split] if category is None or c[0] == category)
            if not cells:
                raise ValueError(f"no {split} cells for category {category!r}")
            cat, hue_bin, pattern = cells[int(rng.integers(len(cells)))]
            inst = _details(rng, cat, hue_bin, pattern)
        if split != "any" and instance_split(inst) != split:  # only a held-out category of the other split
            raise ValueError(f"category {category!r} is not in split {split!r}")
        if len(backgrounds_for(inst)) >= 3:
            return inst
    raise ValueError(f"no {split} instance of {category!r} with three backgrounds")


def caption(category: str, context: Context, identity: str | None = None) -> str:
    """Category and context only, never a detail: ``"a large star at the top on a green background"``;
    ``identity`` replaces the category word (e.g. by ``"<s*>"``)."""
    words = [context.size, identity if identity is not None else category, POSITION_PHRASE[context.position]]
    words.append(f"on {_article(context.background)} {context.background} background")
    return " ".join([_article(words[0]), *words])


def all_contexts(inst: Instance) -> list[Context]:
    """Every context the world allows for ``inst`` (backgrounds far from its tones)."""
    return [Context(b, p, s) for b in backgrounds_for(inst) for p in POSITIONS for s in SIZES]


def random_context(rng: np.random.Generator, inst: Instance) -> Context:
    bgs = backgrounds_for(inst)
    return Context(
        bgs[int(rng.integers(len(bgs)))],
        POSITIONS[int(rng.integers(len(POSITIONS)))],
        SIZES[int(rng.integers(len(SIZES)))],
    )
