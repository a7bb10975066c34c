"""Dual-path attention (DATE): a diffusers attention processor with per-sample LoRA deltas and a hard prompt.

Every attention layer runs twice on the same input hidden state (docs/method.md, "Dual-path attention"):

* adapted path: weights ``W + dW`` (per-sample low-rank deltas), text context from the soft prompt with v*;
* vanilla path: the original weights ``W``, text context from the hard prompt (S* -> nearest real token);

and returns ``alpha * adapted + (1 - alpha) * vanilla``. ResNet and feed-forward layers run once. Per-sample
data reaches the processors as the UNet forward argument ``cross_attention_kwargs={"personalization": p}``;
nothing is stored on modules between calls. Without ``personalization`` the processor is plain attention,
numerically the same as diffusers' ``AttnProcessor2_0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

PERSONALIZATION_KWARG = "personalization"
DEFAULT_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


class LoraDelta(NamedTuple):
    """A per-sample low-rank offset ``dW_b = up_b · core_b · down_b`` of one linear layer.

    The factors are one pair for the whole batch (the encoder's learned A_l, B_l), or one pair per sample when
    several concepts that each tune their own factors share a batch (:meth:`per_sample`).

    Attributes:
        down: (r, in_features) learned factor A, or (B, r, in_features) per sample.
        core: (B, r, r) per-sample core M(f), predicted by the hypernetwork.
        up: (out_features, r) learned factor B, or (B, out_features, r) per sample.
    """

    down: torch.Tensor
    core: torch.Tensor
    up: torch.Tensor

    @property
    def per_sample(self) -> bool:
        """Whether every sample has its own factors (``down`` is (B, r, in))."""
        return self.down.dim() == 3

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x · dW_b^T`` for x of shape (B, N, in_features) -> (B, N, out_features)."""
        if self.per_sample:
            h = torch.bmm(x, self.down.to(x.dtype).transpose(1, 2))
            h = torch.bmm(h, self.core.to(x.dtype).transpose(1, 2))
            return torch.bmm(h, self.up.to(x.dtype).transpose(1, 2))
        h = F.linear(x, self.down.to(x.dtype))
        h = torch.bmm(h, self.core.to(x.dtype).transpose(1, 2))
        return F.linear(h, self.up.to(x.dtype))

    def repeat(self, n: int) -> LoraDelta:
        """The delta of a batch repeated ``n`` times along the batch (classifier-free guidance's halves)."""
        if self.per_sample:
            return LoraDelta(self.down.repeat(n, 1, 1), self.core.repeat(n, 1, 1), self.up.repeat(n, 1, 1))
        return LoraDelta(self.down, self.core.repeat(n, 1, 1), self.up)


@dataclass
class Personalization:
    """Per-call data of the dual-path processors, passed as a UNet forward kwarg.

    Attributes:
        lora: LoRA deltas keyed by ``"<attention module name>.<projection>"``, e.g.
            ``"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"``. Missing keys mean no delta.
        hard_context: (B, L, D) text-encoder states of the hard prompt, for the vanilla path of cross-attention;
            required when ``alpha < 1``.
        alpha: blend weight of the adapted path: 1 = single-path personalization, 0 = vanilla model.
    """

    lora: dict[str, LoraDelta] = field(default_factory=dict)
    hard_context: torch.Tensor | None = None
    alpha: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"dual-path alpha must lie in [0, 1], got {self.alpha}")
        if self.alpha < 1.0 and self.hard_context is None:
            raise ValueError(f"alpha={self.alpha} < 1 needs the hard prompt's text context (hard_context)")


class DualPathAttnProcessor:
    """Attention processor implementing DATE's dual path; plain attention when called without personalization.

    Args:
        name: the attention module's name in the UNet (its processor key without ``.processor``); used to find
            this layer's LoRA deltas.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        personalization: Personalization | None = None,
    ) -> torch.Tensor:
        if personalization is None:
            return self._attend(attn, hidden_states, encoder_hidden_states, attention_mask, temb, None)
        alpha = float(personalization.alpha)
        adapted = vanilla = None
        # Both paths read the same hidden state: base projections of the same input tensor (q everywhere, k and
        # v in self-attention) are computed once and shared; only the adapted path adds its deltas.
        shared: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = {} if 0.0 < alpha < 1.0 else None
        if alpha > 0.0:
            adapted = self._attend(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, personalization.lora, shared
            )
        if alpha < 1.0:
            # Cross-attention reads the hard prompt on the vanilla path; self-attention reads the image itself.
            context = personalization.hard_context if encoder_hidden_states is not None else None
            vanilla = self._attend(attn, hidden_states, context, attention_mask, temb, None, shared)
        if vanilla is None:
            return adapted
        if adapted is None:
            return vanilla
        return alpha * adapted + (1.0 - alpha) * vanilla

    def _proj(
        self,
        linear: torch.nn.Module,
        key: str,
        x: torch.Tensor,
        lora: dict[str, LoraDelta] | None,
        shared: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        cached = shared.get(key) if shared is not None else None
        if cached is not None and cached[0] is x:
            out = cached[1]
        else:
            out = linear(x)
            if shared is not None:
                shared[key] = (x, out)
        if lora:
            delta = lora.get(f"{self.name}.{key}")
            if delta is not None:
                out = out + delta.apply(x)
        return out

    def _attend(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        temb: torch.Tensor | None,
        lora: dict[str, LoraDelta] | None,
        shared: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        # Same computation, in the same order, as diffusers' AttnProcessor2_0 (parity is tested), with the
        # projections routed through _proj to add the per-sample deltas.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = self._proj(attn.to_q, "to_q", hidden_states, lora, shared)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = self._proj(attn.to_k, "to_k", encoder_hidden_states, lora, shared)
        value = self._proj(attn.to_v, "to_v", encoder_hidden_states, lora, shared)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = self._proj(attn.to_out[0], "to_out.0", hidden_states, lora)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def attention_module_names(
    unet: UNet2DConditionModel, kinds: tuple[str, ...] = ("attn1", "attn2")
) -> list[str]:
    """Names of the UNet's attention modules whose last name part is in ``kinds``, in processor order."""
    names = [key.removesuffix(".processor") for key in unet.attn_processors]
    return [n for n in names if n.rsplit(".", 1)[-1] in kinds]


def install_dual_path(unet: UNet2DConditionModel) -> dict[str, DualPathAttnProcessor]:
    """Installs a :class:`DualPathAttnProcessor` on every attention layer (attn1 and attn2) of the UNet.

    Returns:
        The processors by processor key (``"<module name>.processor"``).
    """
    processors = {key: DualPathAttnProcessor(key.removesuffix(".processor")) for key in unet.attn_processors}
    unet.set_attn_processor(dict(processors))
    return processors


def lora_targets(
    unet: UNet2DConditionModel,
    projections: tuple[str, ...] = DEFAULT_PROJECTIONS,
    attention: tuple[str, ...] = ("attn1", "attn2"),
) -> dict[str, tuple[int, int]]:
    """LoRA target linears: ``"<attention module>.<projection>" -> (in_features, out_features)``."""
    targets = {}
    for name in attention_module_names(unet, attention):
        module = unet.get_submodule(name)
        for proj in projections:
            linear = module.get_submodule(proj)
            targets[f"{name}.{proj}"] = (linear.in_features, linear.out_features)
    return targets
