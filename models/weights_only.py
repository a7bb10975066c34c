"""Reading a PyTorch ``.pt`` / ``.ckpt`` file without running code from it.

``torch.load(weights_only=True)`` unpickles tensors, containers and plain values only; a pickle that asks for
anything else (a class, a function: what a payload needs) fails before any of it runs. Every checkpoint the
project reads goes through :func:`load_weights_only`, which turns each failure into one line naming the file.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.errors import CheckpointMismatchError, MissingFileError


def load_weights_only(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; every failure is one line naming ``what`` and ``path``.

    Raises:
        MissingFileError: the file does not exist.
        CheckpointMismatchError: the file is not a PyTorch checkpoint, or its pickle names more than tensors
            and plain values (refused before any of it runs).
    """
    if not Path(path).is_file():
        raise MissingFileError(f"{what} {path} does not exist")
    import torch

    from models.personalizer import PersonalizerConfig  # the one class our checkpoints hold (hyperparameters)

    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals([PersonalizerConfig]):
            # "Detected pickle protocol 4": the refusal below says what matters.
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise unreadable(path, what, err) from err
        named = re.search(r"GLOBAL (\S+)", str(err))
        if named is None:  # foreign bytes, or a pickle op the weights-only reader lacks: refused unread too
            operand = re.search(r"Unsupported operand \d+", str(err))
            detail = operand.group(0) if operand else "the weights-only reader refuses it"
            raise CheckpointMismatchError(
                f"{what} {path} is not a readable PyTorch checkpoint: {detail}"
            ) from None
        raise CheckpointMismatchError(
            f"{what} {path} holds more than tensors and plain values (it asks for {named.group(1)}), which "
            "could run code when loaded: refused (only weights-only checkpoints and safetensors encoder "
            "folders are read)"
        ) from None
    except Exception as err:  # torch raises several error types (zip, EOF, unicode) for foreign bytes
        raise unreadable(path, what, err) from err


def unreadable(path: str | Path, what: str, err: BaseException) -> CheckpointMismatchError:
    """The one-line error for a file that is not a PyTorch checkpoint at all (its first line of ``err``)."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return CheckpointMismatchError(f"{what} {path} is not a readable PyTorch checkpoint: {first}")


def check_weights_only(
    path: str | Path, error: Callable[[str], Any], what: str = "checkpoint", missing_ok: bool = False
) -> None:
    """Calls ``error(message)`` (e.g. a parser's ``error``: one line, status 2) unless ``path`` reads weights-only.

    Commands call it before any work. ``missing_ok``: a missing file is no error (nothing to resume from).
    """
    if missing_ok and not Path(path).is_file():
        return
    try:
        load_weights_only(path, what)
    except (CheckpointMismatchError, MissingFileError) as err:
        error(str(err))
