"""Wiring shared by encoder pretraining and concept tuning: backbone, losses, token index, checkpoints, logging.

LightningModules here only orchestrate: networks live in ``models/``, losses in ``losses/``. The frozen backbone
is a sub-module (so Lightning moves it to the device) but never enters checkpoints: ``state_dict`` keeps the
trainable weights alone and ``strict_loading = False`` lets them load back onto a freshly built backbone.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Literal

import torch
from lightning import LightningModule

from lightning_modules.checkpoint import CHECKPOINT_KEY, check_checkpoint
from lightning_modules.multi_concept import step_generator
from lightning_modules.samples import SampleLogging
from losses import (
    CorePenalty,
    DiffusionLoss,
    EmbeddingNormPenalty,
    NearestNeighbourContrastiveLoss,
    add_noise,
    check_finite,
    gather_neighbours,
    nearest_pull,
    world_and_rank,
)
from models.attention import LoraDelta
from models.backbone import DEFAULT_IMAGE_ENCODER
from models.errors import ConfigurationError
from models.image_encoder import tower_fingerprint
from models.loading import load_backbone
from models.personalizer import PersonalizerConfig
from models.token_index import TokenIndex


class PersonalizationModule(SampleLogging, LightningModule):
    """Base of both phases. Subclasses implement ``predict_concepts`` and ``configure_optimizers``.

    Args:
        pretrained_model_name_or_path: Stable Diffusion folder or hub id (diffusers layout).
        image_encoder_name_or_path: CLIP vision model folder or id for the encoder's image branch.
        placeholder: the pseudo-word S* written in prompts.
        personalizer: sizes of the encoder, token embedder and hypernetwork.
        alpha: dual-path blend of the adapted path during training (paper default 0.5).
        alpha_range: ``[low, high]``: draw alpha uniformly from this range for each batch instead of the fixed
            ``alpha`` (a function of the seed and step, so resuming is exact). Cores trained at one alpha only
            serve that alpha; every export samples at alpha 1, so pretraining over ``[0.5, 1]`` teaches the
            hypernetwork cores that help on the adapted path alone too. None: always ``alpha``.
        nn_weight: weight lambda_nn of the nearest-neighbour contrastive loss (0 disables it).
        nn_temperature: InfoNCE temperature.
        nn_k: number of nearest real tokens used as positives.
        nn_queue: rows of earlier batches kept as extra InfoNCE negatives (MoCo-style, no gradient): the contrastive
            term then holds at batch 1 with gradient accumulation, where a batch has no other concept
            (``configs/pretrain/sdxl_24gb.yaml``). 0: in-batch negatives only; a batch of one concept falls back
            to the pull toward the nearest tokens.
        token_index_mode: ``exact`` or ``hnsw`` FAISS index (or ``torch`` brute force).
        token_index_cache: folder caching the built index (None: no cache).
        token_vocabulary: vocabulary filter of the nearest-token search: a text file with one word per line (or a
            list of words); only their tokens are searched, and v* is rescaled to their mean norm. Needed when
            most rows of the table were never trained (the toy world's text encoder knows ~25 words); on real
            SD it can restrict neighbours to, e.g., English nouns. None: every non-special token.
        norm_penalty: weight of the L2 penalty pulling |v*| to the mean token norm (0 disables it).
        core_penalty: weight of the L2 penalty on the LoRA cores (0 disables it).
        seed: base seed; each micro-batch's noise and timesteps are a function of (seed, step, micro-batch,
            rank), so resuming reproduces an uninterrupted run exactly.
        sample_every_n_steps: log sample images to TensorBoard every n steps (0 disables).
        sample_inference_steps: denoising steps of those samples.
        torch_dtype: dtype the frozen backbone (UNet, VAE, text and image encoders) is loaded and kept in:
            ``float32`` (default), ``bfloat16`` or ``float16``. The trainable modules always stay float32;
            combine ``bfloat16`` with ``trainer.precision: bf16-mixed`` and ``float16`` with ``16-mixed`` (bf16
            autocast feeds bf16 activations to float16 norm layers, which fails).
        variant: weight-file variant of the Stable Diffusion folder, e.g. ``fp16`` for the
            ``*.fp16.safetensors`` files many hub models ship (half the download); None = the plain files.
        gradient_checkpointing: recompute the frozen UNet's activations in the backward pass instead of
            storing them (less memory at 512 px, about one more UNet forward per step; same loss and
            gradients). The frozen text encoder is not checkpointed (transformers only checkpoints modules in
            training mode, and it is small next to the UNet).
        vae_latents: the diffusion targets' latents: ``mean`` (the VAE posterior's mean, deterministic) or
            ``sample`` (a new draw from the posterior every step, from the step's own generator, as diffusers'
            training scripts do; docs/research/peft_reference.md measures the difference).
    """

    strict_loading = False
    phase = "base"
    #: Every batch holds one concept (tuning): the regulariser is the pull, without counting (a device read).
    one_concept_per_batch = False

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        image_encoder_name_or_path: str = DEFAULT_IMAGE_ENCODER,
        placeholder: str = "<s*>",
        personalizer: PersonalizerConfig | None = None,
        alpha: float = 0.5,
        alpha_range: tuple[float, float] | None = None,
        nn_weight: float = 0.01,
        nn_temperature: float = 0.07,
        nn_k: int = 1,
        nn_queue: int = 0,
        token_index_mode: str = "exact",
        token_index_cache: str | None = ".cache/token_index",
        token_vocabulary: str | list[str] | None = None,
        norm_penalty: float = 0.0,
        core_penalty: float = 0.0,
        seed: int = 0,
        sample_every_n_steps: int = 0,
        sample_inference_steps: int = 10,
        torch_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        variant: str | None = None,
        gradient_checkpointing: bool = False,
        vae_latents: Literal["mean", "sample"] = "mean",
    ) -> None:
        super().__init__()
        if vae_latents not in ("mean", "sample"):
            raise ValueError(f"vae_latents must be 'mean' or 'sample', got {vae_latents!r}")
        self.vae_latents = vae_latents
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        if alpha_range is not None:
            alpha_range = tuple(float(a) for a in alpha_range)
            if len(alpha_range) != 2 or not 0.0 <= alpha_range[0] <= alpha_range[1] <= 1.0:
                raise ValueError(
                    f"alpha_range must be [low, high] with 0 <= low <= high <= 1, got {alpha_range}"
                )
        # An SDXL folder or hub id gets models.backbone_sdxl.SDXLDiffusionBackbone (by its model_index.json).
        self.backbone = load_backbone(
            pretrained_model_name_or_path,
            image_encoder_name_or_path,
            placeholder=placeholder,
            torch_dtype=getattr(torch, torch_dtype) if torch_dtype else None,
            **({"variant": variant} if variant else {}),
        )
        self.image_encoder_name_or_path = image_encoder_name_or_path
        self.token_vocabulary = token_vocabulary
        if token_vocabulary is not None:
            self.backbone.restrict_vocabulary(token_vocabulary)
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            self.backbone.unet.enable_gradient_checkpointing()
        self.personalizer_config = personalizer or PersonalizerConfig()
        self.alpha = alpha
        self.alpha_range = alpha_range
        self.nn_k = nn_k
        self.token_index_mode = token_index_mode
        self.token_index_cache = token_index_cache
        self.seed = seed
        self.sample_every_n_steps = sample_every_n_steps
        self.sample_inference_steps = sample_inference_steps
        self.diffusion_loss = DiffusionLoss()
        self.nn_loss = NearestNeighbourContrastiveLoss(
            nn_temperature, nn_weight, queue_size=nn_queue, dim=self.backbone.token_dim, k=max(nn_k, 1)
        )
        self.nn_weight = nn_weight
        self.norm_penalty = EmbeddingNormPenalty(self.backbone.mean_token_norm(), norm_penalty)
        self.core_penalty = CorePenalty(core_penalty)
        self.token_index: TokenIndex | None = None
        self._empty_context: torch.Tensor | None = None

    # ----- checkpoints hold trainable weights and the config only -----
    def state_dict(self, *args, **kwargs):
        full = super().state_dict(*args, **kwargs)
        return type(full)((k, v) for k, v in full.items() if self.checkpointed_key(k))

    @staticmethod
    def checkpointed_key(key: str) -> bool:
        """Whether a state-dict key enters checkpoints: everything but the frozen backbone."""
        return not key.startswith("backbone.")

    def checkpoint_metadata(self) -> dict:
        return {
            "phase": self.phase,
            "base_model": self.backbone.name_or_path,
            "fingerprint": self.backbone.fingerprint(),
            "image_encoder": getattr(self, "image_encoder_name_or_path", None),
            "image_encoder_fingerprint": tower_fingerprint(self.backbone.image_encoder),
            "placeholder": self.backbone.placeholder,
            "personalizer": asdict(self.personalizer_config),
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = self.checkpoint_metadata()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_checkpoint(checkpoint, self.backbone, phase=self.phase, source="--ckpt_path")

    # ----- set-up -----
    def setup(self, stage: str) -> None:
        if self.token_index is None:
            self.token_index = self.backbone.build_token_index(self.token_index_mode, self.token_index_cache)

    def empty_context(self) -> torch.Tensor:
        """(1, L, D) text states of the empty prompt (input of the UNet feature branch), computed once."""
        if self._empty_context is None or self._empty_context.device != self.device:
            with torch.no_grad():
                self._empty_context = self.backbone.empty_context()
        return self._empty_context

    def step_generator(self) -> torch.Generator:
        """CPU generator seeded by (seed, draw, rank): a micro-batch's randomness never depends on history.

        ``draw = global_step * A + i`` for the i-th micro-batch of an optimizer step accumulating A of them (the
        step itself without accumulation): global_step alone stays put inside the accumulation, so every micro-batch
        would get the same noise and timesteps. Both terms are restored by a resume, which stays exact.
        """
        trainer, draw = self._trainer, self.global_step
        if trainer is not None and (a := trainer.accumulate_grad_batches) > 1:
            draw = draw * a + trainer.fit_loop.epoch_loop.batch_idx % a
        return step_generator(self.seed, draw, self.global_rank)

    def target_latents(self, pixel_values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Float latents of the diffusion targets: the VAE posterior's mean, or with ``vae_latents: sample`` a
        draw from it on ``generator`` (the step's own, so a resume stays exact), as diffusers' scripts train."""
        draw = generator if self.vae_latents == "sample" else None
        return self.backbone.encode_images(pixel_values, generator=draw).float()

    def step_alpha(self) -> float:
        """The dual-path blend of this training step: ``alpha``, or a draw from ``alpha_range``."""
        if self.alpha_range is None or not self.training:
            return self.alpha
        low, high = self.alpha_range
        g = torch.Generator().manual_seed((self.seed * 7_919 + self.global_step) % (2**63))
        return float(low + (high - low) * torch.rand((), generator=g))

    # ----- the shared step -----
    def predict_concepts(self, batch: dict, noisy: torch.Tensor, timesteps: torch.Tensor):
        """Returns (v* (B, D), cores (B, T, r, r)) for the batch. Implemented by each phase."""
        raise NotImplementedError

    def lora_deltas(self, cores: torch.Tensor, slots: torch.Tensor | None = None) -> dict[str, LoraDelta]:
        """The LoRA deltas of (B, T, r, r) cores; ``slots`` (B,): each row's concept, when a batch holds several."""
        raise NotImplementedError

    def hard_prompt_ids(self, batch: dict, neighbour_ids: torch.Tensor) -> torch.Tensor:
        """(B,) the word the vanilla path reads in place of S*: each row's nearest real token (the paper's)."""
        return neighbour_ids[:, 0]

    def model_step(self, batch: dict) -> tuple[dict[str, torch.Tensor], dict]:
        """Diffusion loss under dual-path attention plus the regularisers; returns (losses, extras)."""
        bb = self.backbone
        clip = batch.get("clip_pixel_values")
        if clip is not None and clip.shape[-1] != bb.clip_image_size:
            # A convolutional image tower would silently read an image of the wrong size.
            raise ConfigurationError(
                f"the data's clip_pixel_values are {clip.shape[-1]} px but the image encoder reads "
                f"{bb.clip_image_size} px: set data.init_args.clip_size: {bb.clip_image_size}"
            )
        generator = self.step_generator()
        with torch.no_grad():
            latents = self.target_latents(batch["pixel_values"], generator)
        noised = encoder_view = add_noise(bb.scheduler, latents, generator=generator)
        if "encoder_pixel_values" in batch:  # own view, noise and timestep: it cannot read the target's noise
            views = bb.encode_images(batch["encoder_pixel_values"]).detach().float()
            encoder_view = add_noise(bb.scheduler, views, generator=generator)
        v_star, cores = self.predict_concepts(batch, encoder_view.noisy, encoder_view.timesteps)
        alpha = self.step_alpha()
        neighbours = neighbour_ids = hard_ids = None
        # The lookup feeds the hard prompt (alpha < 1) and the regulariser; single-path runs without the
        # regulariser (the baselines) skip it and its device-to-host sync.
        if alpha < 1.0 or self.nn_weight > 0:
            k = max(self.nn_k, 1)
            table = bb.token_rows()
            neighbours, neighbour_ids = gather_neighbours(self.token_index, table, v_star, k)
            hard_ids = self.hard_prompt_ids(batch, neighbour_ids)
            # The regulariser's cosine is the index's similarity (SDXL: mean of the two encoders' cosines).
            nn_v_star, neighbours = bb.similarity_space(v_star), bb.similarity_space(neighbours)
        ids = bb.tokenize(list(batch["prompt"]), require_placeholder=True)
        pred = bb.personalized_unet(
            noised.noisy,
            noised.timesteps,
            ids,
            v_star,
            self.lora_deltas(cores),
            alpha,
            hard_ids,
        )
        losses = dict(self.diffusion_loss(pred.float(), noised.target.float()))
        total = losses["loss/diffusion"]
        if self.nn_weight > 0:
            concept_ids = batch_concept_ids(batch, v_star.device)
            if not self.one_concept_per_batch and self.nn_loss.has_negatives(concept_ids):
                terms = self.nn_loss(nn_v_star, neighbours, neighbour_ids, concept_ids)
                losses["loss/nn_contrastive"] = terms["loss/nn_contrastive"]
                total = total + terms["loss/nn_contrastive_weighted"]
            else:
                # One concept (inference-time tuning): no negatives exist, so only the pull toward the
                # nearest tokens remains (1 - cosine), with the same weight.
                pull = nearest_pull(nn_v_star, neighbours)
                losses["loss/nn_pull"] = pull
                total = total + self.nn_weight * pull
            if not self.one_concept_per_batch:  # the next batches' negatives (no-op without a queue)
                self.nn_loss.remember(nn_v_star, neighbours, neighbour_ids, concept_ids)
        if self.norm_penalty.weight > 0:
            term = self.norm_penalty(v_star)
            losses.update(term)
            total = total + term["loss/norm_penalty"]
        if self.core_penalty.weight > 0:
            term = self.core_penalty([cores[:, i] for i in range(cores.shape[1])])
            losses.update(term)
            total = total + term["loss/core_penalty"]
        losses["loss"] = total
        check_finite(losses)
        extras = {"v_star": v_star, "cores": cores, "neighbour_ids": neighbour_ids, "alpha": alpha}
        return losses, extras

    def log_step(self, losses: dict[str, torch.Tensor], extras: dict, batch_size: int) -> None:
        logs = {f"train/{k}": v.detach() for k, v in losses.items()}
        logs["train/v_star_norm"] = extras["v_star"].detach().norm(dim=-1).mean()
        logs["train/core_norm"] = extras["cores"].detach().flatten(1).norm(dim=-1).mean()
        if self.alpha_range is not None:
            logs["train/alpha"] = torch.tensor(extras["alpha"])
        self.log_dict(logs, batch_size=batch_size)
        self.log("loss", losses["loss"].detach(), prog_bar=True, logger=False, batch_size=batch_size)


def batch_concept_ids(batch: dict, device: torch.device) -> torch.Tensor:
    """(B,) the batch's ``concept_id`` (every datamodule sets it); without one, each row is its own concept.

    Rows without ids are numbered by their global row (``rank * B + i``), so they stay distinct across ranks.
    """
    ids = batch.get("concept_id")
    if ids is None:
        _, rank = world_and_rank()
        n = len(batch["prompt"])
        return torch.arange(n, device=device) + rank * n
    return torch.as_tensor(ids, dtype=torch.long).to(device)
