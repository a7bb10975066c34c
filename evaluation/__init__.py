"""Evaluation of personalization methods, as stages that each import only earlier ones:

1. ``config.py``: run-wide typed options (methods, sweep, sampling) and ``EvaluationConfigError``.
2. ``concepts/``: concept sets, each a typed variant that loads itself (synthetic, DreamBench, plug-ins).
3. ``plan.py`` (with ``recipe.py``): methods resolved from their tune YAMLs, settings; no model loaded.
4. ``tuning.py``: one tuning run per method x concept, snapshots at every requested step count.
5. ``generate/``: images by generation mode (dual path, plain words, export in plain diffusers).
6. ``metrics/``: the column registry and per-image scores (CLIP-I / CLIP-T / DINO, plug-ins, nearest word).
7. ``store/``: ``results.csv`` and the run state (``run.json``, the folder layout, ``--overwrite``).
8. ``report/``: aggregates, ``summary.json``, grids, plots, the nearest-word table.

``harness.py`` wires them for ``evaluate.py run``. Names are imported lazily so that ``import evaluation`` pulls
in nothing heavy.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Subject": "evaluation.concepts.dreambench",
    "load_dreambench": "evaluation.concepts.dreambench",
    "load_images": "evaluation.concepts.dreambench",
    "fill_placeholder": "evaluation.concepts.dreambench",
    "PLACEHOLDER": "evaluation.concepts.dreambench",
    "ClipFeatures": "evaluation.metrics.features",
    "DinoFeatures": "evaluation.metrics.features",
    "IdentitySimilarity": "evaluation.metrics.similarity",
    "PromptSimilarity": "evaluation.metrics.similarity",
    "identity_scores": "evaluation.metrics.similarity",
    "prompt_scores": "evaluation.metrics.similarity",
    "clipscore_for": "evaluation.metrics.similarity",
    "write_tiny_eval_models": "evaluation.metrics.tiny_models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'evaluation' has no attribute {name!r}")
