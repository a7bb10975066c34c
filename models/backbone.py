"""The frozen Stable Diffusion backbone: VAE, UNet, CLIP text encoder, tokenizer, scheduler, CLIP image encoder.

Everything loads with ``from_pretrained`` from a diffusers Stable Diffusion folder or hub id (SD 1.x and 2.x,
epsilon and v-prediction), real weights and the offline tiny backbone (``models.tiny``) alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPVisionModelWithProjection

from models import vae_latents
from models.attention import PERSONALIZATION_KWARG, LoraDelta, Personalization, install_dual_path
from models.backbone_words import BackboneWords
from models.fingerprint import backbone_fingerprint, matches_fingerprint
from models.hub import load_sd_components
from models.image_encoder import tower_dtype
from models.module_offsets import active_offsets, install_module_offsets
from models.placeholder import (
    DEFAULT_PLACEHOLDER,
    add_placeholder_token,
    check_prompts,
    encode_with_placeholder,
    replace_placeholder_ids,
)
from models.unet_features import pooled_unet_features, unet_feature_dim

DEFAULT_IMAGE_ENCODER = "openai/clip-vit-large-patch14"


@dataclass
class TextConditioning:
    """What the UNet reads from a batch of prompts.

    Attributes:
        context: (B, L, D) ``encoder_hidden_states`` of cross-attention.
        pooled: (B, P) pooled text embedding (SDXL's ``text_embeds``); None for SD 1.x / 2.x.
    """

    context: torch.Tensor
    pooled: torch.Tensor | None = None

    def cat(self, other: TextConditioning) -> TextConditioning:
        """The two batches one after the other (classifier-free guidance: unconditional first)."""
        pooled = None if self.pooled is None else torch.cat([self.pooled, other.pooled])
        return TextConditioning(torch.cat([self.context, other.context]), pooled)


class DiffusionBackbone(BackboneWords, nn.Module):
    """Frozen components of a Stable Diffusion model plus a CLIP image encoder for the concept encoder.

    All parameters are frozen (``requires_grad=False``) and the modules are kept in eval mode; the placeholder
    token is added to the tokenizer only (the text encoder's table is never changed).

    Args:
        vae: the autoencoder.
        unet: the denoiser.
        text_encoder: CLIP text encoder.
        tokenizer: CLIP tokenizer (49,408 entries before the placeholder).
        scheduler: training noise scheduler (``DDPMScheduler``); its ``prediction_type`` sets the loss target.
        image_encoder: CLIP vision tower (E4T's image branch).
        image_processor: the image encoder's preprocessing (size, mean, std).
        name_or_path: where the Stable Diffusion weights came from, recorded in checkpoints and exports.
        placeholder: the pseudo-word S*.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        text_encoder: CLIPTextModel,
        tokenizer,
        scheduler: DDPMScheduler,
        image_encoder: CLIPVisionModelWithProjection,
        image_processor: CLIPImageProcessor,
        name_or_path: str = "",
        placeholder: str = DEFAULT_PLACEHOLDER,
    ) -> None:
        super().__init__()
        self.vae = vae
        self.unet = unet
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.image_processor = image_processor
        self.name_or_path = name_or_path
        self.placeholder = placeholder
        self.placeholder_id = add_placeholder_token(tokenizer, placeholder)
        # Rows of the token table that count as real words (None: all but the special tokens); set by
        # `restrict_vocabulary` when only some rows were trained (the toy world) or should be searched.
        self.vocabulary_ids: list[int] | None = None
        self.requires_grad_(False)
        self.eval()
        # Plain attention until a call passes `personalization` (see models.attention); ResNet and feed-forward
        # offsets only inside `denoise` calls that carry them (models.module_offsets).
        install_dual_path(unet)
        install_module_offsets(unet)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str,
        image_encoder_name_or_path: str = DEFAULT_IMAGE_ENCODER,
        placeholder: str = DEFAULT_PLACEHOLDER,
        revision: str | None = None,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
    ) -> DiffusionBackbone:
        """Loads every component with ``from_pretrained``.

        Args:
            pretrained_model_name_or_path: diffusers Stable Diffusion folder or hub id.
            image_encoder_name_or_path: CLIP vision model folder or id. A folder laid out as a pipeline (with
                ``image_encoder/`` and ``feature_extractor/``, as the tiny backbone is) is read from those.
            placeholder: the pseudo-word S* to add to the tokenizer.
            revision: hub revision of the Stable Diffusion weights.
            torch_dtype: dtype to load the frozen weights in (default float32). The weights are cast on load,
                so ``bfloat16`` from float32 files gives the same model as from a bf16 copy.
            variant: weight-file variant of the Stable Diffusion folder (``"fp16"``: the
                ``*.fp16.safetensors`` files); the image encoder uses it too when its folder has such files,
                else its plain files (``openai/clip-vit-large-patch14`` has no variants).
        """
        parts = load_sd_components(
            pretrained_model_name_or_path, image_encoder_name_or_path, revision, torch_dtype, variant
        )
        return cls(**parts, name_or_path=str(pretrained_model_name_or_path), placeholder=placeholder)

    def train(self, mode: bool = True) -> DiffusionBackbone:
        # The backbone is frozen: dropout and norms stay in inference mode even while the encoder trains.
        return super().train(False)

    # ----- derived sizes (never hard-coded) -----
    @property
    def resolution(self) -> int:
        """Pixel resolution of the UNet's native sample size."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def clip_image_size(self) -> int:
        return int(self.image_encoder.config.image_size)

    @property
    def token_dim(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.prediction_type)

    def fingerprint(self, load_path: str | None = None) -> str:
        """A short hash identifying the base model (:func:`models.fingerprint.backbone_fingerprint`)."""
        return backbone_fingerprint(self, load_path)

    def matches_fingerprint(self, recorded: str | None, recorded_base_model: str | None = None) -> bool:
        """Whether a recorded fingerprint is this model's (:func:`models.fingerprint.matches_fingerprint`)."""
        return matches_fingerprint(self, recorded, recorded_base_model)

    # ----- text -----
    def tokenize(self, prompts: list[str], require_placeholder: bool = False) -> torch.Tensor:
        """(B, L) padded token ids, L = the tokenizer's ``model_max_length``."""
        if require_placeholder:
            check_prompts(prompts, self.placeholder)
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids.to(self.unet.device)

    def encode_text(
        self, input_ids: torch.Tensor, placeholder_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, L, D) text-encoder states with v* injected at the placeholder positions."""
        return encode_with_placeholder(self.text_encoder, input_ids, self.placeholder_id, placeholder_embeds)

    # ----- images -----
    def encode_images(
        self, pixel_values: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Scaled VAE latents of (B, 3, H, W) images in [-1, 1]: the posterior's mean, or with ``generator`` a
        draw from it (:func:`models.vae_latents.encode_latents`)."""
        return vae_latents.encode_latents(self.vae, pixel_values, generator)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] from scaled latents."""
        return vae_latents.decode_latents(self.vae, latents)

    def clip_hidden_states(self, clip_pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Hidden states of every CLIP vision layer: a tuple of L + 1 tensors (B, N, C), embeddings first."""
        out = self.image_encoder(
            pixel_values=clip_pixel_values.to(tower_dtype(self.image_encoder)), output_hidden_states=True
        )
        return tuple(out.hidden_states)

    # ----- UNet encoder half (E4T's second feature branch) -----
    def unet_feature_dim(self) -> int:
        """Size of :meth:`unet_encoder_features` for this UNet."""
        return unet_feature_dim(self.unet.config.block_out_channels, self.unet.config.layers_per_block)

    def unet_encoder_features(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        """(B, U) pooled features of the UNet's down and mid blocks on z_t (E4T): see :func:`pooled_unet_features`."""
        sample = noisy_latents.to(self.unet.dtype)
        context = encoder_hidden_states.to(self.unet.dtype)
        return pooled_unet_features(
            self.unet, sample, self.unet_time_embedding(sample, timesteps, context), context
        )

    def unet_time_embedding(
        self, sample: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        """(B, E) the embedding the UNet's ResNets read for timesteps (B,) or (), sample (B, C, h, w)."""
        t_emb = self.unet.time_proj(timesteps.reshape(-1).expand(sample.shape[0])).to(sample.dtype)
        return self.unet.time_embedding(t_emb)

    # ----- the personalized UNet -----
    def personalized_unet(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        input_ids: torch.Tensor,
        placeholder_embeds: torch.Tensor,
        lora: dict[str, LoraDelta] | None = None,
        alpha: float = 1.0,
        hard_token_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """UNet prediction under dual-path attention.

        Args:
            noisy_latents: (B, C, h, w) z_t.
            timesteps: (B,) timesteps.
            input_ids: (B, L) prompt ids containing the placeholder.
            placeholder_embeds: (B, D) v*.
            lora: per-sample LoRA deltas (``HyperNetwork.deltas``); None for no weight offsets.
            alpha: weight of the adapted path (1 = single path, 0 = vanilla model on the hard prompt).
            hard_token_ids: (B,) real token replacing S* in the hard prompt; required when alpha < 1.

        Returns:
            (B, C, h, w) the UNet output (epsilon or v, as the scheduler's prediction type).
        """
        soft = self.conditioning(input_ids, placeholder_embeds)
        hard = None
        if alpha < 1.0:
            if hard_token_ids is None:
                raise ValueError(f"alpha={alpha} < 1 needs hard_token_ids (the nearest real token of v*)")
            # S*'s row set to the token's own: the hard prompt's embeddings, with no device read of the ids.
            hard = self.conditioning(input_ids, self.token_rows()[hard_token_ids])
        return self.denoise(noisy_latents, timesteps, soft, hard, lora, alpha)

    def empty_context(self) -> torch.Tensor:
        """(1, L, D) text states of the empty prompt: the context of the UNet feature branch (E4T)."""
        return self.encode_text(self.tokenize([""]))

    def conditioning(
        self, input_ids: torch.Tensor, placeholder_embeds: torch.Tensor | None = None
    ) -> TextConditioning:
        """The UNet's text conditioning of tokenized prompts, with v* injected at the placeholder."""
        return TextConditioning(self.encode_text(input_ids, placeholder_embeds))

    def hard_prompt_ids(self, input_ids: torch.Tensor, hard_token_ids: torch.Tensor) -> torch.Tensor:
        """The hard prompt's ids: S* replaced by each sample's nearest real token (B,)."""
        return replace_placeholder_ids(input_ids, self.placeholder_id, hard_token_ids)

    def unconditional(self, n: int, negative_prompt: str = "") -> TextConditioning:
        """Conditioning of the classifier-free-guidance branch: ``n`` copies of the negative prompt."""
        return self.conditioning(self.tokenize([negative_prompt] * n))

    def denoise(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        soft: TextConditioning,
        hard: TextConditioning | None = None,
        lora: dict[str, LoraDelta] | None = None,
        alpha: float = 1.0,
    ) -> torch.Tensor:
        """(B, C, h, w) UNet output under dual-path attention: soft conditioning on the adapted path, hard on the
        vanilla path (required when ``alpha < 1``)."""
        return self.personalized_call(noisy_latents, timesteps, soft, hard, lora, alpha)

    def personalized_call(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        soft: TextConditioning,
        hard: TextConditioning | None,
        lora: dict[str, LoraDelta] | None,
        alpha: float,
        **unet_kwargs,
    ) -> torch.Tensor:
        """One UNet call carrying the concept: the attention deltas and hard context to the dual-path processors,
        the ResNet / feed-forward deltas to their hooks (:mod:`models.module_offsets`); ``unet_kwargs`` go to the
        UNet as they are (SDXL's ``added_cond_kwargs``)."""
        personalization = Personalization(
            lora=lora or {}, hard_context=None if hard is None else hard.context, alpha=alpha
        )
        with active_offsets(lora):
            return self.unet(
                noisy_latents.to(self.unet.dtype),
                timesteps,
                encoder_hidden_states=soft.context.to(self.unet.dtype),
                cross_attention_kwargs={PERSONALIZATION_KWARG: personalization},
                **unet_kwargs,
            ).sample
