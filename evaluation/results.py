"""``results.csv``: one row per generated image, appended as rows complete, read back to resume.

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

from evaluation.checker_metrics import CHECKER_COLUMNS
from evaluation.spec import EvaluationConfigError

COLUMNS: tuple[str, ...] = (
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
    "clip_i",
    "clip_t",
    "dino",
    "clip_i_no_input",
    "dino_no_input",
    *CHECKER_COLUMNS,
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
FLOAT_COLUMNS = (
    "alpha",
    "guidance",
    "clip_i",
    "clip_t",
    "dino",
    "clip_i_no_input",
    "dino_no_input",
    *CHECKER_COLUMNS,
    "tune_seconds",
)
METRICS_INFO = "metrics.json"  # backbone, preprocessing and pairing of every metric column

RowKey = tuple[str, str, int, float, float, int, int]


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


def _format(value: Any, column: str) -> str:
    if value is None or value == "":
        return ""
    if column in ("clip_i", "clip_t", "dino", "clip_i_no_input", "dino_no_input", *CHECKER_COLUMNS):
        return f"{float(value):.6f}"
    if column == "tune_seconds":
        return f"{float(value):.3f}"
    if column in ("alpha", "guidance"):
        return repr(float(value))
    return str(value)


def parse_row(row: dict[str, str]) -> dict[str, Any]:
    """Converts a CSV row's numeric columns (empty metric cells become None)."""
    out: dict[str, Any] = dict(row)
    for column in INT_COLUMNS:
        out[column] = int(row[column])
    for column in FLOAT_COLUMNS:
        out[column] = float(row[column]) if row.get(column, "") != "" else None
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

    Raises:
        EvaluationConfigError: an existing file with other columns (made by another version of this tool).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        if self.path.is_file():
            _repair_tail(self.path)
            if self.path.stat().st_size > 0:
                self.rows = read_results(self.path)
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
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        if not self.path.is_file() or self.path.stat().st_size == 0:
            writer.writeheader()
        writer.writerows({c: _format(r.get(c), c) for c in COLUMNS} for r in rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8", newline="") as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        for row in rows:
            parsed = parse_row({c: _format(row.get(c), c) for c in COLUMNS})
            self.rows.append(parsed)
            self._keys.add(row_key(parsed))


def read_results(paths: str | Path | Iterable[str | Path]) -> list[dict[str, Any]]:
    """Reads one or more ``results.csv`` files into typed rows.

    Raises:
        EvaluationConfigError: a file is missing or its columns are not :data:`COLUMNS`.
    """
    path_list = [paths] if isinstance(paths, (str, Path)) else list(paths)
    rows: list[dict[str, Any]] = []
    for path in map(Path, path_list):
        if not path.is_file():
            raise EvaluationConfigError(f"results file {path} does not exist")
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != COLUMNS:
                raise EvaluationConfigError(
                    f"{path} has columns {reader.fieldnames}, expected {list(COLUMNS)}: "
                    "not a results.csv of this version (use a new out_dir)"
                )
            rows.extend(parse_row(r) for r in reader)
    return rows
