"""Aggregates with bootstrap confidence intervals, the summary file, image grids and TensorBoard logs.

Aggregation follows the DreamBench protocol: a metric is first averaged over each concept's images, then over
concepts (every subject weighs the same); the 95 % interval is a percentile bootstrap over concepts (subjects are
the sampling unit: new subjects, not new seeds, are what a reader generalises to).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from evaluation.checker_metrics import CHECKER_COLUMNS, CHECKER_NAMES
from evaluation.generate import Setting, load_png
from models.io import atomic_write

METRIC_COLUMNS: tuple[str, ...] = (
    "clip_i",
    "clip_t",
    "dino",
    "clip_i_no_input",
    "dino_no_input",
    *CHECKER_COLUMNS,
)
# "w/o input": identity against the subject's real images without the one the method learned from.
METRIC_NAMES = {
    "clip_i": "CLIP-I",
    "clip_t": "CLIP-T",
    "dino": "DINO",
    "clip_i_no_input": "CLIP-I w/o input",
    "dino_no_input": "DINO w/o input",
    **CHECKER_NAMES,
}
GRIDS_DIR = "grids"


def bootstrap_ci(
    values: Sequence[float], n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean.

    Args:
        values: one value per sampling unit (concept).
        n_boot: bootstrap resamples.
        seed: seed of the resampling (intervals are reproducible).
        level: coverage of the interval.

    Returns:
        (low, high); both equal the value when there is a single unit.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (math.nan, math.nan)
    if x.size == 1 or n_boot < 1:
        return (float(x.mean()), float(x.mean()))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return (float(low), float(high))


def aggregate(rows: Sequence[dict[str, Any]], n_boot: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """Per method x setting aggregates of typed result rows (see ``results.parse_row``).

    Returns:
        One dict per (method, steps, alpha, guidance), in method order of first appearance then setting order:
        ``method``, ``setting``, ``steps``, ``alpha``, ``guidance``, ``n_concepts``, ``n_images``, and for each
        metric (and ``tune_seconds``) ``{"mean", "ci95": [low, high]}`` (None when the metric was not computed).
    """
    groups: dict[tuple[str, Setting], dict[str, list[dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    method_order: dict[str, int] = {}
    for row in rows:
        method_order.setdefault(row["method"], len(method_order))
        setting = Setting(int(row["steps"]), float(row["alpha"]), float(row["guidance"]))
        groups[(row["method"], setting)][row["concept"]].append(row)
    out = []
    for (method, setting), by_concept in sorted(
        groups.items(), key=lambda kv: (method_order[kv[0][0]], kv[0][1])
    ):
        entry: dict[str, Any] = {
            "method": method,
            "setting": setting.label,
            "steps": setting.steps,
            "alpha": setting.alpha,
            "guidance": setting.guidance,
            "n_concepts": len(by_concept),
            "n_images": sum(len(r) for r in by_concept.values()),
        }
        for column in (*METRIC_COLUMNS, "tune_seconds"):
            per_concept = [
                float(np.mean(vals))
                for vals in (
                    [r[column] for r in rs if r.get(column) is not None] for rs in by_concept.values()
                )
                if vals
            ]
            if not per_concept:
                entry[column] = None
                continue
            low, high = bootstrap_ci(per_concept, n_boot, seed)
            entry[column] = {"mean": float(np.mean(per_concept)), "ci95": [low, high]}
        out.append(entry)
    return out


# The printed table's columns (summary.json has every column, the per-attribute checker accuracies too).
TABLE_COLUMNS: tuple[str, ...] = (
    "clip_i",
    "clip_t",
    "dino",
    "clip_i_no_input",
    "dino_no_input",
    "identity_acc",
    "prompt_acc",
)


def format_table(aggregates: Sequence[dict[str, Any]], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """A Markdown table of the aggregates: mean [95 % CI] per metric, tuning seconds, counts."""
    cols = [c for c in columns if any(a.get(c) for a in aggregates)]
    head = [
        "method",
        "steps",
        "alpha",
        "guidance",
        *(METRIC_NAMES[c] for c in cols),
        "tune s",
        "concepts",
        "images",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in aggregates:
        cells = [a["method"], str(a["steps"]), f"{a['alpha']:g}", f"{a['guidance']:g}"]
        for c in cols:
            m = a.get(c)
            cells.append(f"{m['mean']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]" if m else "-")
        t = a.get("tune_seconds")
        cells += [f"{t['mean']:.2f}" if t else "-", str(a["n_concepts"]), str(a["n_images"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: str | Path, data: Any) -> Path:
    """Writes JSON atomically (temporary file, then rename)."""
    text = json.dumps(data, indent=2, sort_keys=False, default=str) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


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
            for column in METRIC_COLUMNS:
                if a.get(column):
                    tag = f"{METRIC_NAMES[column]}/{a['method']}/a{a['alpha']:g}_g{a['guidance']:g}"
                    writer.add_scalar(tag, a[column]["mean"], global_step=a["steps"])
        for path in grids:
            tag = f"grids/{path.parent.name}/{path.stem}"
            writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), dataformats="HWC")
    finally:
        writer.close()
