"""Identity and prompt adherence of the instance world (``toyworld/instance/world.py``) read from pixels alone: no
trained model, so it measures exactly what a checker trained on named attributes cannot.

**Segmentation.** The background is one plain colour: its estimate is the median of the image's 1-pixel border;
the object is every pixel farther than ``SEGMENT_THRESHOLD`` (RGB distance) from it, kept to its largest
8-connected component (stray pixels of a generated image drop out). **Normalisation.** The object's bounding box
is centred in a square crop of side ``max(width, height)`` (padded with the background, so the aspect stays) and
resized to ``NORM_SIZE`` px: position and scale are gone, the instance's own aspect, rotation and pattern stay.

**Identity features**, each a similarity in [0, 1] between a generated image and the concept's input image:

- ``iou``: silhouette IoU of the two normalised soft masks (outline: family, aspect, rotation, roundness, points);
- ``colour``: ``exp(-dE / COLOUR_SCALE)``, dE the CIE76 distance in Lab between the objects' main tones (the median
  Lab colour of the brighter half of the object's inner pixels: the pattern's dark tone is left out);
- ``pattern``: ``exp(-d)`` with ``d`` a weighted L1 distance of pattern statistics of the normalised interior: the
  dark-tone fraction, the gradient-orientation moments ``<e^{2i theta}>`` (stripes' angle) and ``<e^{4i theta}>``
  (checks' angle), and the gradient density (about 1 / period) (:data:`PATTERN_SCALES`).

The **identity score** is their geometric mean (``(iou * colour * pattern) ** (1/3)``: any one detail wrong pulls
it down, like the checker's "all identity attributes right"); **identity accuracy** is ``score >=
IDENTITY_THRESHOLD``. The threshold is calibrated on the VALIDATION concepts only
(``toyworld.diagnostics.calibration.calibrate_threshold``):
positives are each validation instance rendered in its prompt contexts, negatives are random instances of the same
category in the same contexts (what the class word gives), all rendered with the world's place/size jitter and
pixel noise of std 0.05; the threshold maximises balanced accuracy between them, and
``python -m toyworld instance-calibrate`` recomputes it (a test checks the constant).

**Prompt from pixels**: background = the named colour nearest to the border estimate; position = the anchor
nearest to the bounding-box centre; size = ``large`` when the object's diameter (largest distance between two of
its pixels, + 1 px) exceeds ``SIZE_THRESHOLD`` of the image side. Prompt accuracy: all three as the prompt asks.

:class:`PixelIdentityMetric` plugs this into ``evaluate.py run`` (``metrics.plugins``) next to or instead of
``toyworld.named.checker.CheckerMetric``: it reads each concept's input image (``EvalConcept.load_input``) and each
prompt's wanted context (``EvalConcept.attributes``, as ``toyworld.instance.concepts.InstanceConcepts`` gives).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from evaluation.concepts.base import EvalConcept
from evaluation.config import EvaluationConfigError
from evaluation.metrics.registry import Column, ImageMetric, register
from toyworld.instance.world import ANCHORS, CONTEXT, RADIUS
from toyworld.named.world import COLOURS

SEGMENT_THRESHOLD = 60.0  # RGB distance from the background estimate
NORM_SIZE = 20  # side of the normalised crop (objects are about 11 px small, 18 px large)
COLOUR_SCALE = 20.0  # dE (CIE76) at which the colour similarity is 1/e
# Pattern distance = sum of |difference| / scale over: dark fraction, |<e^{2i theta}>| diff, |<e^{4i theta}>| diff,
# gradient density.
PATTERN_SCALES = {"dark": 0.25, "c2": 0.8, "c4": 0.8, "density": 0.1}
SIZE_THRESHOLD = 2 * (RADIUS["small"] + RADIUS["large"]) / 2  # diameters: small ~0.36, large ~0.56
# toyworld.diagnostics.calibration.calibrate_threshold() on the validation concepts (see the module docstring).
IDENTITY_THRESHOLD = 0.386

PIXEL_COLUMNS: tuple[Column, ...] = register(
    Column("pixel_identity", "identity score (pixels)", table=True),
    Column("pixel_identity_acc", "identity (pixels)", table=True),
    Column("pixel_iou", "silhouette IoU"),
    Column("pixel_colour", "colour similarity"),
    Column("pixel_pattern", "pattern similarity"),
    Column("pixel_prompt_acc", "prompt (pixels)", table=True),
    *(Column(f"pixel_{a}_acc", f"{a} (pixels)") for a in CONTEXT),
)


def as_uint8(image: np.ndarray | Tensor) -> np.ndarray:
    """``(H, W, 3)`` uint8 from a uint8 array or a ``(3, H, W)`` / ``(H, W, 3)`` float in [0, 1]."""
    if isinstance(image, Tensor):
        image = image.detach().cpu().float().numpy()
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.dtype != np.uint8:
        a = np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8)
    return a


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in 0..255 (any leading shape, last axis 3) -> CIE Lab (D65)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask."""
    h, w = mask.shape
    label = np.zeros((h, w), dtype=np.int32)
    best, best_size, n = 0, 0, 0
    for sy, sx in zip(*np.nonzero(mask)):
        if label[sy, sx]:
            continue
        n += 1
        label[sy, sx] = n
        stack, size = [(sy, sx)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not label[yy, xx]:
                        label[yy, xx] = n
                        stack.append((yy, xx))
        if size > best_size:
            best, best_size = n, size
    return label == best if best else np.zeros_like(mask)


@dataclass
class Segmentation:
    """The object found in one image.

    Attributes:
        mask: ``(H, W)`` bool, the object's pixels.
        background: the background's RGB estimate (median of the border).
        bbox: ``(x0, y0, x1, y1)`` pixel bounds, end-exclusive (all 0 when no object was found).
        centre: the bounding box's centre ``(x, y)`` as a fraction of the image side.
        diameter: largest distance between two object pixels + 1 px, as a fraction of the image side.
    """

    mask: np.ndarray
    background: np.ndarray
    bbox: tuple[int, int, int, int]
    centre: tuple[float, float]
    diameter: float

    @property
    def found(self) -> bool:
        return bool(self.mask.any())


def segment(image: np.ndarray | Tensor, threshold: float = SEGMENT_THRESHOLD) -> Segmentation:
    """Segments the object against the plain background (see the module docstring)."""
    img = as_uint8(image).astype(np.float64)
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg = np.median(border, axis=0)
    mask = _largest_component(np.linalg.norm(img - bg, axis=-1) > threshold)
    if not mask.any():
        return Segmentation(mask, bg, (0, 0, 0, 0), (0.5, 0.5), 0.0)
    ys, xs = np.nonzero(mask)
    bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    centre = ((bbox[0] + bbox[2]) / 2 / w, (bbox[1] + bbox[3]) / 2 / h)
    # The diameter: farthest pair among the boundary pixels (the object's own pixels farthest apart lie on it).
    inner = mask.copy()
    inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    by, bx = np.nonzero(mask & ~inner)
    pts = np.stack([bx, by], 1).astype(np.float64)
    d = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1)).max() if len(pts) > 1 else 0.0
    return Segmentation(mask, bg, bbox, centre, (d + 1.0) / max(h, w))


def normalise(
    image: np.ndarray | Tensor, seg: Segmentation, size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The object's square bounding-box crop (padded with the background) resized to ``size``: ``(RGB float
    (size, size, 3) in 0..255, soft mask (size, size) in [0, 1])``."""
    size = size or NORM_SIZE
    img = as_uint8(image).astype(np.float32)
    x0, y0, x1, y1 = seg.bbox
    side = max(x1 - x0, y1 - y0, 1)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    ox, oy = int(round(cx - side / 2)), int(round(cy - side / 2))
    crop = np.empty((side, side, 3), np.float32)
    crop[:] = seg.background
    cmask = np.zeros((side, side), np.float32)
    h, w = seg.mask.shape
    sy0, sy1, sx0, sx1 = max(oy, 0), min(oy + side, h), max(ox, 0), min(ox + side, w)
    crop[sy0 - oy : sy1 - oy, sx0 - ox : sx1 - ox] = img[sy0:sy1, sx0:sx1]
    cmask[sy0 - oy : sy1 - oy, sx0 - ox : sx1 - ox] = seg.mask[sy0:sy1, sx0:sx1]
    t = torch.from_numpy(np.concatenate([crop, cmask[..., None]], -1)).permute(2, 0, 1)[None]
    out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=side > size)
    out = out[0].permute(1, 2, 0).numpy()
    return out[..., :3], np.clip(out[..., 3], 0, 1)


@dataclass
class Features:
    """What identity is compared on (see the module docstring)."""

    found: bool
    mask: np.ndarray  # normalised soft silhouette
    main_lab: np.ndarray  # Lab of the main tone
    dark: float  # fraction of the interior in the pattern's dark tone
    c2: complex  # <e^{2i theta}> of the interior's gradients (weighted by magnitude^2)
    c4: complex  # <e^{4i theta}>
    density: float  # mean gradient magnitude of the interior's relative lightness (about 1 / period)


def features(image: np.ndarray | Tensor, seg: Segmentation | None = None) -> Features:
    """The identity features of the object in ``image``."""
    seg = seg if seg is not None else segment(image)
    if not seg.found:
        z = np.zeros((NORM_SIZE, NORM_SIZE))  # never compared: similarity() is 0 for a missing object
        return Features(False, z, np.zeros(3), 0.0, 0j, 0j, 0.0)
    rgb, mask = normalise(image, seg)
    lab = rgb_to_lab(rgb)
    hard = mask > 0.5
    core = hard.copy()  # two erosions: edge pixels blend with the background
    for _ in range(2):
        e = core.copy()
        e[1:-1, 1:-1] = core[1:-1, 1:-1] & core[:-2, 1:-1] & core[2:, 1:-1] & core[1:-1, :-2] & core[1:-1, 2:]
        e[0], e[-1], e[:, 0], e[:, -1] = False, False, False, False
        core = e if e.sum() >= 8 else core
    light = lab[..., 0][core]
    bright = light >= np.percentile(light, 75)
    main = np.median(lab[core][bright], axis=0)
    rel = np.clip(lab[..., 0] / max(main[0], 1.0), 0, 1.5)
    dark = float((rel[core] < 0.8).mean())
    gy, gx = np.gradient(np.where(hard, rel, 1.0))
    mag2 = (gx**2 + gy**2)[core]
    theta = np.arctan2(gy, gx)[core]
    total = mag2.sum()
    c2 = complex((mag2 * np.exp(2j * theta)).sum() / total) if total > 1e-3 else 0j
    c4 = complex((mag2 * np.exp(4j * theta)).sum() / total) if total > 1e-3 else 0j
    density = float(np.sqrt(mag2).mean())
    return Features(True, mask, main, dark, c2, c4, density)


def similarity(a: Features, b: Features) -> dict[str, float]:
    """``iou``, ``colour``, ``pattern`` and their geometric mean ``identity``, each in [0, 1]."""
    if not (a.found and b.found):
        return {"iou": 0.0, "colour": 0.0, "pattern": 0.0, "identity": 0.0}
    iou = float(np.minimum(a.mask, b.mask).sum() / max(np.maximum(a.mask, b.mask).sum(), 1e-6))
    colour = float(np.exp(-np.linalg.norm(a.main_lab - b.main_lab) / COLOUR_SCALE))
    s = PATTERN_SCALES
    d = (
        abs(a.dark - b.dark) / s["dark"]
        + abs(a.c2 - b.c2) / s["c2"]
        + abs(a.c4 - b.c4) / s["c4"]
        + abs(a.density - b.density) / s["density"]
    )
    pattern = float(np.exp(-d))
    return {
        "iou": iou,
        "colour": colour,
        "pattern": pattern,
        "identity": float((iou * colour * pattern) ** (1 / 3)),
    }


def identity(generated: np.ndarray | Tensor, reference: np.ndarray | Tensor) -> dict[str, float]:
    """:func:`similarity` of the object in ``generated`` to the one in ``reference`` (e.g. the input image)."""
    return similarity(features(generated), features(reference))


def read_context(image: np.ndarray | Tensor, seg: Segmentation | None = None) -> dict[str, str | None]:
    """Background, position and size read from pixels (None where no object was found)."""
    seg = seg if seg is not None else segment(image)
    background = min(
        COLOURS, key=lambda n: float(np.linalg.norm(np.array(COLOURS[n], float) - seg.background))
    )
    if not seg.found:
        return {"background": background, "position": None, "size": None}
    position = min(
        ANCHORS, key=lambda p: (ANCHORS[p][0] - seg.centre[0]) ** 2 + (ANCHORS[p][1] - seg.centre[1]) ** 2
    )
    return {
        "background": background,
        "position": position,
        "size": "large" if seg.diameter > SIZE_THRESHOLD else "small",
    }


def score_images(
    images: Sequence[np.ndarray | Tensor],
    reference: np.ndarray | Tensor,
    wanted: Sequence[dict[str, str]],
    threshold: float | None = None,
) -> dict[str, list[float]]:
    """Per image, every column of :data:`PIXEL_COLUMNS`: identity against ``reference`` and the context read
    against ``wanted[i]`` (a dict with ``background``, ``position``, ``size``)."""
    threshold = IDENTITY_THRESHOLD if threshold is None else threshold
    if len(images) != len(wanted):
        raise ValueError(f"{len(images)} images but {len(wanted)} wanted contexts")
    ref = features(reference)
    out: dict[str, list[float]] = {c.name: [] for c in PIXEL_COLUMNS}
    for image, want in zip(images, wanted):
        seg = segment(image)
        sim = similarity(features(image, seg), ref)
        read = read_context(image, seg)
        hits = {a: float(read[a] == want[a]) for a in CONTEXT}
        out["pixel_identity"].append(sim["identity"])
        out["pixel_identity_acc"].append(float(sim["identity"] >= threshold))
        out["pixel_iou"].append(sim["iou"])
        out["pixel_colour"].append(sim["colour"])
        out["pixel_pattern"].append(sim["pattern"])
        out["pixel_prompt_acc"].append(float(all(hits.values())))
        for a in CONTEXT:
            out[f"pixel_{a}_acc"].append(hits[a])
    return out


class PixelIdentityMetric(ImageMetric):
    """Identity and prompt adherence of the instance world from pixels (see the module docstring), per image:
    identity score and accuracy against the concept's input image (and its IoU, colour, pattern parts), prompt
    accuracy (background, position, size all as asked; and each alone).

    Args:
        threshold: identity accuracy threshold (None: the calibrated ``IDENTITY_THRESHOLD``).
    """

    name = "pixels"
    columns = PIXEL_COLUMNS
    plot = (
        "pixel_prompt_acc",
        "pixel_identity_acc",
        "Pixels: identity vs prompt accuracy (points: tuning steps; bars: 95% CI)",
    )

    def __init__(self, threshold: float | None = None) -> None:
        self.threshold = threshold

    @property
    def used_threshold(self) -> float:
        return IDENTITY_THRESHOLD if self.threshold is None else float(self.threshold)

    def settings(self) -> dict[str, Any]:
        return {"threshold": self.threshold}

    def check(self, concepts: Sequence[EvalConcept]) -> None:
        for c in concepts:
            if c.attributes is None or any(a not in row for row in c.attributes for a in CONTEXT):
                raise EvaluationConfigError(
                    f"the pixel metric needs concepts whose prompts state {', '.join(CONTEXT)} "
                    f"(toyworld.instance.concepts.InstanceConcepts); {c.name!r} has none"
                )

    def score(
        self, images: Tensor, concept: EvalConcept, prompt_indices: Sequence[int]
    ) -> dict[str, list[float]]:
        """:func:`score_images` of ``images`` ((N, 3, H, W) in [0, 1], resized to 32 px if needed) against the
        concept's input image and the contexts their prompts ask."""
        assert concept.attributes is not None
        x = images.detach().float().cpu()
        if x.shape[-2:] != (32, 32):
            x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)
        reference = np.asarray(concept.load_input().convert("RGB").resize((32, 32)))
        wanted = [concept.attributes[i] for i in prompt_indices]
        return score_images(list(x), reference, wanted, self.used_threshold)

    def describe(self) -> dict[str, Any]:
        return {
            "backbone": "none (pixels): toyworld.instance.pixels",
            "preprocessing": "[0, 1] -> 32 px -> segmented against the border colour, bbox-cropped to a square, "
            f"resized to {NORM_SIZE} px",
            "pairing": "identity: each image against the concept's input image (silhouette IoU, Lab colour, "
            f"pattern statistics; geometric mean; accuracy at {self.used_threshold:.3f}, calibrated on the "
            "validation concepts); prompt: background, position and size read from pixels against the prompt's",
        }
