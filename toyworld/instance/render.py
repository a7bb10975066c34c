"""The instance world's renderer: an instance's outline (its category's family, varied by aspect, rotation,
roundness and points) and pattern in its own frame, drawn in a context, anti-aliased."""

from __future__ import annotations

import numpy as np

from toyworld.instance.world import ANCHORS, CATEGORIES, PATTERN_KINDS, RADIUS, Context, Instance
from toyworld.named.world import COLOURS, _shape_mask


def _outline(inst: Instance, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of the instance's outline of radius ``r`` at the origin of ``x``, ``y`` (y grows downward)."""
    phi = np.deg2rad(inst.rotation)
    u = x * np.cos(phi) + y * np.sin(phi)
    v = -x * np.sin(phi) + y * np.cos(phi)
    c, q = inst.category, inst.roundness
    if c in ("circle", "star", "moon", "arrow"):
        v = v / inst.aspect  # squeeze across the long axis
    else:
        u = u / inst.aspect  # squeeze the width
    if c == "circle":
        p = 1.8 + 0.6 * q
        return np.abs(u) ** p + np.abs(v) ** p <= r**p
    if c == "square":
        p = 3.5 + 8.0 * (1 - q)
        s = 0.75 * r
        return np.abs(u) ** p + np.abs(v) ** p <= s**p
    if c == "triangle":
        skew = (q - 0.5) * 0.7 * r
        return _shape_mask("triangle", u - skew * (0.8 * r - v) / (1.8 * r), v, r)
    if c == "star":
        theta = np.arctan2(u, -v)
        rho = np.sqrt(u**2 + v**2)
        k = (np.cos(inst.points * theta) + 1) / 2
        inner = 0.35 + 0.25 * q
        return rho <= r * (inner + (1 - inner) * k**2)
    if c == "diamond":
        p = 1.0 + 0.6 * q
        return np.abs(u) ** p + np.abs(v) ** p <= r**p
    if c == "cross":
        w = (0.22 + 0.18 * q) * r
        au, av = np.abs(u), np.abs(v)
        return ((au <= w) & (av <= r)) | ((av <= w) & (au <= r))
    if c == "heart":
        a, b = u / r * 1.25, -v / r * 1.25 + 0.05 + 0.2 * q
        return (a**2 + b**2 - 1) ** 3 - a**2 * b**3 <= 0
    if c == "moon":
        off = (0.3 + 0.3 * q) * r
        return (u**2 + v**2 <= r**2) & ((u - off) ** 2 + (v + 0.1 * r) ** 2 > (0.8 * r) ** 2)
    if c == "arrow":  # points along +u
        head = (0.45 + 0.3 * q) * r
        shaft = 0.28 * r
        in_head = (u >= r - 2 * head) & (u <= r) & (np.abs(v) <= (r - u) * 0.55)
        in_shaft = (u >= -r) & (u < r - 2 * head + 1e-9) & (np.abs(v) <= shaft)
        return in_head | in_shaft
    raise ValueError(f"unknown category {c!r}; known: {', '.join(CATEGORIES)}")


def _second_tone(inst: Instance, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Where the pattern's dark tone is, in the object's frame (units of its radius, so it scales with size)."""
    a = np.deg2rad(inst.angle)
    pu = (x * np.cos(a) + y * np.sin(a)) / r / inst.period
    pv = (-x * np.sin(a) + y * np.cos(a)) / r / inst.period
    if inst.pattern == "plain":
        return np.zeros(x.shape, bool)
    if inst.pattern == "stripes":
        return np.floor(pu).astype(int) % 2 == 1
    if inst.pattern == "checks":
        return (np.floor(pu).astype(int) + np.floor(pv).astype(int)) % 2 == 1
    if inst.pattern == "dots":
        du, dv = pu - np.floor(pu) - 0.5, pv - np.floor(pv) - 0.5
        return du**2 + dv**2 <= 0.33**2
    raise ValueError(f"unknown pattern {inst.pattern!r}; known: {', '.join(PATTERN_KINDS)}")


def render(
    inst: Instance,
    context: Context,
    size: int = 32,
    rng: np.random.Generator | None = None,
    supersample: int = 4,
) -> np.ndarray:
    """The instance in ``context`` as a uint8 array ``(size, size, 3)``, anti-aliased by ``supersample`` x
    ``supersample`` sampling; ``rng`` adds a small jitter of place (2 % of the image) and size (5 %), like
    ``world.render`` (the object never reaches the image border). The background is one plain colour everywhere
    (the pixel metric segments against it)."""
    if context.background not in COLOURS or context.position not in ANCHORS or context.size not in RADIUS:
        raise ValueError(f"unknown context {context}")
    jitter = rng.uniform(-1, 1, 3) if rng is not None else np.zeros(3)
    ax, ay = ANCHORS[context.position]
    cx, cy = ax + 0.02 * jitter[0], ay + 0.02 * jitter[1]
    r = RADIUS[context.size] * (1 + 0.05 * jitter[2])
    n = size * supersample
    t = (np.arange(n) + 0.5) / n
    x, y = np.meshgrid(t - cx, t - cy, indexing="xy")
    mask = _outline(inst, x, y, r)
    main, dark = inst.tones()
    img = np.empty((n, n, 3), dtype=np.float64)
    img[:] = np.array(COLOURS[context.background], dtype=np.float64)
    obj = np.where(_second_tone(inst, x, y, r)[..., None], dark, main)
    img = np.where(mask[..., None], obj, img)
    img = img.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)
