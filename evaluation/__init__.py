"""Evaluation: DreamBench subjects and prompts, frozen CLIP / DINO feature extractors, CLIP-I / CLIP-T / DINO
metrics, and tiny offline evaluation backbones for tests.

Names are imported lazily so that ``import evaluation.dreambench`` does not pull in transformers.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Subject": "evaluation.dreambench",
    "load_dreambench": "evaluation.dreambench",
    "load_images": "evaluation.dreambench",
    "fill_placeholder": "evaluation.dreambench",
    "PLACEHOLDER": "evaluation.dreambench",
    "ClipFeatures": "evaluation.feature_models",
    "DinoFeatures": "evaluation.feature_models",
    "IdentitySimilarity": "evaluation.metrics",
    "PromptSimilarity": "evaluation.metrics",
    "identity_scores": "evaluation.metrics",
    "prompt_scores": "evaluation.metrics",
    "clipscore_for": "evaluation.metrics",
    "write_tiny_eval_models": "evaluation.tiny_models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'evaluation' has no attribute {name!r}")
