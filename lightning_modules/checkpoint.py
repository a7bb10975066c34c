"""Reading and checking encoder checkpoints, without ever running code from them.

An encoder checkpoint is the artefact people share, so nothing here unpickles arbitrary objects:

- A Lightning ``.ckpt`` (or a ``.pt``) is read with ``torch.load(weights_only=True)``: tensors, containers and
  plain values only. A file whose pickle asks for anything else (a class, a function: what a payload needs) is
  refused with one line naming the file, and nothing of it runs. ``--ckpt_path`` resumes go through the same
  reader before Lightning sees the file, and Lightning's own load is made ``weights_only`` too
  (:class:`lightning_modules.cli.TuningEncoderCLI`).
- The shareable encoder is a folder in the ``save_pretrained`` / ``from_pretrained`` convention of diffusers and
  transformers: ``model.safetensors`` (the trainable weights) and ``config.json`` (the phase, the base model's
  and the image encoder's fingerprints and the module sizes: what the checks below compare). It is accepted by
  folder or hub id wherever a ``.ckpt`` is, and :func:`export_encoder` writes it from a pretraining checkpoint
  (``python -m lightning_modules.checkpoint CKPT OUT_DIR``).

Both forms are returned as the same dict (``state_dict``, the ``tuning_encoder`` metadata, ``hyper_parameters``,
``global_step``), so :func:`check_checkpoint` refuses another phase, base model or image encoder alike.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from models.errors import CheckpointMismatchError, MissingFileError, TuningEncoderError
from models.weights_only import load_weights_only

__all__ = [
    "CHECKPOINT_KEY",
    "CheckpointMismatchError",
    "check_checkpoint",
    "export_encoder",
    "load_pretraining_checkpoint",
    "read_checkpoint",
    "read_encoder_folder",
    "write_encoder_folder",
]

CHECKPOINT_KEY = "tuning_encoder"
ENCODER_WEIGHTS = "model.safetensors"
ENCODER_CONFIG = "config.json"
ENCODER_FORMAT = "tuning-encoder"


def read_checkpoint(path: str | Path, what: str = "checkpoint") -> dict:
    """An encoder checkpoint as a dict: a ``.ckpt`` file (weights only), or a shareable folder or its hub id.

    Raises:
        MissingFileError: neither a file, nor a folder, nor a cached or downloadable hub id.
        CheckpointMismatchError: not a readable checkpoint, or one that would run code when unpickled.
    """
    if Path(path).is_file():
        return load_weights_only(path, what)
    return read_encoder_folder(_encoder_folder(path, what), what)


def _encoder_folder(name: str | Path, what: str) -> Path:
    """The local folder of a shareable encoder given as a folder or a hub id."""
    from models.hub import ModelNotAvailableError, resolve_model_path

    if Path(name).is_dir():
        return Path(name)
    text = str(name)
    if text.startswith((".", "/", "~")) or text.count("/") != 1 or Path(text).suffix in (".ckpt", ".pt"):
        raise MissingFileError(f"{what} {name} does not exist")
    try:
        resolved = resolve_model_path(str(name))
    except ModelNotAvailableError as err:
        raise MissingFileError(
            f"{what} {name} is not a file or a folder, and not an available hub id: {err}"
        ) from None
    if Path(resolved).is_dir():
        return Path(resolved)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(resolved, allow_patterns=[ENCODER_CONFIG, ENCODER_WEIGHTS]))


def read_encoder_folder(folder: str | Path, what: str = "encoder") -> dict:
    """A shareable encoder folder (``config.json`` + ``model.safetensors``) as a checkpoint dict.

    Raises:
        CheckpointMismatchError: the folder lacks either file or its config is not a tuning-encoder config.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, weights_path = folder / ENCODER_CONFIG, folder / ENCODER_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise CheckpointMismatchError(
            f"{what} {folder} is not a tuning-encoder folder (it needs {ENCODER_CONFIG} and {ENCODER_WEIGHTS})"
        )
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointMismatchError(f"{what} {config_path} is not valid JSON: {err}") from None
    if not isinstance(config, dict) or config.get("format") != ENCODER_FORMAT:
        raise CheckpointMismatchError(
            f"{what} {folder} is not a tuning-encoder folder ({ENCODER_CONFIG} has no format {ENCODER_FORMAT!r})"
        )
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError) as err:
        raise CheckpointMismatchError(
            f"{what} {weights_path} is not a readable safetensors file: {err}"
        ) from None
    meta = dict(config.get(CHECKPOINT_KEY) or {})
    if isinstance(meta.get("personalizer"), dict):  # JSON has no tuples; PersonalizerConfig holds them
        meta["personalizer"] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in meta["personalizer"].items()
        }
    return {
        "state_dict": state,
        CHECKPOINT_KEY: meta,
        "hyper_parameters": config.get("hyper_parameters") or {},
        "global_step": config.get("global_step"),
    }


def write_encoder_folder(checkpoint: dict, out_dir: str | Path) -> Path:
    """Writes a checkpoint dict's trainable weights and metadata as a shareable folder; returns the folder.

    Only what tuning reads is kept: the weights (no optimizer state, no loops), the tuning-encoder metadata
    (phase, base model and image encoder with their fingerprints, module sizes), the hyper-parameters and step.
    """
    from safetensors.torch import save_file

    from models.io import atomic_write_dir

    state = {k: v.detach().cpu().contiguous() for k, v in checkpoint["state_dict"].items()}
    config = {
        "format": ENCODER_FORMAT,
        "version": 1,
        CHECKPOINT_KEY: checkpoint[CHECKPOINT_KEY],
        "hyper_parameters": _plain(checkpoint.get("hyper_parameters") or {}),
        "global_step": checkpoint.get("global_step"),
    }

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / ENCODER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ENCODER_CONFIG).write_text(json.dumps(config, indent=1) + "\n")

    out = Path(out_dir)
    atomic_write_dir(out, write)  # readers never see half a folder
    return out


def _plain(value: Any) -> Any:
    """``value`` with what JSON cannot hold (a Path, a dtype) as its string."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def export_encoder(checkpoint: str, out_dir: str) -> Path:
    """Writes a pretraining checkpoint (``.ckpt``) as a shareable encoder folder, read back by every command
    that takes an encoder checkpoint (``--model.init_args.encoder_checkpoint``, ``evaluate.py
    --encoder_checkpoint``).

    Args:
        checkpoint: an ``EncoderPretraining`` checkpoint, e.g. ``outputs/pretrain_sd15/checkpoints/last.ckpt``.
        out_dir: the folder to write (``config.json`` and ``model.safetensors``).
    """
    ckpt = read_checkpoint(checkpoint, "checkpoint")
    check_checkpoint(ckpt, None, phase="pretrain", source=f"checkpoint {checkpoint}")
    return write_encoder_folder(ckpt, out_dir)


def load_pretraining_checkpoint(path: str | Path, backbone) -> tuple[dict, dict]:
    """Reads a pretraining checkpoint; returns (tuning-encoder metadata, personalizer state dict).

    ``path`` is a ``.ckpt`` (read weights-only) or a shareable encoder folder or hub id
    (:mod:`lightning_modules.checkpoint`).

    Raises:
        FileNotFoundError: neither a file, a folder nor an available hub id.
        CheckpointMismatchError: not a tuning-encoder pretraining checkpoint, made on another base model or with
            another image encoder, or a pickle that would run code.
    """
    ckpt = read_checkpoint(path, "encoder_checkpoint")
    meta = check_checkpoint(ckpt, backbone, phase="pretrain", source=f"encoder_checkpoint {path}")
    prefix = "personalizer."
    state = {k[len(prefix) :]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith(prefix)}
    return meta, state


def check_checkpoint(checkpoint: dict, backbone, phase: str | None, source: str) -> dict:
    """Validates a checkpoint dict (against the backbone, unless None); returns its tuning-encoder metadata.

    Raises:
        CheckpointMismatchError: not a tuning-encoder checkpoint, another phase, or another base model.
    """
    from models.image_encoder import tower_fingerprint

    meta = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict):
        raise CheckpointMismatchError(
            f"{source} is not a tuning-encoder checkpoint (no '{CHECKPOINT_KEY}' entry)"
        )
    if phase is not None and meta.get("phase") != phase:
        raise CheckpointMismatchError(f"{source} is a {meta.get('phase')!r} checkpoint, expected {phase!r}")
    if backbone is not None and not backbone.matches_fingerprint(
        meta.get("fingerprint"), meta.get("base_model")
    ):
        raise CheckpointMismatchError(
            f"{source} was made on base model {meta.get('base_model')!r} (fingerprint {meta.get('fingerprint')}), "
            f"not on {backbone.name_or_path!r} (fingerprint {backbone.fingerprint()})"
        )
    # Checkpoints from before the image-encoder fingerprint existed carry none: nothing to compare.
    image_fp = meta.get("image_encoder_fingerprint")
    if backbone is not None and image_fp not in (None, tower_fingerprint(backbone.image_encoder)):
        raise CheckpointMismatchError(
            f"{source} was made with image encoder {meta.get('image_encoder')!r} (fingerprint {image_fp}), "
            f"not with the configured one (fingerprint {tower_fingerprint(backbone.image_encoder)}): "
            "set model.init_args.image_encoder_name_or_path to the encoder's"
        )
    return meta


def main(args: list[str] | None = None) -> int:
    """``python -m lightning_modules.checkpoint CKPT OUT_DIR``: :func:`export_encoder`, errors as one line."""
    from jsonargparse import CLI

    from lightning_modules.cli_errors import ShortErrorParser

    try:
        out = CLI(export_encoder, args=args, parser_class=ShortErrorParser)
    except TuningEncoderError as err:
        print(f"python -m lightning_modules.checkpoint: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
