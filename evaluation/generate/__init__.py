"""Stage 5 of an evaluation, generation: ``images.py`` (seeds, dual-path and plain sampling, PNG files),
``exported.py`` (a concept's export sampled in plain diffusers) and ``modes.py`` (one batch of a method in its
generation mode: dual path, plain words, or export).
"""
