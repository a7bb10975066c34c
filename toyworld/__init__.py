"""The toy world: a procedural 32 px world with trained models (base text-to-image model, tiny CLIP, attribute
checker; committed in ``assets/toyworld/``) on which personalization can be measured offline.

Rooms: ``world.py`` (scenes, renderer, captions, splits), ``data.py`` (encoder-pretraining items for
``datamodules.pretrain.PretrainDataModule``), ``concepts.py`` (held-out concepts, an evaluation concept set),
``checker.py`` (the attribute checker: model, scoring, evaluation metric), ``measure.py`` (model accuracies),
``train.py`` / ``train_clip.py`` (training the world's models), ``assets.py`` (the asset folder and its model
card), ``figures.py`` (the README's result figures), the instance world (``instance.py``: named
categories with unnamed details; ``instance_concepts.py``: its concept sets; ``pixels.py``: identity and prompt
read from pixels, an evaluation metric; ``instance_calibration.py``: its threshold and reference rows) and
``__main__.py`` (``python -m toyworld --help``).
The core (evaluation, datamodules, models, lightning_modules) never imports this package: it plugs in through
``class_path`` in configs.
"""
