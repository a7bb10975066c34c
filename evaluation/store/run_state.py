"""What an output folder was made with (``run.json``), so a rerun never mixes rows of two configurations; the
folder's layout, and ``overwrite``.

Resuming is only sound when the rows already written would be written again identically. Everything that
changes an existing row is recorded and compared on restart: the resolved tune recipes, backbone, sampling,
metric backbones, the concept set's options (all but those that only add or drop concepts and prompts, its
``row_selection``), and the checkpoint files (size and mtime). What only adds rows may change freely: more
concepts, more settings, more methods.
"""

from __future__ import annotations

import importlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from evaluation.concepts.base import ConceptSet
from evaluation.config import EvaluationConfigError, MethodSpec, SamplingSpec
from evaluation.generate.images import IMAGES_DIR
from evaluation.generate.modes import EXPORTS_DIR
from evaluation.metrics.suite import MetricSpec
from evaluation.store.results import METRICS_INFO
from evaluation.tuning import ARTIFACTS_DIR
from models.io import atomic_write

RECORD_FILE = "run.json"
RECORD_VERSION = 2  # 2: concept sets by class path, every option that changes rows in the resume key
RESULTS_FILE = "results.csv"
SUMMARY_FILE = "summary.json"
TRADEOFF_FILE = "tradeoff.png"  # the main plot: a plug-in's own (e.g. the checker's), else CLIP-I vs CLIP-T
TRADEOFF_CLIP_FILE = "tradeoff_clip.png"  # CLIP-I vs CLIP-T when a plug-in draws the main plot
NEAREST_WORDS_FILE = "nearest_words.md"
GRIDS_DIR = "grids"
TENSORBOARD_DIR = "tb"
# Everything a run writes into its folder: what ``overwrite`` removes (never the folder itself: it may hold other
# files).
OUTPUTS = (
    RECORD_FILE,
    RESULTS_FILE,
    SUMMARY_FILE,
    METRICS_INFO,
    TRADEOFF_FILE,
    TRADEOFF_CLIP_FILE,
    NEAREST_WORDS_FILE,
    IMAGES_DIR,
    GRIDS_DIR,
    ARTIFACTS_DIR,
    EXPORTS_DIR,
    TENSORBOARD_DIR,
)


def write_json(path: str | Path, data: Any) -> Path:
    """Writes JSON atomically (temporary file, then rename)."""

    def write(tmp: str) -> None:
        Path(tmp).write_text(
            json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8"
        )

    return atomic_write(path, write)


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def run_record(
    tune_config: str,
    overrides: dict[str, Any],
    recipes: dict[str, dict[str, Any]],
    methods: list[MethodSpec],
    concepts: ConceptSet,
    sampling: SamplingSpec,
    metrics: MetricSpec,
    inputs: dict[str, Any],
    concepts_per_batch: int = 1,
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
        concepts_per_batch: concepts tuned per run (K) by the last invocation, under ``tuning``; not part of
            the resume key (batched rows equal the sequential ones within tolerance, tests/test_eval_batched.py).
    """
    return _plain(
        {
            "version": RECORD_VERSION,
            "tune_config": tune_config,
            "tune_overrides": overrides,
            "methods": {m.name: {"spec": asdict(m), "recipe": recipes.get(m.name)} for m in methods},
            "concepts": {"settings": concepts.settings(), "resume_key": concepts.resume_key()},
            "sampling": asdict(sampling),
            "metrics": metrics.record(),
            "inputs": inputs,
            "tuning": {"concepts_per_batch": concepts_per_batch},
        }
    )


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    diffs = [k for k in ("version", "sampling", "metrics") if old.get(k) != new.get(k)]
    old_c, new_c = old.get("concepts", {}).get("resume_key", {}), new["concepts"]["resume_key"]
    diffs += [f"concepts.{k}" for k in sorted(set(old_c) | set(new_c)) if old_c.get(k) != new_c.get(k)]
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
        clear_outputs(out_dir)
        return
    if not path.is_file():
        if (Path(out_dir) / RESULTS_FILE).is_file():
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


def clear_outputs(out_dir: str | Path) -> None:
    """Removes every output of a run (:data:`OUTPUTS`) from ``out_dir``; other files stay."""
    for name in OUTPUTS:
        target = Path(out_dir) / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def merge_records(old_path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """The record to write after a resumed run: methods and inputs of earlier runs are kept."""
    if not old_path.is_file():
        return record
    old = json.loads(old_path.read_text(encoding="utf-8"))
    merged = dict(record)
    for group in ("methods", "inputs"):
        merged[group] = {**old.get(group, {}), **record.get(group, {})}
    return merged


def register_plugin_columns(out_dir: str | Path) -> None:
    """Imports the metric plug-ins a folder's ``run.json`` names, so that their columns have their labels (a
    results file read in a fresh process, e.g. by ``evaluate.py plot``). A folder without one is left alone."""
    path = Path(out_dir) / RECORD_FILE
    if not path.is_file():
        return
    plugins = json.loads(path.read_text(encoding="utf-8")).get("metrics", {}).get("plugins", [])
    for plugin in plugins:
        module = str(plugin.get("class_path", "")).rpartition(".")[0]
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise EvaluationConfigError(
                f"{path} names the metric plug-in {module!r}, which cannot be imported: {err}"
            ) from err
