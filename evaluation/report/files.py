"""Image grids and TensorBoard logs of an evaluation folder."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from evaluation.generate.images import load_png
from evaluation.metrics.registry import column
from evaluation.store.run_state import GRIDS_DIR


def _tile(img: Image.Image, size: int) -> Image.Image:
    img = img.convert("RGB")
    if img.size == (size, size):
        return img
    resample = Image.Resampling.NEAREST if min(img.size) < size else Image.Resampling.BICUBIC
    return img.resize((size, size), resample)


def make_grid(rows: Sequence[Sequence[Image.Image | None]], tile: int, pad: int = 2) -> Image.Image:
    """Lays out images in a white-padded grid (``None`` leaves a cell empty)."""
    n_cols = max((len(r) for r in rows), default=0)
    width, height = pad + n_cols * (tile + pad), pad + len(rows) * (tile + pad)
    grid = Image.new("RGB", (max(width, 1), max(height, 1)), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            if img is not None:
                grid.paste(_tile(img, tile), (pad + j * (tile + pad), pad + i * (tile + pad)))
    return grid


def write_grids(
    out_dir: str | Path,
    rows: Sequence[dict[str, Any]],
    inputs: dict[str, Image.Image] | None = None,
    min_tile: int = 64,
) -> list[Path]:
    """One PNG per method x setting: a row per concept (its input image first), a column per prompt x sample.

    Args:
        out_dir: the evaluation folder (image paths in ``rows`` are relative to it).
        rows: typed result rows.
        inputs: each concept's input image, shown in the first column (None: no input column).
        min_tile: tiles are upscaled (nearest) to at least this many pixels.

    Returns:
        ``<out_dir>/grids/<method>/<setting>.png`` paths written.
    """
    out = Path(out_dir)
    groups: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        groups[(row["method"], row["setting"])][row["concept"]].append(row)
    written = []
    for (method, setting), by_concept in groups.items():
        grid_rows, size = [], min_tile
        for concept in sorted(by_concept):
            cells = sorted(by_concept[concept], key=lambda r: (r["prompt_idx"], r["sample"]))
            images: list[Image.Image | None] = []
            for r in cells:
                path = out / r["image"]
                images.append(Image.fromarray(load_png(path)) if path.is_file() else None)
            size = max([size, *(max(i.size) for i in images if i is not None)])
            first = [inputs[concept]] if inputs is not None and concept in inputs else []
            grid_rows.append(first + images)
        path = out / GRIDS_DIR / method / f"{setting}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        make_grid(grid_rows, size).save(path)
        written.append(path)
    return written


def log_tensorboard(log_dir: str | Path, aggregates: Sequence[dict[str, Any]], grids: Sequence[Path]) -> None:
    """Writes aggregates as scalars (x axis: tuning steps) and grids as images to TensorBoard."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    try:
        for a in aggregates:
            for name, value in a.items():
                if isinstance(value, dict) and name != "tune_seconds":  # a metric's mean and interval
                    tag = f"{column(name).label}/{a['method']}/a{a['alpha']:g}_g{a['guidance']:g}"
                    writer.add_scalar(tag, a[name]["mean"], global_step=a["steps"])
        for path in grids:
            tag = f"grids/{path.parent.name}/{path.stem}"
            writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), dataformats="HWC")
    finally:
        writer.close()
