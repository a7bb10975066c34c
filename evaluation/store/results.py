"""``results.csv``: one row per generated image, appended as rows complete, read back to resume (part of the
store stage, with ``run_state.py``).

Appends are atomic at row-group granularity: a group's rows are written with one ``write`` call followed by
``fsync``; a crash can leave at most a partial last line, which is dropped (and its images regenerated) on the
next run. A row is identified by :func:`row_key`.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from evaluation.concepts.base import EvalConcept
from evaluation.config import EvaluationConfigError
from evaluation.metrics.registry import column
from evaluation.metrics.similarity import SIMILARITY_COLUMNS
from evaluation.plan import Setting

# A row: who made the image and how (HEAD), one column per metric of the run, then its context (TAIL).
HEAD: tuple[str, ...] = (
    "method",
    "setting",
    "steps",
    "alpha",
    "guidance",
    "concept",
    "class_noun",
    "prompt_idx",
    "prompt",
    "sample",
    "seed",
    "image",
)
TAIL: tuple[str, ...] = (
    "tune_seconds",
    "concept_words",
    "concept_kind",
    "nearest_word",
    "sampler",
    "inference_steps",
    "clip_backbone",
    "dino_backbone",
    "metrics_info",
)
INT_COLUMNS = ("steps", "prompt_idx", "sample", "seed", "inference_steps")
FLOAT_COLUMNS = ("alpha", "guidance", "tune_seconds")
METRICS_INFO = "metrics.json"  # backbone, preprocessing and pairing of every metric column


def columns_of(metric_columns: Sequence[str]) -> tuple[str, ...]:
    """The header of a results file with these metric columns."""
    return (*HEAD, *metric_columns, *TAIL)


def metric_columns(header: Sequence[str]) -> list[str]:
    """The metric columns of a results header (between ``HEAD`` and ``TAIL``)."""
    return list(header[len(HEAD) : len(header) - len(TAIL)])


COLUMNS: tuple[str, ...] = columns_of([c.name for c in SIMILARITY_COLUMNS])  # a run without metric plug-ins

RowKey = tuple[str, str, int, float, float, int, int]


def image_row(
    method: str,
    setting: Setting,
    concept: EvalConcept,
    prompt_idx: int,
    sample: int,
    seed: int,
    image: str,
    context: dict[str, Any],
) -> dict[str, Any]:
    """The row of one generated image, before scoring.

    Args:
        method: the method's name.
        setting: its setting.
        concept: the concept.
        prompt_idx: which of the concept's prompts.
        sample: which sample of the prompt.
        seed: the image's seed.
        image: its path relative to the output folder.
        context: the group's ``tune_seconds``, ``nearest_word``, ``sampler``, ``inference_steps``,
            ``clip_backbone`` and ``dino_backbone``.
    """
    return {
        "method": method,
        "setting": setting.label,
        "steps": setting.steps,
        "alpha": setting.alpha,
        "guidance": setting.guidance,
        "concept": concept.name,
        "class_noun": concept.class_noun,
        "prompt_idx": prompt_idx,
        "prompt": concept.prompts[prompt_idx],
        "sample": sample,
        "seed": seed,
        "image": image,
        "concept_words": concept.words,
        "concept_kind": concept.kind or "",
        "metrics_info": METRICS_INFO,
        **context,
    }


def row_key(row: dict[str, Any]) -> RowKey:
    """(method, concept, steps, alpha, guidance, prompt_idx, sample) of a row (strings or numbers)."""
    return (
        str(row["method"]),
        str(row["concept"]),
        int(row["steps"]),
        float(row["alpha"]),
        float(row["guidance"]),
        int(row["prompt_idx"]),
        int(row["sample"]),
    )


def _format(value: Any, name: str, metrics: Sequence[str]) -> str:
    if value is None or value == "":
        return ""
    if name in metrics:
        return column(name).fmt.format(float(value))
    if name == "tune_seconds":
        return f"{float(value):.3f}"
    if name in ("alpha", "guidance"):
        return repr(float(value))
    return str(value)


def parse_row(row: dict[str, str], metrics: Sequence[str]) -> dict[str, Any]:
    """Converts a CSV row's numeric columns (empty metric cells become None)."""
    out: dict[str, Any] = dict(row)
    for name in INT_COLUMNS:
        out[name] = int(row[name])
    for name in (*FLOAT_COLUMNS, *metrics):
        out[name] = float(row[name]) if row.get(name, "") != "" else None
    return out


def _repair_tail(path: Path) -> None:
    """Drops a partial last line (a crash mid-append) so the file parses and the row gets redone."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(cut)


class ResultsStore:
    """The per-image rows of one output folder.

    Args:
        path: ``results.csv`` (created with a header on the first append).
        metrics: the run's metric columns (default: CLIP-I, CLIP-T, DINO and their variants).

    Raises:
        EvaluationConfigError: an existing file with other columns (another version or other metrics).
    """

    def __init__(self, path: str | Path, metrics: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        self.metrics = list(metrics) if metrics is not None else metric_columns(COLUMNS)
        self.columns = columns_of(self.metrics)
        self.rows: list[dict[str, Any]] = []
        if self.path.is_file():
            _repair_tail(self.path)
            if self.path.stat().st_size > 0:
                self.rows = read_results(self.path, self.columns)
        self._keys = {row_key(r) for r in self.rows}

    def __contains__(self, key: RowKey) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self.rows)

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        """Appends rows durably (one write, then fsync); rows whose key already exists are refused."""
        if not rows:
            return
        dupes = [row_key(r) for r in rows if row_key(r) in self._keys]
        if dupes:
            raise ValueError(f"rows already in {self.path}: {dupes[:3]}")
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, lineterminator="\n")
        if not self.path.is_file() or self.path.stat().st_size == 0:
            writer.writeheader()
        writer.writerows({c: _format(r.get(c), c, self.metrics) for c in self.columns} for r in rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8", newline="") as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        for row in rows:
            parsed = parse_row({c: _format(row.get(c), c, self.metrics) for c in self.columns}, self.metrics)
            self.rows.append(parsed)
            self._keys.add(row_key(parsed))


def read_results(
    paths: str | Path | Iterable[str | Path], columns: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Reads one or more ``results.csv`` files into typed rows.

    Args:
        paths: the files.
        columns: the header they must have (None: any ``HEAD``, metric columns, ``TAIL`` header).

    Raises:
        EvaluationConfigError: a file is missing or its columns are not of this version (or not ``columns``).
    """
    path_list = [paths] if isinstance(paths, (str, Path)) else list(paths)
    rows: list[dict[str, Any]] = []
    for path in map(Path, path_list):
        if not path.is_file():
            raise EvaluationConfigError(f"results file {path} does not exist")
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            header = tuple(reader.fieldnames or ())
            shaped = header[: len(HEAD)] == HEAD and header[len(header) - len(TAIL) :] == TAIL
            if not shaped or (columns is not None and header != tuple(columns)):
                expected = list(columns) if columns is not None else [*HEAD, "<metric columns>", *TAIL]
                raise EvaluationConfigError(
                    f"{path} has columns {list(header)}, expected {expected}: "
                    "not a results.csv of this version and metrics (use a new out_dir)"
                )
            metrics = metric_columns(header)
            rows.extend(parse_row(r, metrics) for r in reader)
    return rows
