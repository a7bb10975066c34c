"""Stage 7 of an evaluation, the store: ``results.py`` (the per-image rows, appended and read back to resume) and
``run_state.py`` (what a folder was made with, its file layout, resume checks and ``--overwrite``)."""
