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


_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")


def _weight_variant(filename: str) -> str | None | bool:
    """The variant of a weight file name: ``None`` for plain weights, e.g. ``"fp16"``, or False if not weights.

    Plain: ``model.safetensors``, ``diffusion_pytorch_model.bin``, ``model-00001-of-00002.safetensors``,
    ``model.safetensors.index.json``. Variant: ``model.fp16.safetensors``,
    ``diffusion_pytorch_model.safetensors.index.fp16.json``, ``model.fp16-00001-of-00002.safetensors``.
    """
    for suffix in _INDEX_SUFFIXES:
        if filename.endswith(suffix):
            stem = filename[: -len(suffix)]
            return stem.split(".", 1)[1] if "." in stem else None
    if ".index." in filename and filename.endswith(".json"):  # diffusers' ``x.safetensors.index.fp16.json``
        return filename[: -len(".json")].rsplit(".", 1)[1]
    for suffix in _WEIGHT_SUFFIXES:
        if filename.endswith(suffix):
            stem = filename[: -len(suffix)]
            if "." not in stem:
                return None
            return stem.split(".", 1)[1].split("-", 1)[0]
    return False


def missing_variant_folders(folder: str | Path, variants: tuple[str | None, ...]) -> list[str]:
    """Sub-folders of a model folder that hold weights, but none of any of ``variants``.

    A folder (the root, or a pipeline component such as ``unet/``) that holds weight files must hold at least
    one of the requested variant (``None`` = the plain files) for ``from_pretrained`` to load it.

    Returns:
        Relative folder names (``"."`` for the root), empty when every weight folder has the variant.
    """
    root = Path(folder)
    missing = []
    for sub in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        found = {_weight_variant(f.name) for f in sub.iterdir() if f.is_file()} - {False}
        if found and not found & set(variants):
            missing.append("." if sub == root else sub.name)
    return missing


def resolve_model_path(
    name_or_path: str | Path,
    variant: str | None = None,
    revision: str | None = None,
    accept_plain: bool = False,
) -> str:
    """Returns a local folder for ``name_or_path``, or the hub id when it can really be downloaded.

    A local folder is returned as is. A hub id is returned as its cached snapshot folder when cached with the
    weights ``from_pretrained`` will ask for (``variant``, e.g. ``fp16``; None = the plain files): a snapshot
    that holds only ``*.fp16.safetensors`` does not count as cached for a float32 load, and the reverse. If it
    is not cached and the hub is offline (``HF_HUB_OFFLINE=1``) or unreachable, this fails at once with a
    message that says to pass a local folder, instead of the minutes of retries ``from_pretrained`` would spend.

    The cache folder is read from ``HF_HUB_CACHE`` at call time (default: huggingface_hub's).

    Args:
        name_or_path: local folder or hub id.
        variant: weight-file variant the caller will load.
        revision: hub revision (default: ``main``).
        accept_plain: also accept the plain files when the variant is absent (the caller falls back to them).

    Raises:
        ModelNotAvailableError: the id is not cached (with that variant) and cannot be downloaded.
    """
    name = str(name_or_path)
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotAvailableError(f"model folder {name!r} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    variants = (variant, None) if accept_plain else (variant,)
    what = f"with {variant!r} weights" if variant else "with plain (non-variant) weights"
    cached_without_variant: list[str] = []
    try:
        folder = snapshot_download(
            name, revision=revision, local_files_only=True, cache_dir=os.environ.get("HF_HUB_CACHE") or None
        )
        cached_without_variant = missing_variant_folders(folder, variants)
        if not cached_without_variant:
            return folder
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}
    if offline or not _hub_reachable():
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub is unreachable"
        cached = (
            f"is cached, but not {what} (missing in {', '.join(cached_without_variant)})"
            if cached_without_variant
            else "is not in the local cache"
        )
        raise ModelNotAvailableError(
            f"model {name!r} {cached} and {why}: pass a local folder "
            f"(a diffusers/transformers model directory) instead of a hub id"
        )
    return name


def load_sd_components(
    pretrained_model_name_or_path: str,
    image_encoder_name_or_path: str,
    revision: str | None = None,
    torch_dtype=None,
    variant: str | None = None,
) -> dict:
    """The components of :class:`models.backbone.DiffusionBackbone`, each loaded with ``from_pretrained``.

    See :meth:`DiffusionBackbone.from_pretrained` for the arguments. Returns ``{"vae", "unet", "text_encoder",
    "tokenizer", "scheduler", "image_encoder", "image_processor"}``.
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from models.clip_tokenizer import load_clip_tokenizer
    from models.image_encoder import load_image_encoder

    sd = resolve_model_path(pretrained_model_name_or_path, variant=variant, revision=revision)
    kw: dict = {"revision": revision} if revision else {}
    # Always explicit: transformers 5 would otherwise load in the dtype the files were saved in (fp16
    # weights, such as the committed toy world's, would come back fp16 and meet fp32 trainable modules).
    # `dtype`, not `torch_dtype`: both libraries take it, and transformers 5 warns about the old name.
    torch_dtype = torch_dtype or torch.float32
    kw["dtype"] = torch_dtype
    if variant is not None:
        kw["variant"] = variant
    enc = resolve_model_path(image_encoder_name_or_path, variant=variant, accept_plain=True)
    enc_sub, proc_sub = "", ""
    if (Path(enc) / "image_encoder").is_dir():
        enc_sub, proc_sub = "image_encoder", "feature_extractor"
    dkw: dict = {"dtype": torch_dtype}
    if variant is not None and not missing_variant_folders(Path(enc) / enc_sub, (variant,)):
        dkw["variant"] = variant
    # CLIP's vision tower (E4T) or any transformers vision model (models.image_encoder)
    image_encoder, image_processor = load_image_encoder(enc, enc_sub, proc_sub, **dkw)
    return {
        "vae": AutoencoderKL.from_pretrained(sd, subfolder="vae", **kw),
        "unet": UNet2DConditionModel.from_pretrained(sd, subfolder="unet", **kw),
        "text_encoder": CLIPTextModel.from_pretrained(sd, subfolder="text_encoder", **kw),
        "tokenizer": load_clip_tokenizer(sd, subfolder="tokenizer"),
        "scheduler": DDPMScheduler.from_pretrained(sd, subfolder="scheduler"),
        "image_encoder": image_encoder,
        "image_processor": image_processor,
    }
