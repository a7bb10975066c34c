"""Kohya-format concept files: the LoRA and embedding layouts Automatic1111, Forge, ComfyUI and diffusers all read.

Key layout. kohya's sd-scripts names each SD 1.x/2.x UNet LoRA module ``lora_unet_<diffusers module path, "."
replaced by "_">`` (it trains SD 1.x on a UNet with diffusers' module names), with three tensors per module:
``.lora_down.weight`` (r, in), ``.lora_up.weight`` (out, r) and a scalar ``.alpha``; a consumer adds
``alpha / r · up @ down`` to the weight (``1 · up @ down`` when the file has no alpha). That is the layout this
module writes, computed from the module paths alone (no SD 1.5 block counts), and it is read by:

- diffusers: ``loaders/lora_conversion_utils.py`` ``_convert_unet_lora_key`` (``key.replace("lora_unet_", "")
  .replace("_", ".")`` then renames ``down.blocks`` -> ``down_blocks``, ``transformer.blocks`` ->
  ``transformer_blocks``, ``to.out.0.lora`` -> ``to_out_lora``, ...) and ``_get_alpha_name`` (``.alpha`` ->
  ``network_alphas``, hence peft's ``lora_alpha``); ``_maybe_map_sgm_blocks_to_diffusers`` only rewrites keys
  containing ``input_blocks`` / ``middle_block`` / ``output_blocks``, which this layout never has. Tested by
  loading the file with ``pipe.load_lora_weights`` (tests/test_kohya_export.py).
- ComfyUI: ``comfy/lora.py`` ``model_lora_keys_unet`` maps ``"lora_unet_{}".format(k[:-len(".weight")]
  .replace(".", "_"))`` for every diffusers key ``k`` of ``utils.unet_to_diffusers(unet_config)`` (a map built
  from the model's ``num_res_blocks`` / ``channel_mult`` / ``transformer_depth``), and ``load_lora`` reads
  ``{x}.lora_up.weight`` / ``{x}.lora_down.weight`` / ``{x}.alpha``; ``weight_adapter/lora.py`` applies
  ``alpha = v[2] / mat2.shape[0]`` (else ``1.0``), ``weight += strength * alpha * up @ down``.
- Automatic1111 / Forge: ``extensions-builtin/Lora/networks.py`` ``convert_diffusers_name_to_compvis`` maps
  ``lora_unet_down_blocks_(\\d+)_(attentions|resnets)_(\\d+)_(.+)`` to ``diffusion_model_input_blocks_{1 + b*3 +
  i}_1_...`` (and the mid / up blocks likewise) for SD 1.x/2.x, and ``network.py``
  ``NetworkModule.calc_scale`` scales by ``alpha / dim`` (``1.0`` without alpha). The LDM-named variant
  (``lora_unet_input_blocks_1_1_...``) is read by ComfyUI and diffusers but not by that converter, so it is not
  used.

Embeddings. ``<name>.safetensors`` holds ``{"emb_params": (1, D)}`` (kohya / diffusers-trainer layout) and
``<name>.pt`` the Automatic1111 textual-inversion layout ``{"string_to_param": {"*": (1, D)}, "name": ...}``;
A1111 (``textual_inversion.py`` ``create_embedding_from_data``: ``string_to_param``, else a single-tensor dict),
ComfyUI (``sd1_clip.py`` ``load_embed``: the same two cases, ``.safetensors`` first) and diffusers
(``load_textual_inversion``: a one-entry dict or ``string_to_param``) read both. Those tools name an embedding
after its file, so the prompt word is ``<name>``, not the training placeholder.

SDXL. The same key layout covers SDXL's UNet unchanged (names come from module paths alone); the files carry
SDXL's ``ss_base_model_version`` and SAI architecture, and the embedding holds ``clip_l`` / ``clip_g`` (one part
per text encoder, see :mod:`models.export_sdxl`) instead of ``emb_params``, with no ``.pt``.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.io import atomic_write

KOHYA_UNET_PREFIX = "lora_unet_"
PROJECT = "tuning-encoder"

# Text-conditioning width of each Stable Diffusion family: SD 1.x conditions on CLIP ViT-L/14, SD 2.x on
# OpenCLIP ViT-H/14. Only used to label the file (kohya's ss_base_model_version, SAI's modelspec.architecture).
_FAMILY_BY_WIDTH = {768: "v1", 1024: "v2"}
KOHYA_SDXL_VERSION = "sdxl_base_v1-0"  # kohya sd-scripts' SDXL model-version string
SAI_SDXL_ARCH = "stable-diffusion-xl-v1-base"


def kohya_unet_name(module_path: str) -> str:
    """``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0`` ->
    ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0``."""
    return KOHYA_UNET_PREFIX + module_path.replace(".", "_")


def kohya_state_dict(
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]],
    alpha: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Kohya LoRA tensors whose ``alpha / r · up @ down`` is exactly the project's ``up @ down`` per module.

    Args:
        lora: ``"<UNet module path>" -> (down (r, in), up (out, r))``, the applied delta being ``up @ down``
            (the artefact's factors: the tuned core and any scale are already folded into ``down``).
        alpha: the ``.alpha`` written for every module; None = the rank, i.e. scale 1 and the factors as they
            are. Otherwise ``up`` is multiplied by ``r / alpha`` so that consumers that scale by ``alpha / r``
            still add the same delta.
        dtype: tensor dtype in the file (float32 keeps the product exact; float16 halves the size).

    Returns:
        ``{<name>.lora_down.weight, <name>.lora_up.weight, <name>.alpha}`` for every module.
    """
    out = {}
    for path, (down, up) in lora.items():
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise ValueError(
                f"LoRA {path}: down {tuple(down.shape)} and up {tuple(up.shape)} disagree on rank"
            )
        a = float(rank if alpha is None else alpha)
        if a <= 0:
            raise ValueError(f"kohya alpha must be > 0, got {a}")
        name = kohya_unet_name(path)
        out[f"{name}.lora_down.weight"] = down.detach().float().cpu().to(dtype).contiguous()
        out[f"{name}.lora_up.weight"] = (up.detach().float().cpu() * (rank / a)).to(dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(a, dtype=dtype)
    return out


def project_version() -> str:
    """The installed package version, else the one in this checkout's ``pyproject.toml``."""
    try:
        return importlib.metadata.version(PROJECT)
    except importlib.metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        found = (
            re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M)
            if pyproject.is_file()
            else None
        )
        return found.group(1) if found else "unknown"


def model_family(token_dim: int, prediction_type: str) -> tuple[str, str]:
    """(kohya ``ss_base_model_version``, SAI ``modelspec.architecture`` base) for a text width and prediction type.

    kohya's ``get_model_version_str_for_sd1_sd2``: ``sd_v1`` / ``sd_v2``, plus ``_v`` for v-prediction;
    SAI model spec: ``stable-diffusion-v1``, ``stable-diffusion-v2-512``, ``stable-diffusion-v2-768-v``.
    """
    family = _FAMILY_BY_WIDTH.get(int(token_dim))
    v_pred = prediction_type == "v_prediction"
    if family is None:
        return "unknown", "unknown"
    kohya = f"sd_{family}" + ("_v" if v_pred else "")
    if family == "v1":
        return kohya, "stable-diffusion-v1"
    return kohya, "stable-diffusion-v2-768-v" if v_pred else "stable-diffusion-v2-512"


def lora_metadata(
    artifact,
    name: str,
    rank: int,
    alpha: float,
    prediction_type: str,
    resolution: int | None,
) -> dict[str, str]:
    """Safetensors header of the kohya LoRA: kohya's ``ss_*`` keys, the SAI model spec and the project's own.

    Every value is a string (safetensors metadata is ``str -> str``).
    """
    kohya_version, arch = model_family(artifact.v_star.numel(), prediction_type)
    date = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": repr(float(alpha)),
        "ss_base_model_version": kohya_version,
        "ss_v2": str(kohya_version.startswith("sd_v2")),
        "ss_sd_model_name": artifact.base_model,
        "ss_output_name": name,
        "ss_steps": str(int(artifact.steps)),
        "ss_max_train_steps": str(int(artifact.steps)),
        "ss_training_comment": (
            f"{PROJECT} concept ({artifact.extra.get('method', 'date')}); embedding in {name}.safetensors / "
            f"{name}.pt; single-path export of a dual-path concept (alpha {artifact.alpha})"
        ),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": name,
        "modelspec.date": date,
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        "modelspec.trigger_phrase": name,
        "modelspec.description": (
            f"{PROJECT} concept {name!r}; nearest word {artifact.nearest_token!r}; base model {artifact.base_model}"
        ),
        "tuning_encoder.version": project_version(),
        "tuning_encoder.placeholder": artifact.placeholder,
        "tuning_encoder.nearest_token": artifact.nearest_token,
        "tuning_encoder.nearest_token_id": str(int(artifact.nearest_token_id)),
        "tuning_encoder.dual_path_alpha": repr(float(artifact.alpha)),
        "tuning_encoder.fingerprint": artifact.fingerprint,
        "tuning_encoder.method": artifact.extra.get("method", ""),
    }
    if resolution:
        meta["modelspec.resolution"] = f"{int(resolution)}x{int(resolution)}"
    return meta


def write_kohya(
    artifact,
    out_dir: str | Path,
    name: str,
    alpha: float | None = None,
    prediction_type: str = "epsilon",
    resolution: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Path]:
    """Writes ``<name>_lora.safetensors`` and the embedding files into ``out_dir``.

    SD 1.x / 2.x: ``<name>.safetensors`` (``emb_params``) and ``<name>.pt`` (A1111's ``string_to_param``). SDXL
    (an artefact with embedding parts): ``<name>.safetensors`` with ``clip_l`` / ``clip_g`` and no ``.pt`` (web UIs
    read SDXL embeddings from safetensors with those keys), and SDXL's kohya / SAI labels. See
    :meth:`models.artifact.ConceptArtifact.export_kohya`.

    Returns:
        ``{"lora", "embedding"}`` (+ ``"embedding_pt"`` for SD 1.x / 2.x).
    """
    out = Path(out_dir)
    if not artifact.lora:
        raise ValueError("the concept has no LoRA factors to export")
    sdxl = bool(artifact.embedding_parts())
    rank = next(iter(artifact.lora.values()))[0].shape[0]
    tensors = kohya_state_dict(artifact.lora, alpha, dtype)
    meta = lora_metadata(
        artifact, name, rank, float(rank if alpha is None else alpha), prediction_type, resolution
    )
    if sdxl:
        meta["ss_base_model_version"] = KOHYA_SDXL_VERSION
        meta["ss_v2"] = "False"
        meta["modelspec.architecture"] = f"{SAI_SDXL_ARCH}/lora"
        meta["ss_training_comment"] = meta["ss_training_comment"].replace(f" / {name}.pt", "")
    lora_path = atomic_write(
        out / f"{name}_lora.safetensors", lambda tmp: save_file(tensors, tmp, metadata=meta)
    )
    emb_meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": meta["modelspec.architecture"].replace("/lora", "/textual-inversion"),
        "modelspec.title": name,
        "tuning_encoder.placeholder": artifact.placeholder,
        "tuning_encoder.nearest_token": artifact.nearest_token,
        "tuning_encoder.version": meta["tuning_encoder.version"],
    }
    emb = artifact.embedding_tensors("emb_params")
    emb_path = atomic_write(out / f"{name}.safetensors", lambda tmp: save_file(emb, tmp, metadata=emb_meta))
    if sdxl:
        return {"lora": lora_path, "embedding": emb_path}
    # Automatic1111's own Embedding.save layout; plain tensors / str / int only, so that torch.load with
    # weights_only=True (ComfyUI, A1111's safe unpickler) accepts it. 265 is the token id "*" had in SD's
    # original textual-inversion code: kept because A1111 writes it, never read back.
    pt = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": emb["emb_params"].clone()},
        "name": name,
        "step": int(artifact.steps),
        "sd_checkpoint": artifact.fingerprint,
        "sd_checkpoint_name": artifact.base_model,
    }
    pt_path = atomic_write(out / f"{name}.pt", lambda tmp: torch.save(pt, tmp))
    return {"lora": lora_path, "embedding": emb_path, "embedding_pt": pt_path}
