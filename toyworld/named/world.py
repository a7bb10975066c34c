"""The toy world: procedural images of one object on a plain background, with captions naming every attribute.

It is the offline stand-in for the real world of Stable Diffusion: a base text-to-image model, a tiny CLIP and an
attribute checker are trained on it once (``assets/toyworld/``), so personalization can be seen and measured.

Attributes (``ATTRIBUTES``): shape, object colour, a coarse pattern, background colour, position and size. Two
shapes (``HELD_OUT_SHAPES``) and several shape-colour-pattern combinations (``HELD_OUT_COMBOS``) never appear in
base training: they are the personalization concepts (novel shapes need the LoRA; held-out combinations are
reachable by a word embedding).

Command line: ``python -m toyworld sample-prompts | render | write-concepts`` (``toyworld/__main__.py``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond", "heart", "moon")
HELD_OUT_SHAPES: tuple[str, ...] = ("heart", "moon")
TRAIN_SHAPES: tuple[str, ...] = tuple(s for s in SHAPES if s not in HELD_OUT_SHAPES)
# Plain English names, rendered close to what a person calls that colour.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (245, 220, 30),
    "white": (245, 245, 245),
    "orange": (250, 140, 20),
    "purple": (140, 40, 180),
    "pink": (250, 140, 190),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
PATTERNS: tuple[str, ...] = ("plain", "striped", "checkered")
POSITIONS: tuple[str, ...] = ("left", "center", "right")
SIZES: tuple[str, ...] = ("small", "large")
ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "pattern", "background", "position", "size")
VALUES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOUR_NAMES,
    "pattern": PATTERNS,
    "background": COLOUR_NAMES,
    "position": POSITIONS,
    "size": SIZES,
}
# Shape-colour-pattern combinations held out of base training (a word embedding can reach them).
HELD_OUT_COMBOS: tuple[tuple[str, str, str], ...] = (
    ("star", "red", "striped"),
    ("circle", "green", "checkered"),
    ("square", "purple", "striped"),
    ("triangle", "yellow", "checkered"),
    ("diamond", "blue", "checkered"),
    ("cross", "orange", "striped"),
)
# The personalization concepts: every held-out shape in two looks, and every held-out combination. Each has one
# input image: the object large, in the center, on a contrasting background (`concept_scene`).
HELD_OUT_CONCEPTS: tuple[tuple[str, str, str], ...] = (
    ("heart", "red", "plain"),
    ("heart", "blue", "striped"),
    ("moon", "yellow", "plain"),
    ("moon", "purple", "checkered"),
    *HELD_OUT_COMBOS,
)
POSITION_PHRASE = {"left": "on the left", "center": "in the center", "right": "on the right"}
_X = {"left": 0.32, "center": 0.50, "right": 0.68}
_RADIUS = {"small": 0.20, "large": 0.30}
_MASK63 = (1 << 63) - 1


@dataclass(frozen=True)
class Scene:
    """One scene of the world: a value for every attribute."""

    shape: str
    colour: str
    pattern: str
    background: str
    position: str
    size: str

    @property
    def identity(self) -> tuple[str, str, str]:
        return (self.shape, self.colour, self.pattern)

    def labels(self) -> dict[str, int]:
        """Class index of every attribute (the checker's targets)."""
        return {a: VALUES[a].index(getattr(self, a)) for a in ATTRIBUTES}


def identity_phrase(colour: str, pattern: str, shape: str) -> str:
    """The plain words of an object, e.g. ``"red striped star"``."""
    return f"{colour} {pattern} {shape}"


def caption(
    scene: Scene,
    rng: np.random.Generator | None = None,
    drop_prob: float = 0.0,
    identity: str | None = None,
) -> str:
    """The caption naming every attribute; with ``rng``, each attribute is dropped with ``drop_prob``.

    ``identity`` replaces the object's words (colour, pattern, shape), e.g. by a placeholder ``"<s*>"``:
    ``"a large <s*> on the left on a green background"``.
    """

    def keep(_: str) -> bool:
        return rng is None or rng.uniform() >= drop_prob

    words = []
    if keep("size"):
        words.append(scene.size)
    if identity is not None:
        words.append(identity)
    else:
        if keep("colour"):
            words.append(scene.colour)
        if keep("pattern"):
            words.append(scene.pattern)
        words.append(scene.shape if keep("shape") else "object")
    if keep("position"):
        words.append(POSITION_PHRASE[scene.position])
    if keep("background"):
        words.append(f"on {_article(scene.background)} {scene.background} background")
    return " ".join([_article(words[0]), *words])


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def concept_name(shape: str, colour: str, pattern: str) -> str:
    """File-safe name of a concept, e.g. ``"red_striped_star"``."""
    return f"{colour}_{pattern}_{shape}"


def concept_scene(shape: str, colour: str, pattern: str) -> Scene:
    """The input-image scene of a concept: large, in the center, on white (blue for yellow objects)."""
    return Scene(
        shape, colour, pattern, "blue" if colour in ("yellow", "white") else "white", "center", "large"
    )


def concept_template(shape: str, colour: str, pattern: str) -> str:
    """The caption of a concept's input image with ``{}`` for the placeholder (the tuning prompt)."""
    return caption(concept_scene(shape, colour, pattern), identity="{}")


def is_held_out(scene: Scene) -> bool:
    return scene.shape in HELD_OUT_SHAPES or scene.identity in HELD_OUT_COMBOS


def random_scene(rng: np.random.Generator, split: str = "base", **fixed: str) -> Scene:
    """A scene from the ``base`` distribution (held-out shapes and combinations excluded) or from ``all``.

    Keyword arguments fix attributes (e.g. ``shape="heart"``); the object and background colours always differ.
    """
    if split not in ("base", "all"):
        raise ValueError(f"split must be 'base' or 'all', got {split!r}")
    for _ in range(1000):
        values = {a: fixed.get(a) or VALUES[a][int(rng.integers(len(VALUES[a])))] for a in ATTRIBUTES}
        if split == "base" and "shape" not in fixed:
            values["shape"] = TRAIN_SHAPES[int(rng.integers(len(TRAIN_SHAPES)))]
        scene = Scene(**values)
        if scene.colour == scene.background:
            continue
        if split == "base" and is_held_out(scene) and not fixed:
            continue
        return scene
    raise ValueError(f"no scene satisfies {fixed}")


def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of ``shape`` of radius ``r`` centred at the origin of the coordinates ``x``, ``y``."""
    ax, ay = np.abs(x), np.abs(y)
    if shape == "circle":
        return x**2 + y**2 <= r**2
    if shape == "square":
        return np.maximum(ax, ay) <= 0.82 * r
    if shape == "diamond":
        return ax + ay <= r
    if shape == "triangle":  # upward, base at the bottom (y grows downward)
        return (y <= 0.8 * r) & (y >= -r + 2.0 * ax)
    if shape == "cross":
        w = 0.34 * r
        return ((ax <= w) & (ay <= r)) | ((ay <= w) & (ax <= r))
    if shape == "star":
        theta = np.arctan2(x, -y)
        rho = np.sqrt(x**2 + y**2)
        k = (np.cos(5 * theta) + 1) / 2  # 1 at the 5 tips
        return rho <= r * (0.45 + 0.55 * k**2)
    if shape == "heart":
        u, v = x / r * 1.25, -y / r * 1.25 + 0.15
        return (u**2 + v**2 - 1) ** 3 - u**2 * v**3 <= 0
    if shape == "moon":
        return (x**2 + y**2 <= r**2) & ((x - 0.45 * r) ** 2 + (y + 0.1 * r) ** 2 > (0.8 * r) ** 2)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def render(scene: Scene, size: int = 32, rng: np.random.Generator | None = None) -> np.ndarray:
    """The scene as a uint8 array ``(size, size, 3)``; ``rng`` adds a small jitter of place and size.

    Patterns are coarse (about 1/8 of the image per stripe or square) so they survive at 32 px; a pattern's
    second tone is the object colour at 45 % brightness.
    """
    jitter = rng.uniform(-1, 1, 3) if rng is not None else np.zeros(3)
    cx = _X[scene.position] + 0.03 * jitter[0]
    cy = 0.5 + 0.05 * jitter[1]
    r = _RADIUS[scene.size] * (1 + 0.06 * jitter[2])
    t = (np.arange(size) + 0.5) / size
    x, y = np.meshgrid(t - cx, t - cy, indexing="xy")
    mask = _shape_mask(scene.shape, x, y, r)
    colour = np.array(COLOURS[scene.colour], dtype=np.float32)
    dark = colour * 0.45
    period = 0.125
    if scene.pattern == "plain":
        second = np.zeros_like(mask)
    elif scene.pattern == "striped":
        second = np.floor(y / period).astype(int) % 2 == 1
    elif scene.pattern == "checkered":
        second = (np.floor(x / period).astype(int) + np.floor(y / period).astype(int)) % 2 == 1
    else:
        raise ValueError(f"unknown pattern {scene.pattern!r}; known: {', '.join(PATTERNS)}")
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = np.array(COLOURS[scene.background], dtype=np.float32)
    obj = np.where(second[..., None], dark, colour)
    img = np.where(mask[..., None], obj, img)
    return np.clip(img, 0, 255).astype(np.uint8)


def seeded_rng(seed: int, *keys: int) -> np.random.Generator:
    """A numpy generator that is a pure function of ``seed`` and the integer ``keys``."""
    return np.random.default_rng([seed & _MASK63, *keys])


def sample_prompts(n: int, seed: int) -> list[dict]:
    """``n`` base-distribution prompts with every attribute stated, and their attributes."""
    rng = seeded_rng(seed, 0x70726F6D)
    out = []
    for _ in range(n):
        scene = random_scene(rng, "base")
        out.append({"prompt": caption(scene), "attributes": asdict(scene)})
    return out


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` -> float ``(B, 3, H, W)`` in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def render_batch(
    rng: np.random.Generator,
    n: int,
    split: str = "base",
    size: int = 32,
    noise: float = 0.0,
    **fixed: str,
) -> tuple[np.ndarray, list[Scene]]:
    """``n`` random scenes rendered (with jitter and optional Gaussian pixel noise of std ``noise`` in 0..255)."""
    scenes = [random_scene(rng, split, **fixed) for _ in range(n)]
    images = np.stack([render(s, size, rng) for s in scenes])
    if noise > 0:
        images = np.clip(images + rng.normal(0, noise, images.shape), 0, 255).astype(np.uint8)
    return images, scenes


class ToyWorldStream(IterableDataset):
    """An endless, seeded stream of ``(image, caption, labels)`` batches from the world.

    Args:
        batch_size: scenes per batch.
        seed: the stream is a function of (seed, worker) only.
        split: ``base`` (held-out shapes and combinations excluded) or ``all``.
        drop_prob: probability of dropping each attribute from the caption.
        empty_prob: probability of the empty caption (for classifier-free guidance).
        size: image size in pixels.
    """

    def __init__(
        self,
        batch_size: int = 64,
        seed: int = 0,
        split: str = "base",
        drop_prob: float = 0.15,
        empty_prob: float = 0.1,
        size: int = 32,
        start_step: int = 0,
    ):
        super().__init__()
        self.batch_size, self.seed, self.split = batch_size, seed, split
        self.drop_prob, self.empty_prob, self.size = drop_prob, empty_prob, size
        self.start_step = start_step

    def batch(self, step: int) -> dict:
        """Batch number ``step`` (a pure function of the seed and ``step``: resumable)."""
        rng = seeded_rng(self.seed, 0x62617463, step)
        images, scenes = render_batch(rng, self.batch_size, self.split, self.size)
        captions = [
            "" if rng.uniform() < self.empty_prob else caption(s, rng, self.drop_prob) for s in scenes
        ]
        labels = {a: torch.tensor([s.labels()[a] for s in scenes]) for a in ATTRIBUTES}
        return {"pixels": to_tensor(images), "captions": captions, "labels": labels, "scenes": scenes}

    def __iter__(self) -> Iterator[dict]:
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1


def write_concepts(out: str) -> str:
    """Writes ``<name>.png`` (32 px, no jitter) for every held-out concept and ``concepts.json`` describing them."""
    from pathlib import Path

    from PIL import Image

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape, colour, pattern in HELD_OUT_CONCEPTS:
        name = concept_name(shape, colour, pattern)
        scene = concept_scene(shape, colour, pattern)
        Image.fromarray(render(scene)).save(folder / f"{name}.png")
        rows.append(
            {
                "name": name,
                "image": f"{name}.png",
                "kind": "novel_shape" if shape in HELD_OUT_SHAPES else "held_out_combination",
                "class_noun": "object" if shape in HELD_OUT_SHAPES else shape,
                "words": identity_phrase(colour, pattern, shape),
                "template": concept_template(shape, colour, pattern),
                "attributes": asdict(scene),
            }
        )
    (folder / "concepts.json").write_text(json.dumps(rows, indent=1) + "\n")
    return str(folder)
