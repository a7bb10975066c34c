"""What an output folder was made with (``run.json``), so a rerun never mixes rows of two configurations.

Resuming is only sound when the rows already written would be written again identically. Everything that
changes an existing row is recorded and compared on restart: the resolved tune recipes, backbone, sampling,
metric backbones, the prompts and references of the concept set, and the checkpoint files (size and mtime).
What only adds rows may change freely: more concepts, more settings, more methods.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from evaluation.spec import ConceptSetSpec, EvaluationConfigError, MethodSpec, MetricSpec, SamplingSpec

RECORD_FILE = "run.json"
RECORD_VERSION = 1
# Concept-set options that change existing rows (ids, subjects and max_prompts only add or drop rows).
_CONCEPT_KEYS = (
    "kind",
    "synthetic_seed",
    "num_references",
    "reference_size",
    "prompts",
    "dreambench_root",
    "input_image_index",
    "prompts_file",
    "subjects_file",
)
# Output sub-paths removed by ``overwrite`` (never the folder itself: it may hold other files).
_OUTPUTS = (
    "results.csv",
    "summary.json",
    "metrics.json",
    "tradeoff.png",
    "images",
    "grids",
    "artifacts",
    "tb",
)


def file_identity(path: str | Path | None) -> dict[str, Any] | None:
    """``{"path", "size", "mtime_ns"}`` of a file (None for no file): changes when the file is rewritten."""
    if path is None:
        return None
    stat = Path(path).stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def run_record(
    tune_config: str,
    overrides: dict[str, Any],
    recipes: dict[str, dict[str, Any]],
    methods: list[MethodSpec],
    concepts: ConceptSetSpec,
    sampling: SamplingSpec,
    metrics: MetricSpec,
    inputs: dict[str, Any],
) -> dict[str, Any]:
    """The record of a run's configuration (JSON-compatible).

    Args:
        tune_config: base tune YAML path.
        overrides: run-wide tune overrides (including model paths given on the command line).
        recipes: resolved tune config of each tuned method (``{name: config}``).
        methods: the method specs.
        concepts: the concept set.
        sampling: sampling options.
        metrics: metric backbones.
        inputs: identities of the input files rows depend on (checkpoints, artefacts), by method name.
    """
    return _plain(
        {
            "version": RECORD_VERSION,
            "tune_config": tune_config,
            "tune_overrides": overrides,
            "methods": {m.name: {"spec": asdict(m), "recipe": recipes.get(m.name)} for m in methods},
            "concepts": asdict(concepts),
            "sampling": asdict(sampling),
            "metrics": asdict(metrics),
            "inputs": inputs,
        }
    )


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    diffs = [k for k in ("version", "sampling", "metrics") if old.get(k) != new.get(k)]
    old_c, new_c = old.get("concepts", {}), new.get("concepts", {})
    diffs += [f"concepts.{k}" for k in _CONCEPT_KEYS if old_c.get(k) != new_c.get(k)]
    for group in ("methods", "inputs"):
        old_g, new_g = old.get(group, {}), new.get(group, {})
        diffs += [f"{group}.{name}" for name in new_g if name in old_g and old_g[name] != new_g[name]]
    return diffs


def check_run_record(out_dir: Path, record: dict[str, Any], overwrite: bool) -> None:
    """Refuses to resume a folder made with another configuration; with ``overwrite``, clears it instead.

    Raises:
        EvaluationConfigError: ``out_dir`` holds rows that this configuration would write differently.
    """
    path = Path(out_dir) / RECORD_FILE
    if overwrite:
        for name in _OUTPUTS:
            target = Path(out_dir) / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        return
    if not path.is_file():
        if (Path(out_dir) / "results.csv").is_file():
            raise EvaluationConfigError(
                f"{out_dir} holds results.csv but no {RECORD_FILE}: use another --out_dir or --overwrite true"
            )
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    diffs = _differences(old, record)
    if diffs:
        raise EvaluationConfigError(
            f"{out_dir} holds results of another configuration (changed: {', '.join(diffs)}); "
            "rerun with --overwrite true or use another --out_dir"
        )


def merge_records(old_path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """The record to write after a resumed run: methods and inputs of earlier runs are kept."""
    if not old_path.is_file():
        return record
    old = json.loads(old_path.read_text(encoding="utf-8"))
    merged = dict(record)
    for group in ("methods", "inputs"):
        merged[group] = {**old.get(group, {}), **record.get(group, {})}
    return merged
