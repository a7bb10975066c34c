"""Quiet runs: silence the libraries' known-harmless messages, each matched by its own text.

The entry points (``train.py``, ``evaluate.py``) call :func:`quiet_libraries` before importing the heavy
libraries unless ``--verbose`` is given, so a run prints what it did and nothing else. Library users importing
the packages get the libraries' messages untouched. Every message silenced here is listed with why it is
harmless; anything new still prints.

This module imports only the standard library: it must run before transformers and diffusers are imported
(the torchvision notices are emitted while importing them).
"""

from __future__ import annotations

import logging
import re
import warnings

# (logger name, message pattern, why it is harmless). Logger filters only see records created on that very
# logger, so each message is filtered where the library logs it.
HARMLESS_LOG_RECORDS: tuple[tuple[str, str, str], ...] = (
    (
        "transformers.utils.import_utils",
        r"requires torchvision \(not installed\); falling back to `\w+Pil`",
        "the PIL image processors are the ones this project uses; diffusers' IP-adapter import asks for "
        "the torchvision ones by name",
    ),
    ("lightning.fabric.utilities.seed", r"^Seed set to", "the seed is in the config"),
    (
        "lightning.pytorch.utilities.rank_zero",
        r"^(GPU|TPU|HPU) available|^💡 Tip: |^`Trainer.fit` stopped: `max_steps=",
        "hardware inventory, an advertisement, and the end of a run that stops at max_steps by design",
    ),
    (
        "lightning.fabric.utilities.rank_zero",
        r"^(GPU|TPU|HPU) available|^💡 Tip: |^`Trainer.fit` stopped: `max_steps=",
        "as above (whichever Lightning package was imported last owns the rank-zero logger)",
    ),
)

# (message pattern, why it is harmless) for warnings.warn calls.
HARMLESS_WARNINGS: tuple[tuple[str, str], ...] = (
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        "Lightning's own use of a torch API deprecated after its release",
    ),
    (
        r"Found \d+ module\(s\) in eval mode at the start of training",
        "the frozen backbone is in eval mode on purpose (no dropout, fixed normalisation statistics)",
    ),
)


class _MessageFilter(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def pop_verbose(argv: list[str]) -> bool:
    """Removes every ``--verbose`` from ``argv`` (in place) and says whether there was one."""
    verbose = "--verbose" in argv
    argv[:] = [a for a in argv if a != "--verbose"]
    return verbose


def quiet_libraries() -> None:
    """Silences the known-harmless messages above and the per-file weight-loading bars (idempotent)."""
    for name, pattern, _ in HARMLESS_LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _MessageFilter) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_MessageFilter(pattern))
    for pattern, _ in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{pattern}")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" per file: the run's own bar follows
    diffusers_logging.disable_progress_bar()
