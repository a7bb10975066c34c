"""Aggregates with bootstrap confidence intervals and the summary table.

Aggregation follows the DreamBench protocol: a metric is first averaged over each concept's images, then over
concepts (every subject weighs the same); the 95 % interval is a percentile bootstrap over concepts (subjects are
the sampling unit: new subjects, not new seeds, are what a reader generalises to). Methods measured on the same
concepts, prompts and seeds as a reference (the plain words) are also compared pairwise (:func:`paired_differences`):
the per-concept difference has a much narrower interval than the two methods' separate ones.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from evaluation.metrics.registry import REGISTRY, column
from evaluation.metrics.similarity import SIMILARITY_COLUMNS
from evaluation.plan import Setting
from evaluation.store.results import HEAD, TAIL


def metric_columns_of(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The metric columns of typed result rows: CLIP-I / CLIP-T / DINO (always reported, None when not
    computed), then every other key that is not a row's ``HEAD`` or ``TAIL`` column (a plug-in's)."""
    core = [c.name for c in SIMILARITY_COLUMNS]
    fixed = set(HEAD) | set(TAIL) | set(core)
    return core + list(dict.fromkeys(k for r in rows for k in r if k not in fixed))


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
    """Per method x setting aggregates of typed result rows (see ``store.results.parse_row``).

    Returns:
        One dict per (method, steps, alpha, guidance), in method order of first appearance then setting order:
        ``method``, ``setting``, ``steps``, ``alpha``, ``guidance``, ``n_concepts``, ``n_images``, and for each
        metric (and ``tune_seconds``) ``{"mean", "ci95": [low, high]}`` (None when the metric was not computed).
    """
    groups: dict[tuple[str, Setting], dict[str, list[dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    metrics = metric_columns_of(rows)
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
        for name in (*metrics, "tune_seconds"):
            per_concept = [
                float(np.mean(vals))
                for vals in ([r[name] for r in rs if r.get(name) is not None] for rs in by_concept.values())
                if vals
            ]
            if not per_concept:
                entry[name] = None
                continue
            low, high = bootstrap_ci(per_concept, n_boot, seed)
            entry[name] = {"mean": float(np.mean(per_concept)), "ci95": [low, high]}
        out.append(entry)
    return out


def format_table(aggregates: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of the aggregates: mean [95 % CI] per metric, tuning seconds, counts.

    Args:
        aggregates: :func:`aggregate` entries.
        columns: metric columns to show (None: the registered table columns; summary.json has every column).
    """
    if columns is None:
        columns = [c.name for c in REGISTRY.values() if c.table]
    cols = [c for c in columns if any(a.get(c) for a in aggregates)]
    head = [
        "method",
        "steps",
        "alpha",
        "guidance",
        *(column(c).label for c in cols),
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


def _concept_means(rows: Sequence[dict[str, Any]], metric: str) -> dict[str, float]:
    """``concept -> mean of metric over its rows`` (concepts without a value are left out)."""
    values: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r.get(metric) is not None:
            values[r["concept"]].append(float(r[metric]))
    return {c: float(np.mean(v)) for c, v in values.items()}


def paired_differences(
    rows: Sequence[dict[str, Any]], reference: str, n_boot: int = 1000, seed: int = 0
) -> list[dict[str, Any]]:
    """Every other method x setting minus the ``reference`` method, concept by concept.

    Each concept's mean (over its images) of a metric minus the reference's mean on that concept, at the same
    guidance (the reference's first guidance when it has none at that one); concepts the reference lacks are
    left out. Same concepts, prompts and seeds make the pairs: the interval of the mean difference (a percentile
    bootstrap over concepts) excludes what both methods share, e.g. how hard a concept is.

    Returns:
        One dict per (method, setting) besides the reference's, in :func:`aggregate`'s order: ``method``,
        ``setting``, ``steps``, ``alpha``, ``guidance``, ``reference``, ``reference_setting``, ``n_concepts`` and
        per metric ``{"mean", "ci95": [low, high], "wins", "n"}`` (``wins``: concepts where the method is higher)
        or None. Empty when no row is the reference's.
    """
    groups: dict[tuple[str, Setting], list[dict[str, Any]]] = defaultdict(list)
    method_order: dict[str, int] = {}
    for row in rows:
        method_order.setdefault(row["method"], len(method_order))
        groups[
            (row["method"], Setting(int(row["steps"]), float(row["alpha"]), float(row["guidance"])))
        ].append(row)
    refs = {setting: rs for (method, setting), rs in groups.items() if method == reference}
    if not refs:
        return []
    metrics = metric_columns_of(rows)
    out = []
    for (method, setting), group in sorted(groups.items(), key=lambda kv: (method_order[kv[0][0]], kv[0][1])):
        if method == reference:
            continue
        ref_setting = next((s for s in refs if s.guidance == setting.guidance), next(iter(refs)))
        paired: dict[str, Any] = {
            "method": method,
            "setting": setting.label,
            "steps": setting.steps,
            "alpha": setting.alpha,
            "guidance": setting.guidance,
            "reference": reference,
            "reference_setting": ref_setting.label,
            "n_concepts": 0,
        }
        for name in metrics:
            mine, theirs = _concept_means(group, name), _concept_means(refs[ref_setting], name)
            shared = sorted(set(mine) & set(theirs))
            if not shared:
                paired[name] = None
                continue
            d = [mine[c] - theirs[c] for c in shared]
            low, high = bootstrap_ci(d, n_boot, seed)
            paired[name] = {
                "mean": float(np.mean(d)),
                "ci95": [low, high],
                "wins": sum(x > 0 for x in d),
                "n": len(d),
            }
            paired["n_concepts"] = max(paired["n_concepts"], len(d))
        out.append(paired)
    return out


def format_paired_table(paired: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of :func:`paired_differences`: mean difference [95 % CI] and wins per metric."""
    if columns is None:
        columns = [c.name for c in REGISTRY.values() if c.table]
    cols = [c for c in columns if any(p.get(c) for p in paired)]
    ref = f"{paired[0]['reference']} ({paired[0]['reference_setting']})" if paired else "-"
    head = ["method", "steps", "alpha", "guidance", *(f"{column(c).label} - reference" for c in cols)]
    lines = [
        f"Paired differences against {ref}: per concept, then the mean over concepts [95 % CI] (wins / concepts).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for p in paired:
        cells = [p["method"], str(p["steps"]), f"{p['alpha']:g}", f"{p['guidance']:g}"]
        for c in cols:
            m = p.get(c)
            cells.append(
                f"{m['mean']:+.3f} [{m['ci95'][0]:+.3f}, {m['ci95'][1]:+.3f}] ({m['wins']}/{m['n']})"
                if m
                else "-"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
