"""The project's own error types: the mistakes a user can make, each reported by the CLIs as one line.

``train.py`` and ``evaluate.py`` print ``<script>: error: <message>`` and exit with status 2 for a
:class:`TuningEncoderError`; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class TuningEncoderError(Exception):
    """Base of every error the project raises on purpose for bad input (files, checkpoints, configuration).

    Subclasses also derive from the built-in type a caller would expect (``ValueError``, ``OSError``,
    ``FileNotFoundError``), so ``except ValueError`` keeps working.
    """


class ConfigurationError(TuningEncoderError, ValueError):
    """A configuration value that cannot work (a count < 1, an impossible combination of options)."""


class MissingFileError(TuningEncoderError, FileNotFoundError):
    """An input file the user named (image, checkpoint, concept artefact) that does not exist."""


class NonFiniteError(TuningEncoderError, FloatingPointError):
    """Training diverged: a loss term, a gradient or a trained weight became NaN or infinite."""


class ArtifactWriteError(TuningEncoderError, OSError):
    """A concept artefact or export that could not be written (full disk, read-only folder, a file in the way)."""


class CheckpointMismatchError(TuningEncoderError, ValueError):
    """A checkpoint that is not ours, of the wrong phase, made on another base model, or that would run code."""
