"""Identity from pixels per row of an ``evaluate.py sample`` grid: is the instance in every row, and not in the
words' rows?

``evaluate.py sample --words <noun>`` writes a PNG grid (a row per prompt, each followed by the words' row from the
same seeds; :func:`evaluation.generate.images.save_grid` layout: 1-px white lines, nearest-neighbour upscaled) and
a ``.txt`` naming each row. This reads both back, cuts the grid into its images and scores each against the
concept's input image with the instance world's pixel identity (:func:`toyworld.instance.pixels.identity`, the
evaluation's metric; 0.386 is the threshold of "the same instance" calibrated on validation concepts).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from toyworld.instance.pixels import IDENTITY_THRESHOLD, identity


def load_png(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 of a PNG."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def grid_images(grid: np.ndarray, rows: int, scale: int) -> list[list[np.ndarray]]:
    """The square images of a ``save_grid`` PNG with ``rows`` rows, upscaled by ``scale``, row by row.

    Raises:
        ValueError: the grid's size fits no layout of ``rows`` rows of square images at this scale.
    """
    height, width = grid.shape[0] // scale, grid.shape[1] // scale
    side = (height - 1) // rows - 1
    cols = (width - 1) // (side + 1) if side > 0 else 0
    if side <= 0 or rows * (side + 1) + 1 != height or cols * (side + 1) + 1 != width:
        raise ValueError(
            f"a {grid.shape[1]}x{grid.shape[0]} grid is not {rows} rows of square images at scale {scale}"
        )
    small = grid[::scale, ::scale]
    return [
        [
            small[
                1 + r * (side + 1) : 1 + r * (side + 1) + side, 1 + c * (side + 1) : 1 + c * (side + 1) + side
            ]
            for c in range(cols)
        ]
        for r in range(rows)
    ]


def score_rows(grid_path: str | Path, reference: np.ndarray, scale: int = 3) -> list[dict]:
    """Per row of the grid: its label (from the ``.txt`` beside it), whether it is a words row, the identity of
    each image against ``reference`` and their mean, and how many pass the same-instance threshold."""
    grid_path = Path(grid_path)
    labels = [
        line.split(": ", 1)[1]
        for line in grid_path.with_suffix(".txt").read_text().splitlines()
        if ": " in line
    ]
    out = []
    for label, images in zip(labels, grid_images(load_png(grid_path), len(labels), scale)):
        scores = [identity(image, reference)["identity"] for image in images]
        out.append(
            {
                "row": label,
                "words": label.endswith("(the words alone, no concept, same seeds)"),
                "identity": scores,
                "mean": float(np.mean(scores)),
                "same_instance": sum(s >= IDENTITY_THRESHOLD for s in scores),
            }
        )
    return out


def format_rows(rows: list[dict]) -> str:
    """A table a person reads: one line per row, the concept's rows marked against the words' rows."""
    lines = ["| row | identity per image | mean | >= threshold |", "|---|---|---:|---:|"]
    for r in rows:
        per = " ".join(f"{s:.2f}" for s in r["identity"])
        lines.append(f"| {r['row']} | {per} | {r['mean']:.3f} | {r['same_instance']}/{len(r['identity'])} |")
    concept = [r["mean"] for r in rows if not r["words"]]
    words = [r["mean"] for r in rows if r["words"]]
    if concept and words:
        lines.append(
            f"\nconcept rows {np.mean(concept):.3f}, the words' rows {np.mean(words):.3f} (mean identity)"
        )
    return "\n".join(lines)
