"""The toy world: a procedural 32 px world with trained models (base text-to-image model, tiny CLIP, attribute
checker, image encoder; committed in ``assets/toyworld/``) on which personalization can be measured offline.

The core (evaluation, datamodules, models, lightning_modules) never imports this package: it plugs in through
``class_path`` in configs. The plug-ins are re-exported here, so a config names ``toyworld.<Class>``.

Rooms (each imports only the rooms above it):

- ``common/``: ``pipeline`` (asset paths, the CLIP tokenizer, the base pipeline, seeded sampling).
- ``named/``, the named world (every attribute has a word): ``world`` (scenes, renderer, captions, splits),
  ``data`` (encoder-pretraining items), ``concepts`` (held-out concepts, an evaluation concept set), ``checker``
  (the attribute checker and its metric), ``validation`` (validation concepts, the identity callback),
  ``measure`` (the models' accuracies).
- ``instance/``, the instance world (named categories with unnamed details): ``world`` (categories, instances,
  contexts, split, captions), ``render``, ``stream`` (base-training batches), ``concepts`` (its concept sets),
  ``data`` (pretraining items, validation callback), ``pairs`` (instance pairs for the image encoder),
  ``pixels`` (identity and prompt read from pixels, an evaluation metric).
- ``training/``, training the world's models: ``train`` (autoencoder, base model, checker; config loading),
  ``clip`` (the tiny CLIP), ``image_encoder`` (the encoder DATE's image branch reads).
- ``release/``, what ships in ``assets/toyworld/``: ``assets`` (export, probe, encoders), ``instance_assets``
  (the instance pipeline, its adherence and autoencoder ceiling), ``card`` (model-card lines), ``figures``.
- ``diagnostics/``, research instruments: ``image_probe`` and ``instance_probe`` (the image-branch gates),
  ``oracle`` (a supervised upper bound of the gate), ``calibration`` (the pixel metric's threshold and
  reference rows), ``core_probe`` (what an encoder's cores carry),
  ``sample_rows`` (pixel identity per row of an ``evaluate.py sample`` grid), ``peft_reference`` (a one-image
  LoRA in plain diffusers + peft, the reference our tuning path is compared with).
- Each room's ``commands`` holds its commands; ``cli`` generates the command line from their signatures and
  docstrings; ``__main__``: ``python -m toyworld --help`` lists them by room.
"""

from __future__ import annotations

import importlib
from typing import Any

# The plug-ins configs name by class_path, imported on first use (``import toyworld`` stays light).
PLUGINS = {
    "ToyWorldConceptDataset": "toyworld.named.data",
    "ToyWorldConcepts": "toyworld.named.concepts",
    "CheckerMetric": "toyworld.named.checker",
    "ValidationIdentity": "toyworld.named.validation",
    "InstanceConcepts": "toyworld.instance.concepts",
    "InstanceConceptDataset": "toyworld.instance.data",
    "InstanceValidationIdentity": "toyworld.instance.data",
    "PixelIdentityMetric": "toyworld.instance.pixels",
}
__all__ = sorted(PLUGINS)


def __getattr__(name: str) -> Any:
    if name in PLUGINS:
        return getattr(importlib.import_module(PLUGINS[name]), name)
    raise AttributeError(f"module 'toyworld' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *PLUGINS])
