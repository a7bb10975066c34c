"""The column registry of per-image metrics and the base of metric plug-ins.

A metric column is a float per image (``results.csv``), aggregated as the mean over each concept's images, then
over concepts, with a bootstrap interval over concepts (``report``). Its label names it in tables and plots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

    from evaluation.concepts.base import EvalConcept


@dataclass(frozen=True)
class Column:
    """One per-image metric column.

    Attributes:
        name: CSV column (e.g. ``clip_i``).
        label: name in tables and plot axes (e.g. ``CLIP-I``).
        fmt: format of a value in ``results.csv``.
        table: shown in the printed summary table (summary.json has every column).
    """

    name: str
    label: str
    fmt: str = "{:.6f}"
    table: bool = False


REGISTRY: dict[str, Column] = {}


def register(*columns: Column) -> tuple[Column, ...]:
    """Adds columns to the registry (idempotent for an identical column) and returns them."""
    for column in columns:
        if REGISTRY.get(column.name, column) != column:
            raise ValueError(f"metric column {column.name!r} is already registered differently")
        REGISTRY[column.name] = column
    return columns


def column(name: str) -> Column:
    """The registered column, or a plain one labelled by its name (a results file from a plug-in not loaded)."""
    return REGISTRY.get(name) or Column(name, name)


class ImageMetric:
    """A metric plug-in: scores a group of one concept's generated images into its registered columns.

    Subclasses are named by ``class_path`` in ``metrics.plugins``; their ``__init__`` arguments are their options
    (recorded in ``run.json``). Construction must be cheap: models load in :meth:`load`.

    Attributes:
        name: key of its description in ``metrics.json``.
        columns: its columns (registered with :func:`register` at import).
        plot: ``(x, y, title)`` of its trade-off plot, drawn as the run's ``tradeoff.png`` (the CLIP plot then
            goes to ``tradeoff_clip.png``), or None.
    """

    name: str = "plugin"
    columns: tuple[Column, ...] = ()
    plot: tuple[str, str, str] | None = None

    def settings(self) -> dict[str, Any]:
        """Its options, for the run record."""
        return {}

    def check(self, concepts: Sequence[EvalConcept]) -> None:
        """Raises ``EvaluationConfigError`` when it cannot score these concepts (before any model loads)."""

    def load(self, device: str = "cpu") -> ImageMetric:
        """Loads its models onto ``device``; returns itself."""
        return self

    def score(
        self, images: Tensor, concept: EvalConcept, prompt_indices: Sequence[int]
    ) -> dict[str, list[float]]:
        """Per-image scores of (N, 3, H, W) images in [0, 1] of ``concept``, image i made for prompt
        ``prompt_indices[i]``: ``{column name: N floats}``."""
        raise NotImplementedError(f"{type(self).__name__} does not define score()")

    def describe(self) -> dict[str, Any]:
        """Backbone, preprocessing and pairing (``metrics.json``)."""
        return {}
