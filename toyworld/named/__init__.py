"""The named world: 32 px scenes of one object whose every attribute has a word (shape, colour, pattern,
background, position, size).

Modules: ``world`` (scenes, renderer, captions, splits, held-out concepts), ``data`` (encoder-pretraining items,
the ``dataset:`` of ``PretrainDataModule``), ``concepts`` (held-out concepts as an evaluation concept set),
``checker`` (the attribute checker: model, scoring, evaluation metric), ``validation`` (validation concepts and the
identity callback of pretraining), ``measure`` (the base model's, checker's and tiny CLIP's accuracies).
"""
