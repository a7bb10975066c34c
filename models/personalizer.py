"""The trainable part of DATE: feature encoder + token embedder + hypernetwork, built from a backbone's sizes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.attention import DEFAULT_PROJECTIONS, LoraDelta, lora_targets
from models.backbone import DiffusionBackbone
from models.encoder import FeatureEncoder, HyperNetwork, MultiTokenEmbedder, TokenEmbedder
from models.image_encoder import feature_widths
from models.module_offsets import module_targets


@dataclass
class PersonalizerConfig:
    """Hyper-parameters of the trainable modules (docs/method.md defaults at Stable Diffusion scale).

    Attributes:
        feature_dim: width of the fused feature f.
        clip_layer_stride: use the [CLS] token of every n-th CLIP vision layer (E4T: 2).
        unet_hidden_dim: hidden width of the UNet-feature MLP.
        token_hidden_dim: hidden width of the token embedder.
        rescale_token_norm: rescale v* to the mean norm of the real token embeddings.
        hyper_hidden_dim: width of the hypernetwork's shared trunk.
        lora_rank: rank r of the LoRA offsets.
        lora_projections: attention projections that get offsets.
        lora_attention: attention kinds that get offsets (attn1 = self, attn2 = cross).
        lora_modules: further layers that get offsets of the same form (:mod:`models.module_offsets`): ``ff``
            (feed-forward linears), ``resnet`` (ResNet convolutions); () = attention only (the paper's).
        negative_slope: LeakyReLU slope everywhere.
        image_features: how each read vision layer is pooled: ``cls`` (E4T), ``mean`` (towers without [CLS],
            e.g. SigLIP) or ``cls_mean`` (both; see ``models.encoder.image_tokens``).
    """

    feature_dim: int = 768
    clip_layer_stride: int = 2
    unet_hidden_dim: int = 1024
    token_hidden_dim: int = 1024
    rescale_token_norm: bool = True
    hyper_hidden_dim: int = 256
    lora_rank: int = 4
    lora_projections: tuple[str, ...] = DEFAULT_PROJECTIONS
    lora_attention: tuple[str, ...] = ("attn1", "attn2")
    lora_modules: tuple[str, ...] = ()
    negative_slope: float = 0.2
    image_features: str = "cls"


@dataclass
class ConceptPrediction:
    """What the personalizer predicts for a batch of concepts.

    Attributes:
        v_star: (B, D) word embedding of S*.
        cores: (B, T, r, r) LoRA cores for the hypernetwork's T targets.
    """

    v_star: torch.Tensor
    cores: torch.Tensor


class Personalizer(nn.Module):
    """Feature encoder, token embedder and hypernetwork, sized from a :class:`DiffusionBackbone`.

    Args:
        backbone: the frozen backbone (read for sizes only; it is not registered as a sub-module, so
            ``state_dict()`` holds the trainable weights alone).
        config: hyper-parameters.
    """

    def __init__(self, backbone: DiffusionBackbone, config: PersonalizerConfig | None = None) -> None:
        super().__init__()
        cfg = config or PersonalizerConfig()
        self.config = cfg
        widths = feature_widths(backbone.image_encoder, backbone.clip_image_size, backbone.clip_hidden_states)
        self.encoder = FeatureEncoder(
            clip_hidden_size=widths,
            clip_num_layers=len(widths) - 1,
            unet_feature_dim=backbone.unet_feature_dim(),
            feature_dim=cfg.feature_dim,
            clip_layer_stride=cfg.clip_layer_stride,
            unet_hidden_dim=cfg.unet_hidden_dim,
            negative_slope=cfg.negative_slope,
            image_features=cfg.image_features,
        )
        if len(backbone.token_dims) == 1:
            self.token_embedder = TokenEmbedder(
                feature_dim=cfg.feature_dim,
                token_dim=backbone.token_dim,
                hidden_dim=cfg.token_hidden_dim,
                target_norm=backbone.mean_token_norm() if cfg.rescale_token_norm else None,
                negative_slope=cfg.negative_slope,
            )
        else:  # SDXL: one head per text encoder, v* = their concatenation
            self.token_embedder = MultiTokenEmbedder(
                feature_dim=cfg.feature_dim,
                token_dims=backbone.token_dims,
                hidden_dim=cfg.token_hidden_dim,
                target_norms=backbone.mean_token_norms() if cfg.rescale_token_norm else None,
                negative_slope=cfg.negative_slope,
            )
        targets = lora_targets(backbone.unet, tuple(cfg.lora_projections), tuple(cfg.lora_attention))
        targets |= module_targets(backbone.unet, tuple(cfg.lora_modules))
        self.hypernetwork = HyperNetwork(
            feature_dim=cfg.feature_dim,
            targets=targets,
            rank=cfg.lora_rank,
            hidden_dim=cfg.hyper_hidden_dim,
            negative_slope=cfg.negative_slope,
        )

    def forward(
        self, clip_hidden_states: tuple[torch.Tensor, ...], unet_features: torch.Tensor
    ) -> ConceptPrediction:
        """Predicts v* and the LoRA cores from CLIP hidden states and pooled UNet features."""
        f = self.encoder(clip_hidden_states, unet_features)
        return ConceptPrediction(v_star=self.token_embedder(f), cores=self.hypernetwork(f))

    def predict(
        self,
        backbone: DiffusionBackbone,
        clip_pixel_values: torch.Tensor,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        empty_context: torch.Tensor,
    ) -> ConceptPrediction:
        """Runs the frozen feature extractors of ``backbone`` and then :meth:`forward`.

        Args:
            clip_pixel_values: (B, 3, c, c) CLIP-preprocessed concept images.
            noisy_latents: (B, C, h, w) z_t of the same images.
            timesteps: (B,) timesteps of z_t.
            empty_context: (B, L, D) or (1, L, D) text states of the empty prompt.
        """
        clip_states = backbone.clip_hidden_states(clip_pixel_values)
        context = empty_context.expand(noisy_latents.shape[0], -1, -1)
        unet_features = backbone.unet_encoder_features(noisy_latents, timesteps, context)
        return self(clip_states, unet_features)

    def deltas(self, cores: torch.Tensor) -> dict[str, LoraDelta]:
        """Per-sample LoRA deltas for the dual-path processors."""
        return self.hypernetwork.deltas(cores)
