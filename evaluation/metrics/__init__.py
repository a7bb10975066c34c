"""Stage 6 of an evaluation, the metrics: per-image scores of generated images.

``registry.py`` holds the column registry (name -> label, format, aggregation) and the plug-in base
:class:`~evaluation.metrics.registry.ImageMetric`; adding a metric is one file that registers its columns and
scores images (e.g. ``toyworld.CheckerMetric``, named in ``metrics.plugins`` by ``class_path``).
``similarity.py`` is CLIP-I / CLIP-T / DINO (on ``features.py``), ``nearest_word.py`` the nearest word of a
learned v*, ``suite.py`` loads the backbones of one run and scores a group of images.
"""
