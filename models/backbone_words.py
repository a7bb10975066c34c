"""The word-table half of :class:`~models.backbone.DiffusionBackbone`: the text encoder's token embeddings, the
vocabulary filter, the scale of real words and the nearest-word index over them. A mixin: the backbone holds the
text encoder, tokenizer, placeholder id and ``vocabulary_ids`` its methods read; ``models.backbone_sdxl`` overrides
the hooks for two text encoders."""

from __future__ import annotations

import torch

from models.token_index import TokenIndex
from models.vocabulary import vocabulary_ids


class BackboneWords:
    """Token-table methods of the backbone (one CLIP text encoder); the SDXL backbone overrides the hooks."""

    def token_embedding_table(self) -> torch.Tensor:
        """(V, D) the text encoder's input-embedding table (without the placeholder)."""
        return self.text_encoder.get_input_embeddings().weight

    def token_rows(self) -> torch.Tensor:
        """The table the training step indexes (``rows[ids]``); SDXL's gathers rows without concatenating."""
        return self.token_embedding_table()

    def special_token_ids(self) -> list[int]:
        return sorted(set(self.tokenizer.all_special_ids) | {self.placeholder_id})

    def restrict_vocabulary(self, vocabulary) -> list[int]:
        """Counts only the tokens of ``vocabulary``'s words (a list or a one-word-per-line file) as real words:
        the token norm v* is rescaled to and the nearest-token search use these rows only. Returns their ids."""
        self.vocabulary_ids = vocabulary_ids(self.tokenizer, vocabulary)
        return self.vocabulary_ids

    def mean_token_norm(self) -> float:
        """Mean L2 norm of the real token embeddings (special tokens excluded; only ``vocabulary_ids`` when a
        vocabulary filter is set): the scale of real words."""
        table = self.token_embedding_table().detach().float()
        if self.vocabulary_ids is not None:
            return float(table[torch.tensor(self.vocabulary_ids)].norm(dim=-1).mean())
        keep = torch.ones(table.shape[0], dtype=torch.bool)
        ids = [i for i in self.special_token_ids() if i < table.shape[0]]
        keep[ids] = False
        return float(table[keep].norm(dim=-1).mean())

    @property
    def token_dims(self) -> tuple[int, ...]:
        """Width of v* per text encoder; v* is their concatenation (one encoder here: ``(token_dim,)``)."""
        return (self.token_dim,)

    def mean_token_norms(self) -> tuple[float, ...]:
        """:meth:`mean_token_norm` per text encoder, in :attr:`token_dims` order."""
        return (self.mean_token_norm(),)

    def embedding_parts(self) -> dict[str, int]:
        """Names and widths of v*'s parts for the exports; empty when v* is one text encoder's word."""
        return {}

    def similarity_space(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(..., D) embeddings mapped where cosine is the nearest-word similarity; identity with one encoder."""
        return embeddings

    def index_exclude_ids(self) -> list[int]:
        """Token ids the nearest-word search never returns: special tokens, the placeholder and, under a
        vocabulary filter (``restrict_vocabulary``), every token outside it."""
        excluded = set(self.special_token_ids())
        if self.vocabulary_ids is not None:
            excluded |= set(range(self.token_embedding_table().shape[0])) - set(self.vocabulary_ids)
        return sorted(excluded)

    def build_token_index(self, mode: str = "exact", cache_dir: str | None = None) -> TokenIndex:
        """Nearest-word index over the real tokens (special tokens and the placeholder excluded; only the
        vocabulary filter's tokens when one is set)."""
        return TokenIndex.from_text_encoder(
            self.text_encoder,
            self.tokenizer,
            exclude_ids=self.index_exclude_ids(),
            mode=mode,
            cache_dir=cache_dir,
        )
