"""LightningModules: encoder pretraining and per-concept tuning, kept separate."""

from lightning_modules.pretrain import EncoderPretraining
from lightning_modules.tuning import ConceptTuning

__all__ = ["ConceptTuning", "EncoderPretraining"]
