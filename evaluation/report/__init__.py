"""Stage 8 of an evaluation, the report: ``aggregate.py`` (per method x setting means with bootstrap intervals,
the printed table), ``plot.py`` (trade-off curves), ``files.py`` (image grids, TensorBoard), ``words.py`` (the
nearest-word table) and ``summary.py`` (all of them written for one run, and ``summary.json``).
"""
