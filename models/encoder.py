"""The concept encoder (E4T feature backbone), the token embedder and the LoRA hypernetwork: pure nn.Modules."""

from __future__ import annotations

import math

import torch
from torch import nn

from models.attention import LoraDelta

IMAGE_FEATURES = ("cls", "mean", "cls_mean")


def image_tokens(hidden_state: torch.Tensor, mode: str = "cls") -> torch.Tensor:
    """Pools one vision layer's tokens (B, N, C) into the image branch's feature of that layer.

    ``cls``: the [CLS] token (E4T; CLIP, DINOv2). ``mean``: the mean of the patch tokens (what a tower without a
    [CLS] token offers, e.g. SigLIP; a [CLS] token, if present, is left out). ``cls_mean``: both concatenated
    (B, 2C): the patch tokens carry where-and-what detail (shape) that a [CLS] trained on captions can drop.
    A convolutional tower's feature map (B, C, H, W) has no [CLS]: it takes ``mean`` (global average pooling).
    """
    if hidden_state.ndim == 4:
        if mode != "mean":
            raise ValueError(
                f"a convolutional image tower has no [CLS] token: set image_features to 'mean', not {mode!r}"
            )
        return hidden_state.mean(dim=(2, 3))
    if mode == "cls":
        return hidden_state[:, 0]
    if mode == "mean":
        return hidden_state[:, 1:].mean(dim=1) if hidden_state.shape[1] > 1 else hidden_state[:, 0]
    if mode == "cls_mean":
        return torch.cat([hidden_state[:, 0], hidden_state[:, 1:].mean(dim=1)], dim=-1)
    raise ValueError(f"image_features must be one of {IMAGE_FEATURES}, got {mode!r}")


class FeatureEncoder(nn.Module):
    """Fuses CLIP image features of the concept with UNet encoder features of the noisy latent (E4T).

    CLIP branch: the [CLS] token (or the pooled tokens chosen by ``image_features``) of every
    ``clip_layer_stride``-th vision layer -> one linear layer each -> average over layers -> LeakyReLU.
    UNet branch: pooled down/mid features -> 2-layer MLP. Fusion: concatenate both -> linear.

    Args:
        clip_hidden_size: width of the vision layers, or one width per hidden state (embeddings first) for
            towers whose stages differ in width (convolutional ones).
        clip_num_layers: number of CLIP vision layers.
        unet_feature_dim: size of the pooled UNet features (``DiffusionBackbone.unet_feature_dim()``).
        feature_dim: width of the fused feature f.
        clip_layer_stride: take every n-th layer's [CLS] token (E4T: 2).
        unet_hidden_dim: hidden width of the UNet-branch MLP.
        negative_slope: LeakyReLU slope.
        image_features: how each layer's tokens are pooled: ``cls`` (E4T), ``mean`` or ``cls_mean``
            (:func:`image_tokens`).
    """

    def __init__(
        self,
        clip_hidden_size: int | list[int],
        clip_num_layers: int,
        unet_feature_dim: int,
        feature_dim: int = 768,
        clip_layer_stride: int = 2,
        unet_hidden_dim: int = 1024,
        negative_slope: float = 0.2,
        image_features: str = "cls",
    ) -> None:
        super().__init__()
        if clip_layer_stride < 1 or clip_layer_stride > clip_num_layers:
            raise ValueError(f"clip_layer_stride={clip_layer_stride} must lie in [1, {clip_num_layers}]")
        if image_features not in IMAGE_FEATURES:
            raise ValueError(f"image_features must be one of {IMAGE_FEATURES}, got {image_features!r}")
        self.image_features = image_features
        widths = (
            list(clip_hidden_size)
            if isinstance(clip_hidden_size, (list, tuple))
            else [clip_hidden_size] * (clip_num_layers + 1)
        )
        factor = 2 if image_features == "cls_mean" else 1
        # hidden_states[0] is the embedding output; layer i's output is hidden_states[i].
        self.clip_layers = list(range(clip_layer_stride, clip_num_layers + 1, clip_layer_stride))
        self.clip_linears = nn.ModuleList(
            nn.Linear(widths[i] * factor, feature_dim) for i in self.clip_layers
        )
        self.clip_act = nn.LeakyReLU(negative_slope)
        self.unet_mlp = nn.Sequential(
            nn.Linear(unet_feature_dim, unet_hidden_dim),
            nn.LeakyReLU(negative_slope),
            nn.Linear(unet_hidden_dim, feature_dim),
        )
        self.fuse = nn.Linear(2 * feature_dim, feature_dim)

    def forward(
        self, clip_hidden_states: tuple[torch.Tensor, ...], unet_features: torch.Tensor
    ) -> torch.Tensor:
        """Args: ``clip_hidden_states``: L + 1 tensors (B, N, C); ``unet_features``: (B, U). Returns (B, F)."""
        cls_feats = [
            lin(image_tokens(clip_hidden_states[i], self.image_features).float())
            for i, lin in zip(self.clip_layers, self.clip_linears)
        ]
        clip_f = self.clip_act(torch.stack(cls_feats, dim=0).mean(dim=0))
        unet_f = self.unet_mlp(unet_features.float())
        return self.fuse(torch.cat([clip_f, unet_f], dim=-1))


class TokenEmbedder(nn.Module):
    """MLP head predicting the word embedding v* of S* from the fused feature.

    Args:
        feature_dim: width of f.
        token_dim: text-encoder hidden size (768 for SD 1.x).
        hidden_dim: MLP hidden width.
        target_norm: if given, v* is rescaled to this L2 norm (the mean norm of real token embeddings), so it
            lives at the scale of real words (docs/method.md default); ``None`` disables the rescaling.
        negative_slope: LeakyReLU slope.
    """

    def __init__(
        self,
        feature_dim: int,
        token_dim: int,
        hidden_dim: int = 1024,
        target_norm: float | None = None,
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(feature_dim, hidden_dim), nn.LeakyReLU(negative_slope), nn.Linear(hidden_dim, token_dim)
        )
        self.rescale = target_norm is not None
        self.register_buffer("target_norm", torch.tensor(float(target_norm or 0.0)), persistent=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F) -> (B, D) v*."""
        return self.renormalize(self.mlp(features))

    def renormalize(self, v: torch.Tensor) -> torch.Tensor:
        """(B, D) v rescaled to the target norm (unchanged without rescaling)."""
        if not self.rescale:
            return v
        return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-6) * self.target_norm


class MultiTokenEmbedder(nn.Module):
    """One :class:`TokenEmbedder` head per text encoder (SDXL: CLIP ViT-L and OpenCLIP bigG); v* is their
    concatenation, each part rescaled to its own encoder's mean token norm.

    Args:
        feature_dim: width of f.
        token_dims: width of each encoder's word embedding, e.g. ``(768, 1280)``.
        hidden_dim: hidden width of each head.
        target_norms: per-encoder target norm, or None for no rescaling.
        negative_slope: LeakyReLU slope.
    """

    def __init__(
        self,
        feature_dim: int,
        token_dims: tuple[int, ...],
        hidden_dim: int = 1024,
        target_norms: tuple[float, ...] | None = None,
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        norms = target_norms if target_norms is not None else (None,) * len(token_dims)
        if len(norms) != len(token_dims):
            raise ValueError(f"{len(norms)} target norms for {len(token_dims)} token widths")
        self.token_dims = tuple(int(d) for d in token_dims)
        self.heads = nn.ModuleList(
            TokenEmbedder(feature_dim, d, hidden_dim, n, negative_slope)
            for d, n in zip(self.token_dims, norms)
        )
        self.rescale = target_norms is not None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F) -> (B, sum(token_dims)) v*."""
        return torch.cat([head(features) for head in self.heads], dim=-1)

    def renormalize(self, v: torch.Tensor) -> torch.Tensor:
        """(B, sum(token_dims)) v with every part rescaled to its own target norm."""
        parts = torch.split(v, list(self.token_dims), dim=-1)
        return torch.cat([head.renormalize(p) for head, p in zip(self.heads, parts)], dim=-1)


class HyperNetwork(nn.Module):
    """Predicts per-sample LoRA cores for every target linear: ``dW_l = B_l · M_l(f) · A_l`` (docs/method.md).

    A shared trunk maps f to a hidden vector; one zero-initialised linear head per target predicts the r x r
    core M_l (all heads are fused into one linear for speed, which is the same function). A_l and B_l are
    learned per-layer factors. Zero heads give dW = 0, so the untrained model is exactly the base model; A and B
    are random so gradients reach the heads from the first step.

    Args:
        feature_dim: width of f.
        targets: ``"<attention module>.<projection>" -> (in_features, out_features)``.
        rank: LoRA rank r.
        hidden_dim: trunk width.
        negative_slope: LeakyReLU slope.
    """

    def __init__(
        self,
        feature_dim: int,
        targets: dict[str, tuple[int, int]],
        rank: int = 4,
        hidden_dim: int = 256,
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.names = list(targets)
        self.rank = rank
        self.trunk = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.LeakyReLU(negative_slope))
        self.heads = nn.Linear(hidden_dim, len(self.names) * rank * rank)
        nn.init.zeros_(self.heads.weight)
        nn.init.zeros_(self.heads.bias)
        self.down = nn.ParameterList(
            nn.Parameter(torch.randn(rank, fan_in) / math.sqrt(fan_in)) for fan_in, _ in targets.values()
        )
        self.up = nn.ParameterList(
            nn.Parameter(torch.randn(fan_out, rank) / math.sqrt(rank)) for _, fan_out in targets.values()
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F) -> (B, T, r, r) cores for the T targets, in ``self.names`` order."""
        out = self.heads(self.trunk(features))
        return out.view(features.shape[0], len(self.names), self.rank, self.rank)

    def deltas(self, cores: torch.Tensor) -> dict[str, LoraDelta]:
        """LoRA deltas for the processors from (B, T, r, r) cores."""
        return {n: LoraDelta(self.down[i], cores[:, i], self.up[i]) for i, n in enumerate(self.names)}

    def static_lora(self, cores: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """One concept's deltas as plain LoRA factors ``name -> (down' = M·A (r, in), up = B (out, r))``.

        Args:
            cores: (T, r, r) cores of a single concept.
        """
        return {n: (cores[i] @ self.down[i], self.up[i]) for i, n in enumerate(self.names)}
