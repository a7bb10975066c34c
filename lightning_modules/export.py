"""A concept in and out: the encoder's initial prediction from its image, and its artefact and files.

Plain functions of the networks, used by ``ConceptTuning`` and usable without a Trainer (benchmarks, services).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from datamodules.concept import TuningConcept
from datamodules.transforms import CLIP_MEAN, CLIP_STD
from losses import add_noise
from models.artifact import ConceptArtifact, write_concept_set
from models.unet_lora import save_diffusers_lora


def concept_views(backbone, concept: TuningConcept, device: torch.device | str = "cpu"):
    """(1, 3, R, R) VAE and (1, 3, C, C) image-encoder views of a concept's image, at the backbone's sizes."""
    proc = backbone.image_processor
    mean = tuple(getattr(proc, "image_mean", CLIP_MEAN))
    std = tuple(getattr(proc, "image_std", CLIP_STD))
    pixels, clip_pixels = concept.views(backbone.resolution, backbone.clip_image_size, mean, std)
    return pixels.to(device), clip_pixels.to(device)


@torch.no_grad()
def encoder_prediction(
    personalizer,
    backbone,
    pixels: torch.Tensor,
    clip_pixels: torch.Tensor,
    empty_context: torch.Tensor,
    seed: int,
    draws: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's (1, D) v* and (1, T, r, r) cores for one image, averaged over ``draws`` noise draws.

    Args:
        personalizer: the ``Personalizer`` (encoder, token embedder, hypernetwork).
        backbone: the frozen ``DiffusionBackbone``.
        pixels: (1, 3, R, R) VAE input in [-1, 1].
        clip_pixels: (1, 3, C, C) image-encoder input.
        empty_context: (1, L, D) text states of the empty prompt.
        seed: seed of the draws' noise and timesteps.
        draws: noise draws averaged.
    """
    latents = backbone.encode_images(pixels).float()
    g = torch.Generator().manual_seed(seed)
    vs, cs = [], []
    for _ in range(max(draws, 1)):
        noised = add_noise(backbone.scheduler, latents, generator=g)
        pred = personalizer.predict(backbone, clip_pixels, noised.noisy, noised.timesteps, empty_context)
        vs.append(pred.v_star)
        cs.append(pred.cores)
    v = torch.stack(vs).mean(0)
    # Each draw has the token norm, but their mean is shorter (the draws point in different directions):
    # put the average back on the scale of real words, as every prediction is (SDXL: per encoder's part).
    v = personalizer.token_embedder.renormalize(v)
    return v, torch.stack(cs).mean(0)


def concept_artifact(
    backbone,
    token_index,
    v_star: torch.Tensor,
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]],
    alpha: float,
    steps: int,
    extra: dict[str, str],
) -> ConceptArtifact:
    """The artefact of a (1, D) v* and its static LoRA factors, with the backbone's identity and v*'s nearest word."""
    result = token_index.search(v_star, 1)
    extra = dict(extra)
    if parts := backbone.embedding_parts():  # SDXL: v* = [v_l, v_g]
        extra["embedding_parts"] = ",".join(f"{k}:{v}" for k, v in parts.items())
    return ConceptArtifact(
        v_star=v_star[0].float().cpu(),
        lora=lora,
        placeholder=backbone.placeholder,
        nearest_token=result.tokens[0][0],
        nearest_token_id=int(result.ids[0, 0]),
        alpha=alpha,
        base_model=backbone.name_or_path,
        fingerprint=backbone.fingerprint(),
        steps=steps,
        extra=extra,
    )


def save_diffusers_unet(artifact: ConceptArtifact, unet: nn.Module, out_dir: str | Path) -> Path:
    """The diffusers export of a tuned UNet: ``<out>/unet/`` (``UNet2DConditionModel.from_pretrained``) and v* for
    ``load_textual_inversion``; with DATE's LoRA too (``tune: [embedding, cores, unet]``), its LoRA file as well."""
    out = Path(out_dir)
    if artifact.lora:  # DATE tuning the UNet too: its LoRA (and v*) as every DATE export, next to the UNet
        artifact.export_diffusers(out)
    else:
        emb = {artifact.placeholder: artifact.embedding_tensors()["emb_params"].reshape(-1)}
        save_file(emb, str(out / "learned_embeds.safetensors"), metadata={"base_model": artifact.base_model})
    unet.save_pretrained(out / "unet", safe_serialization=True)
    return out


def write_concept(
    artifact: ConceptArtifact,
    export_dir: str | Path,
    name: str,
    diffusers: bool = True,
    kohya: bool = False,
    unet_with_adapter: nn.Module | None = None,
    tuned_unet: nn.Module | None = None,
    prediction_type: str = "epsilon",
    resolution: int = 512,
) -> tuple[Path, str]:
    """Writes ``<export_dir>/<name>.safetensors`` (atomically) and the requested extra formats.

    Args:
        artifact: the tuned concept.
        export_dir: target folder (created).
        name: file stem; also the prompt word of the kohya files.
        diffusers: also write ``<name>_diffusers/`` (LoRA + textual-inversion pair plain diffusers loads).
        kohya: also write ``<name>_kohya/`` (A1111 / ComfyUI LoRA and embeddings).
        unet_with_adapter: the UNet holding a static peft LoRA (the one-shot LoRA baseline): its diffusers
            export is the adapter's own state dict instead of the artefact's single-path approximation.
        tuned_unet: the fully fine-tuned UNet (DreamBooth): its diffusers export is ``unet/`` as
            ``save_pretrained`` writes it (``UNet2DConditionModel.from_pretrained(<dir>/unet)`` reads it) and v*
            as ``learned_embeds.safetensors``.
        prediction_type: the scheduler's, recorded in the kohya metadata.
        resolution: the backbone's pixel resolution, recorded in the kohya metadata.

    Returns:
        ``(artefact path, one-line summary)``.
    """
    # One set: every file is staged and moved into place only when all succeeded (models.artifact).
    if diffusers and unet_with_adapter is not None:
        # The script's own output: the peft state dict via save_lora_weights; "sks" is a real word, so
        # there is no embedding to load.
        diffusers = lambda out: save_diffusers_lora(unet_with_adapter, out)  # noqa: E731
    elif diffusers and tuned_unet is not None:
        diffusers = lambda out: save_diffusers_unet(artifact, tuned_unet, out)  # noqa: E731
    files = write_concept_set(
        artifact,
        export_dir,
        name,
        diffusers=diffusers,
        kohya=kohya,
        prediction_type=prediction_type,
        resolution=resolution,
    )
    path = files["artifact"]
    msg = f"concept {name!r}: {artifact.steps} steps, nearest token {artifact.nearest_token!r}"
    if artifact.hard_token is not None:
        msg += f", hard prompt word {artifact.hard_token!r}"
    msg += f" -> {path}"
    if "diffusers" in files:
        msg += f" (+ diffusers files in {files['diffusers']})"
    if "kohya" in files:
        msg += f" (+ A1111 / ComfyUI LoRA and embeddings in {files['kohya']})"
    return path, msg
