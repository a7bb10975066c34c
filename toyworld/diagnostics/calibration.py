"""Calibration of the instance world's pixel metric (``toyworld/instance/pixels.py``): the identity threshold,
from the validation concepts only, and the reference rows on the validation and test concepts.

Reference rows (:data:`REFERENCE_ROWS`), each scored against the concept's input image and its prompt contexts:
the same instance rendered in the prompt contexts (the ceiling: what a perfect method makes), random instances of
the same category in those contexts (what the class word alone gives), random instances of another category, and
the input image pasted unchanged (identity 1, prompt accuracy 0: copying is not personalization). The first two also
come with the world's jitter and pixel noise, and with a blur besides (a generator's samples are softer than
renders: those rows show what that costs the metric).
``python -m toyworld instance-calibrate`` prints them and writes JSON.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from toyworld.instance import pixels
from toyworld.instance.concepts import concept_instances, input_context, prompt_contexts
from toyworld.instance.render import render
from toyworld.instance.world import CATEGORIES, HELD_OUT_CATEGORIES, backgrounds_for, sample_instance
from toyworld.named.world import seeded_rng

# How the threshold is calibrated: prompt contexts per validation concept, random same-category instances per
# context, pixel noise std (0..1) on both, seed.
CALIBRATION = {"noise": 0.05, "prompts": 6, "negatives": 3, "seed": 0}


def best_threshold(positives: Sequence[float], negatives: Sequence[float]) -> tuple[float, float]:
    """The threshold maximising balanced accuracy and that accuracy. Candidates are midpoints between
    neighbouring scores; of those that tie for the best, the middle one (the middle of the gap when the two sets
    separate)."""
    pos, neg = np.asarray(positives, float), np.asarray(negatives, float)
    values = np.unique(np.concatenate([pos, neg]))
    cands = np.concatenate([[values[0] - 1e-6], (values[1:] + values[:-1]) / 2, [values[-1] + 1e-6]])
    bal = np.array([((pos >= t).mean() + (neg < t).mean()) / 2 for t in cands])
    best = np.flatnonzero(bal == bal.max())
    lo, hi = cands[best[0]], cands[best[-1]]
    if len(best) == best[-1] - best[0] + 1 and len(best) > 1:  # one plateau: its middle
        return float((lo + hi) / 2), float(bal.max())
    return float(cands[best[len(best) // 2]]), float(bal.max())


REFERENCE_ROWS: tuple[tuple[str, str], ...] = (
    ("ceiling", "same instance in the prompt contexts (ceiling)"),
    ("ceiling_noisy", "same instance, jitter + noise 0.05"),
    ("ceiling_blurred", "same instance, jitter + blur 0.8 px + noise 0.05"),
    ("words", "random same-category instances (= the words)"),
    ("words_noisy", "random same-category, jitter + noise 0.05"),
    ("words_blurred", "random same-category, jitter + blur 0.8 px + noise 0.05"),
    ("other_category", "random instances of another category"),
    ("pasted", "the input image pasted unchanged"),
)


BLUR = 0.8  # Gaussian blur radius (px) of the *_blurred rows: a stand-in for a generator's softer samples


def degrade(image: np.ndarray, rng: np.random.Generator, noise: float, blur: float = 0.0) -> np.ndarray:
    """``image`` blurred (Gaussian, radius ``blur`` px), then with pixel noise of std ``noise`` (0..1)."""
    if blur > 0:
        from PIL import Image, ImageFilter

        image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(blur)))
    return np.clip(image + rng.normal(0, noise * 255.0, image.shape), 0, 255).astype(np.uint8)


def stand_in(rng: np.random.Generator, inst: Any, ctx: Any, same_category: bool) -> Any:
    """A random instance (same category or another) that the context's background allows; training categories
    are drawn from the training distribution (what base training ties to the word), held-out ones from all."""
    for _ in range(1000):
        if same_category:
            category = inst.category
        else:
            others = [c for c in CATEGORIES if c != inst.category]
            category = others[int(rng.integers(len(others)))]
        split = "any" if category in HELD_OUT_CATEGORIES else "train"
        other = sample_instance(rng, split, category)
        if ctx.background in backgrounds_for(other):
            return other
    raise ValueError(f"no stand-in for {inst} on {ctx.background}")


def reference_images(
    split: str, row: str, prompts: int = 6, seed: int = 0, negatives: int = 3, noise: float = 0.05
) -> list[dict[str, Any]]:
    """Per concept of ``split``: ``{"name", "kind", "input", "images", "wanted"}`` for one reference row
    (:data:`REFERENCE_ROWS`); the contexts are the concept's first ``prompts`` prompt contexts
    (``InstanceConcepts`` with the same ``seed``); ``negatives`` random instances per context for the
    ``words`` / ``other_category`` rows."""
    rows = dict(REFERENCE_ROWS)
    if row not in rows:
        raise ValueError(f"unknown reference row {row!r}; known: {', '.join(rows)}")
    out = []
    for ci, (name, kind, inst) in enumerate(concept_instances(split)):
        rng = seeded_rng(seed, 0x726566, ci, zlib.crc32(row.encode()))
        source = render(inst, input_context(inst))
        contexts = prompt_contexts(inst, prompts, seed, name)
        degraded = row.endswith(("noisy", "blurred"))
        images, wanted = [], []
        for ctx in contexts:
            want = {"background": ctx.background, "position": ctx.position, "size": ctx.size}
            if row == "pasted":
                made = [source]
            elif row.startswith("ceiling"):
                made = [render(inst, ctx, rng=rng if degraded else None)]
            else:
                same = row.startswith("words")
                made = [
                    render(stand_in(rng, inst, ctx, same), ctx, rng=rng if degraded else None)
                    for _ in range(negatives)
                ]
            if degraded:
                made = [degrade(m, rng, noise, BLUR if row.endswith("blurred") else 0.0) for m in made]
            images += made
            wanted += [want] * len(made)
        out.append({"name": name, "kind": kind, "input": source, "images": images, "wanted": wanted})
    return out


def calibrate_threshold(
    prompts: int = CALIBRATION["prompts"],
    seed: int = CALIBRATION["seed"],
    negatives: int = CALIBRATION["negatives"],
    noise: float = CALIBRATION["noise"],
) -> tuple[float, float]:
    """The identity threshold from the VALIDATION concepts only: positives = ``ceiling_noisy``, negatives =
    ``words_noisy`` (:func:`reference_images`); returns (threshold, its balanced accuracy on them)."""
    scores = {}
    for row in ("ceiling_noisy", "words_noisy"):
        scores[row] = [
            pixels.identity(img, c["input"])["identity"]
            for c in reference_images("validation", row, prompts, seed, negatives, noise)
            for img in c["images"]
        ]
    return best_threshold(scores["ceiling_noisy"], scores["words_noisy"])


def reference_table(
    prompts: int = 6, seed: int = 0, negatives: int = 3, threshold: float | None = None
) -> dict:
    """Every reference row scored on the validation and the test concepts: per row and group (``validation``,
    ``test``, and the test's ``held_out_instance`` / ``held_out_category`` kinds), the mean identity score,
    identity accuracy, prompt accuracy and the number of images (each concept weighs the same)."""
    threshold = pixels.IDENTITY_THRESHOLD if threshold is None else threshold
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for row, _ in REFERENCE_ROWS:
        per_group: dict[str, list[dict[str, float]]] = {}
        for split in ("validation", "test"):
            for c in reference_images(split, row, prompts, seed, negatives):
                s = pixels.score_images(c["images"], c["input"], c["wanted"], threshold)
                means = {k: float(np.mean(v)) for k, v in s.items()}
                means["n"] = len(c["images"])
                groups = [split] + ([c["kind"]] if split == "test" else [])
                for g in groups:
                    per_group.setdefault(g, []).append(means)
        rows[row] = {
            g: {
                "identity": float(np.mean([m["pixel_identity"] for m in ms])),
                "identity_acc": float(np.mean([m["pixel_identity_acc"] for m in ms])),
                "prompt_acc": float(np.mean([m["pixel_prompt_acc"] for m in ms])),
                "iou": float(np.mean([m["pixel_iou"] for m in ms])),
                "colour": float(np.mean([m["pixel_colour"] for m in ms])),
                "pattern": float(np.mean([m["pixel_pattern"] for m in ms])),
                "concepts": len(ms),
                "images": int(sum(m["n"] for m in ms)),
            }
            for g, ms in per_group.items()
        }
    return {"threshold": threshold, "prompts": prompts, "seed": seed, "negatives": negatives, "rows": rows}


def format_table(table: dict) -> str:
    """The reference rows as a markdown table."""
    groups = ("validation", "test", "held_out_instance", "held_out_category")
    head = "| reference row | " + " | ".join(f"{g}: identity / acc / prompt" for g in groups) + " |"
    lines = [head, "|---|" + "---:|" * len(groups)]
    for row, label in REFERENCE_ROWS:
        cells = []
        for g in groups:
            r = table["rows"][row][g]
            cells.append(f"{r['identity']:.3f} / {r['identity_acc']:.3f} / {r['prompt_acc']:.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
