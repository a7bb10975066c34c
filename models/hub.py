"""Resolving a model folder or hub id without minutes of silent retries when the hub is unreachable."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from models.errors import TuningEncoderError


class ModelNotAvailableError(TuningEncoderError, OSError):
    """A hub id that is neither cached locally nor downloadable from here."""


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_model_path(name_or_path: str | Path) -> str:
    """Returns a local folder for ``name_or_path``, or the hub id when it can really be downloaded.

    A local folder is returned as is. A hub id is returned as its cached snapshot folder when cached; if it is
    not cached and the hub is offline (``HF_HUB_OFFLINE=1``) or unreachable, this fails at once with a message
    that says to pass a local folder, instead of the minutes of retries ``from_pretrained`` would spend.

    Raises:
        ModelNotAvailableError: the id is not cached and cannot be downloaded.
    """
    name = str(name_or_path)
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotAvailableError(f"model folder {name!r} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(name, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}
    if offline or not _hub_reachable():
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub is unreachable"
        raise ModelNotAvailableError(
            f"model {name!r} is not in the local cache and {why}: pass a local folder "
            f"(a diffusers/transformers model directory) instead of a hub id"
        )
    return name
