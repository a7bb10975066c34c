"""The pseudo-word S*: adding it to the tokenizer and injecting v* as its input embedding.

v* is injected at the placeholder's positions of the token-embedding output, never written into the text
encoder's embedding table, so one frozen text encoder serves a batch of many concepts at once and its weights
stay bit-identical to the base model's. The table is not even resized: placeholder positions are looked up
with the padding id and then overwritten.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPTokenizer

from models.errors import TuningEncoderError

# The pseudo-word of the configs and the default of every ``placeholder`` argument; written in prompts.
DEFAULT_PLACEHOLDER = "<s*>"

try:  # transformers >= 4.48 builds the causal mask through this helper
    from transformers.masking_utils import create_causal_mask
except ImportError:  # pragma: no cover - older transformers
    create_causal_mask = None


class PlaceholderError(TuningEncoderError, ValueError):
    """A placeholder string that cannot be used, or a prompt that does not contain it."""


def add_placeholder_token(tokenizer: CLIPTokenizer, placeholder: str) -> int:
    """Adds ``placeholder`` as one new token and returns its id.

    Raises:
        PlaceholderError: the string is empty, contains whitespace, or already is a word of the vocabulary
            (it would then silently mean that word in every prompt).
    """
    if not placeholder or any(c.isspace() for c in placeholder):
        raise PlaceholderError(f"placeholder {placeholder!r} must be a non-empty string without spaces")
    vocab = tokenizer.get_vocab()
    existing = tokenizer(placeholder, add_special_tokens=False).input_ids
    if placeholder in vocab or len(existing) == 1 and placeholder.lower() + "</w>" in vocab:
        raise PlaceholderError(
            f"placeholder {placeholder!r} already exists in the tokenizer's vocabulary "
            f"(id {vocab.get(placeholder, existing[0])}); choose a new string such as '{DEFAULT_PLACEHOLDER}'"
        )
    tokenizer.add_tokens([placeholder], special_tokens=False)
    new_id = tokenizer.convert_tokens_to_ids(placeholder)
    if tokenizer(placeholder, add_special_tokens=False).input_ids != [new_id]:
        raise PlaceholderError(f"placeholder {placeholder!r} does not tokenize to one token")
    return new_id


def check_prompts(prompts: list[str], placeholder: str) -> None:
    """Raises PlaceholderError naming the first prompt that lacks the placeholder."""
    for prompt in prompts:
        if placeholder not in prompt:
            raise PlaceholderError(f"prompt {prompt!r} does not contain the placeholder {placeholder!r}")


def placeholder_input_embeds(
    text_encoder: nn.Module,
    input_ids: torch.Tensor,
    placeholder_id: int | None = None,
    placeholder_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, L, D) token embeddings of ``input_ids`` with v* at the placeholder positions (before positions are added).

    Args:
        text_encoder: a ``transformers`` CLIP text model (its ``get_input_embeddings()`` table is read).
        input_ids: (B, L) token ids; may contain ``placeholder_id``, which may lie beyond the embedding table.
        placeholder_id: id of S* in the tokenizer.
        placeholder_embeds: (B, D) v* per sample; required when a prompt holds S*.
    """
    table = text_encoder.get_input_embeddings()
    ids = input_ids
    mask = None
    if placeholder_id is not None:
        mask = input_ids == placeholder_id
        # With a v* for every row, writing it where the mask is set is a no-op on rows without S*: the mask need
        # not be read (a host-device synchronisation per text-encoder call on a GPU).
        fits = placeholder_embeds is not None and placeholder_embeds.shape == (
            ids.shape[0],
            table.embedding_dim,
        )
        if fits or bool(mask.any()):
            if placeholder_embeds is None:
                raise PlaceholderError(
                    "prompts contain the placeholder but no placeholder embedding was given"
                )
            pad_id = text_encoder.config.pad_token_id
            ids = input_ids.masked_fill(mask, pad_id if pad_id is not None else 0)
        else:
            mask = None
    embeds = table(ids)
    if mask is not None:
        v = placeholder_embeds.to(embeds.dtype)
        if v.shape != (ids.shape[0], embeds.shape[-1]):
            raise ValueError(
                f"placeholder_embeds has shape {tuple(v.shape)}, expected {(ids.shape[0], embeds.shape[-1])}"
            )
        embeds = torch.where(mask.unsqueeze(-1), v.unsqueeze(1).expand_as(embeds), embeds)
    return embeds


def encode_with_placeholder(
    text_encoder: nn.Module,
    input_ids: torch.Tensor,
    placeholder_id: int | None = None,
    placeholder_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Runs a CLIP text encoder, replacing the placeholder's input embedding by a per-sample v*.

    Reproduces ``CLIPTextModel.forward(input_ids).last_hidden_state`` exactly when no placeholder is given
    (tested), through the model's own public sub-modules: embeddings, causal mask, encoder, final layer norm.

    Args:
        text_encoder: a ``transformers.CLIPTextModel``.
        input_ids: (B, L) token ids; may contain ``placeholder_id``, which may lie beyond the embedding table.
        placeholder_id: id of S* in the tokenizer.
        placeholder_embeds: (B, D) v* per sample (D = text hidden size); required when a prompt holds S*.

    Returns:
        (B, L, D) last hidden states, the UNet's ``encoder_hidden_states``.
    """
    return run_text_model(text_encoder, input_ids, placeholder_id, placeholder_embeds)[0]


def run_text_model(
    text_model: nn.Module,
    input_ids: torch.Tensor,
    placeholder_id: int | None = None,
    placeholder_embeds: torch.Tensor | None = None,
    keep_layer: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``CLIPTextModel.forward`` with v* injected, through the model's public sub-modules (the one copy of it).

    Embeddings, causal mask, each encoder layer, final layer norm: the computation of
    ``CLIPTextModel.forward(input_ids, output_hidden_states=True)`` (tested against it, here and for SDXL).

    Args:
        text_model: a ``CLIPTextModel`` (for ``CLIPTextModelWithProjection``, its ``text_model``).
        input_ids, placeholder_id, placeholder_embeds: as for :func:`encode_with_placeholder`.
        keep_layer: also return the states after this encoder layer (SDXL conditions on the penultimate one).

    Returns:
        ``(final-layer-normed last states (B, L, D), states after layer keep_layer (B, L, D) or None)``.
    """
    embeds = placeholder_input_embeds(text_model, input_ids, placeholder_id, placeholder_embeds)
    hidden = text_model.embeddings(inputs_embeds=embeds)
    mask = None
    if create_causal_mask is not None:
        mask = create_causal_mask(
            config=text_model.config, inputs_embeds=hidden, attention_mask=None, cache=None
        )
    kept = None
    for i, layer in enumerate(text_model.encoder.layers):
        hidden = layer(hidden, mask, is_causal=True)
        if i == keep_layer:
            kept = hidden
    return text_model.final_layer_norm(hidden), kept


def replace_placeholder_ids(
    input_ids: torch.Tensor, placeholder_id: int, token_ids: torch.Tensor
) -> torch.Tensor:
    """The hard prompt: S* replaced by one real token id per sample.

    Args:
        input_ids: (B, L) ids holding ``placeholder_id``.
        token_ids: (B,) the nearest real token of each sample's v*.

    Returns:
        (B, L) ids with the placeholder positions replaced.
    """
    mask = input_ids == placeholder_id
    return torch.where(mask, token_ids.to(input_ids).view(-1, 1).expand_as(input_ids), input_ids)
