"""Identity against tuning time: where each method stands at equal seconds (the paper's point: fast).

One line per method (and alpha / guidance), through its step budgets, seconds on a log axis (0 steps sits in the
linear band near 0); the plain words and, when known, the generator's ceiling as horizontal lines. Drawn with
matplotlib's Agg canvas, like :mod:`evaluation.report.plot`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from evaluation.report.plot import _axis_label, save_figure

WORDS = "plain_words"


def plot_identity_vs_seconds(
    aggregates: Sequence[dict[str, Any]],
    path: str | Path,
    y: str = "clip_i",
    ceiling: float | None = None,
    title: str | None = None,
    line_per_method: bool = False,
) -> Path:
    """Draws mean identity (``y``) against mean tuning seconds per concept, every method at every budget.

    Args:
        aggregates: per method x setting means and intervals (``report.aggregate.aggregate``).
        path: output PNG.
        y: identity metric column.
        ceiling: the best identity the generator can show (e.g. the input through the autoencoder), drawn as a
            line; None: not drawn.
        title: figure title.
        line_per_method: one line per method through all its rows, whatever their alpha and guidance (rows chosen
            per budget, e.g. each at the guidance validation chose); False: one line per method, alpha and guidance.

    Returns:
        ``path``.

    Raises:
        ValueError: no tuned method has both ``y`` and its tuning seconds.
    """
    tuned = [a for a in aggregates if a.get(y) and (a.get("tune_seconds") or a["steps"] == 0)]
    tuned = [a for a in tuned if a["method"] != WORDS]
    if not tuned:
        raise ValueError(f"no results with both {y} and tuning seconds to plot")
    fig = Figure(figsize=(7.5, 5.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    series: dict[tuple[str, float, float], list[dict[str, Any]]] = defaultdict(list)
    for a in tuned:
        series[
            (a["method"], 0.0, 0.0) if line_per_method else (a["method"], a["alpha"], a["guidance"])
        ].append(a)
    several = {m for m, _, _ in series if sum(1 for k in series if k[0] == m) > 1}
    for i, ((method, alpha, guidance), points) in enumerate(sorted(series.items())):
        points.sort(key=lambda a: a["steps"])
        xs = [(p.get("tune_seconds") or {}).get("mean") or 0.0 for p in points]
        ys = [p[y]["mean"] for p in points]
        label = f"{method} (alpha={alpha:g}, g={guidance:g})" if method in several else method
        ax.plot(xs, ys, marker="o", color=f"C{i % 10}", label=label)
        for p, px, py in zip(points, xs, ys):
            ax.annotate(f"{p['steps']}", (px, py), textcoords="offset points", xytext=(3, 3), fontsize=7)
    words = [a for a in aggregates if a["method"] == WORDS and a.get(y)]
    if words:
        ax.axhline(words[0][y]["mean"], color="grey", linestyle="--", label="the plain words")
    if ceiling is not None:
        ax.axhline(ceiling, color="black", linestyle=":", label="ceiling (input through the autoencoder)")
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlim(left=0.0)
    ax.set_xlabel("tuning seconds per concept (log; labels: steps)")
    ax.set_ylabel(_axis_label("identity", y))
    ax.set_title(title or "Identity against tuning time: every method at every budget")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)
