"""Trade-off curves: identity similarity (y) against prompt similarity (x), one curve per method.

A method swept over several alphas or guidance scales gets one curve per (alpha, guidance), all in the method's
colour (marker: alpha, line style: guidance), each running through its tuning step counts; every point is
labelled with its step count. Drawn with matplotlib's Agg canvas (no display, no global pyplot state).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from evaluation.metrics.registry import column as metric_column

# Published DreamBench numbers at Stable Diffusion scale (docs/method.md), each with the protocol it was measured under.
# Only comparable to runs with the real SD 1.x weights on DreamBench, never to the tiny offline models, and even
# then not like for like: our methods learn from ONE input image; DreamBooth and Textual Inversion were trained
# on all 3-5 images of each subject. Our default CLIP-I / DINO include the input image among the references (as
# DreamBooth's protocol does with its training images); the "w/o input" columns leave it out.
_RUIZ = (
    "Ruiz et al. 2023 (DreamBooth) Table 1: few-shot, trained on the subject's 3-5 images; DINO ViT-S/16, "
    "CLIP ViT-B/32 for CLIP-I / CLIP-T"
)
REFERENCE_POINTS: dict[str, dict[str, float]] = {
    "DreamBooth (SD), 3-5 images": {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305},
    "Textual Inversion, 3-5 images": {"dino": 0.569, "clip_i": 0.780, "clip_t": 0.255},
    "ELITE": {"dino": 0.621, "clip_i": 0.771, "clip_t": 0.293},
    "IP-Adapter (SD 1.5)": {"dino": 0.667, "clip_i": 0.813, "clip_t": 0.289},
    "BLIP-Diffusion (zero-shot)": {"dino": 0.594, "clip_i": 0.779, "clip_t": 0.300},
}
REFERENCE_PROTOCOLS: dict[str, str] = {
    "DreamBooth (SD), 3-5 images": _RUIZ,
    "Textual Inversion, 3-5 images": _RUIZ,
    "ELITE": "protocol as reported by the paper docs/method.md took it from (not recorded there); zero-shot encoder",
    "IP-Adapter (SD 1.5)": "protocol as reported by the paper docs/method.md took it from (not recorded there); "
    "zero-shot image prompt",
    "BLIP-Diffusion (zero-shot)": "protocol as reported by Li et al. 2023 (BLIP-Diffusion); zero-shot",
    "Real images": _RUIZ + "; real images of a subject against each other (DINO 0.774, CLIP-I 0.885)",
}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_LINESTYLES = ("-", "--", ":", "-.")


def _errors(points: list[dict[str, Any]], column: str) -> list[list[float]] | None:
    if not all(p[column] and p[column].get("ci95") for p in points):
        return None
    low = [max(p[column]["mean"] - p[column]["ci95"][0], 0.0) for p in points]
    high = [max(p[column]["ci95"][1] - p[column]["mean"], 0.0) for p in points]
    return [low, high]


def _axis_label(kind: str, column: str) -> str:
    if column.endswith("_acc"):  # an attribute checker's accuracy, not a similarity
        return f"{kind} accuracy (attribute checker: share of images right)"
    return f"{kind} similarity ({metric_column(column).label})"


def plot_tradeoff(
    aggregates: Sequence[dict[str, Any]],
    path: str | Path,
    x: str = "clip_t",
    y: str = "clip_i",
    reference_points: bool = False,
    error_bars: bool = True,
    title: str | None = None,
) -> Path:
    """Draws the trade-off plot from aggregates (``report.aggregate.aggregate``).

    Args:
        aggregates: per method x setting means and intervals.
        path: output PNG.
        x: metric on the x axis (``clip_t``).
        y: metric on the y axis (``clip_i`` or ``dino``).
        reference_points: also draw the published DreamBench numbers (SD scale only).
        error_bars: draw the bootstrap 95 % intervals.
        title: figure title.

    Returns:
        ``path``.

    Raises:
        ValueError: no aggregate has both metrics.
    """
    usable = [a for a in aggregates if a.get(x) and a.get(y)]
    if not usable:
        raise ValueError(f"no results with both {x} and {y} to plot")
    methods = list(dict.fromkeys(a["method"] for a in usable))
    alphas = sorted({a["alpha"] for a in usable})
    guidances = sorted({a["guidance"] for a in usable})
    fig = Figure(figsize=(7.0, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cycle = [f"C{i}" for i in range(10)]  # matplotlib's default colour cycle
    for m_idx, method in enumerate(methods):
        series: dict[tuple[float, float], list[dict[str, Any]]] = defaultdict(list)
        for a in usable:
            if a["method"] == method:
                series[(a["alpha"], a["guidance"])].append(a)
        for (alpha, guidance), points in sorted(series.items()):
            points.sort(key=lambda a: a["steps"])
            xs = [p[x]["mean"] for p in points]
            ys = [p[y]["mean"] for p in points]
            label = method if len(series) == 1 else f"{method} (alpha={alpha:g}, g={guidance:g})"
            color = cycle[m_idx % len(cycle)]
            ax.plot(
                xs,
                ys,
                color=color,
                marker=_MARKERS[alphas.index(alpha) % len(_MARKERS)],
                linestyle=_LINESTYLES[guidances.index(guidance) % len(_LINESTYLES)],
                label=label,
            )
            if error_bars:
                ax.errorbar(
                    xs,
                    ys,
                    xerr=_errors(points, x),
                    yerr=_errors(points, y),
                    fmt="none",
                    ecolor=color,
                    alpha=0.35,
                    capsize=2,
                )
            for p, px, py in zip(points, xs, ys):
                ax.annotate(f"s{p['steps']}", (px, py), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if reference_points:
        for name, ref in REFERENCE_POINTS.items():
            if x in ref and y in ref:
                ax.scatter([ref[x]], [ref[y]], marker="x", color="black", zorder=3)
                ax.annotate(name, (ref[x], ref[y]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel(_axis_label("prompt", x))
    ax.set_ylabel(_axis_label("identity", y))
    ax.set_title(title or "Identity vs prompt similarity (points: tuning steps; bars: bootstrap 95% CI)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Lays the figure out and writes it to ``path`` (its folder created); returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
