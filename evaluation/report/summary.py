"""The report of one run, from every row in its folder: ``summary.json``, the grids, the trade-off plots, the
nearest-word table, the paired differences against the plain words (``paired.md``; TensorBoard logs), and the
printed table."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evaluation.concepts.base import EvalConcept
from evaluation.metrics.registry import ImageMetric
from evaluation.plan import MethodPlan
from evaluation.report.aggregate import aggregate, format_paired_table, format_table, paired_differences
from evaluation.report.files import log_tensorboard, write_grids
from evaluation.report.plot import REFERENCE_POINTS, REFERENCE_PROTOCOLS, plot_tradeoff
from evaluation.report.words import format_word_table, nearest_word_table
from evaluation.store.run_state import (
    NEAREST_WORDS_FILE,
    RESULTS_FILE,
    SUMMARY_FILE,
    TENSORBOARD_DIR,
    TRADEOFF_CLIP_FILE,
    TRADEOFF_FILE,
    write_json,
)

PAIRED_FILE = "paired.md"


@dataclass
class EvaluationResult:
    """What one invocation did: aggregates of every row in the folder, counts and wall times (seconds)."""

    out_dir: Path
    aggregates: list[dict[str, Any]]
    n_rows: int
    n_generated: int
    n_tuned: int
    wall_seconds: dict[str, float]
    table: str


@dataclass
class ReportOptions:
    """What to draw and print (``run_evaluation``'s arguments of the same names)."""

    bootstrap_samples: int = 1000
    grids: bool = True
    reference_points: bool = False
    tensorboard: bool = False
    progress: bool = True


def draw_plots(
    out: Path, aggregates: list[dict[str, Any]], plugins: Sequence[ImageMetric], reference_points: bool
) -> None:
    """``tradeoff.png``: a plug-in's own plot when its columns have values (the checker's exact reading), with
    CLIP-I vs CLIP-T in ``tradeoff_clip.png``; else CLIP-I vs CLIP-T."""
    main = next(
        (
            p.plot
            for p in plugins
            if p.plot and any(a.get(p.plot[0]) and a.get(p.plot[1]) for a in aggregates)
        ),
        None,
    )
    if main is not None:
        x, y, title = main
        plot_tradeoff(aggregates, out / TRADEOFF_FILE, x=x, y=y, title=title)
        plot_tradeoff(aggregates, out / TRADEOFF_CLIP_FILE, reference_points=reference_points)
    else:
        plot_tradeoff(aggregates, out / TRADEOFF_FILE, reference_points=reference_points)


def write_report(
    out: Path,
    rows: list[dict[str, Any]],
    plans: list[MethodPlan],
    concepts: list[EvalConcept],
    run: dict[str, Any],
    options: ReportOptions,
) -> EvaluationResult:
    """Writes the report of every row in ``out``.

    Args:
        out: the evaluation folder.
        rows: every typed row of its ``results.csv``.
        plans: the method plans (their step-0 aliases are reported).
        concepts: the concepts (their input images head the grids' rows).
        run: ``record`` (run.json), ``metrics`` (descriptions), ``plugins`` (the metric plug-ins),
            ``walls`` (seconds by phase, ``start``: the run's start time), ``counts`` (generated, tuned) and
            ``autocast`` (the inference autocast dtype or None).
        options: what to draw and print.
    """
    begin = time.perf_counter()
    walls = run["walls"]
    aggregates = aggregate(rows, n_boot=options.bootstrap_samples)
    grid_paths = write_grids(out, rows, {c.name: c.load_input() for c in concepts}) if options.grids else []
    draw_plots(out, aggregates, run["plugins"], options.reference_points)
    words = nearest_word_table(rows)
    if words["words"]:
        (out / NEAREST_WORDS_FILE).write_text(format_word_table(words) + "\n")
    kinds = sorted({r["concept_kind"] for r in rows if r.get("concept_kind")})
    by_kind = {
        k: aggregate([r for r in rows if r.get("concept_kind") == k], n_boot=options.bootstrap_samples)
        for k in kinds
    }
    reference = next((p.spec.name for p in plans if p.kind == "plain_words"), None)
    paired = paired_differences(rows, reference, n_boot=options.bootstrap_samples) if reference else []
    if paired:
        (out / PAIRED_FILE).write_text(format_paired_table(paired) + "\n")
    if options.tensorboard:
        log_tensorboard(out / TENSORBOARD_DIR, aggregates, grid_paths)
    walls["report"] = time.perf_counter() - begin
    walls["total"] = time.perf_counter() - run["start"]
    counts = {"rows": len(rows), **run["counts"]}
    autocast = run["autocast"]
    summary: dict[str, Any] = {
        "aggregates": aggregates,
        "aggregates_by_concept_kind": by_kind,
        "paired_vs_reference": paired,
        "nearest_words": words,
        "aggregation": "mean over each concept's images, then over concepts; 95% CI: percentile bootstrap "
        f"over concepts ({options.bootstrap_samples} resamples, seed 0)",
        "metrics": run["metrics"],
        "config": run["record"],
        "wall_seconds": walls,
        "counts": counts,
        "deduplicated_settings": {p.spec.name: p.aliases for p in plans if p.aliases},
        "inference_autocast": str(autocast).replace("torch.", "") if autocast else "off",
        "environment": {"torch": torch.__version__, "num_threads": torch.get_num_threads()},
    }
    if options.reference_points:
        summary["reference_points"] = {
            "source": "DreamBench (docs/method.md), SD 1.x scale",
            "points": REFERENCE_POINTS,
            "protocols": REFERENCE_PROTOCOLS,
        }
    write_json(out / SUMMARY_FILE, summary)
    table = format_table(aggregates)
    if options.progress:
        print(table)
        print(
            f"{len(rows)} rows in {out / RESULTS_FILE} ({counts['generated']} generated now); "
            f"summary.json, tradeoff.png; {walls['total']:.1f} s"
        )
    return EvaluationResult(
        out, aggregates, len(rows), counts["generated"], counts["tuned"], dict(walls), table
    )
