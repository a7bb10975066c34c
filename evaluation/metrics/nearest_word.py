"""The nearest word of a learned v* among a word list: how "semantic" the tokens are (the paper's claim for its
regulariser). The per-row ``nearest_word`` column; the report tabulates it (``report/words.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from models.artifact import ConceptArtifact
from models.backbone import DiffusionBackbone
from models.vocabulary import read_vocabulary


class NearestWords:
    """Nearest word of a v* among a word list, by cosine over the text encoder's input-embedding rows.

    A word of several BPE pieces owns each of them (the search runs over pieces, as the token index's vocabulary
    filter does), so ``checkered`` (``chec`` + ``kered``) is found through either piece.

    Args:
        table: (V, D) token-embedding table of the text encoder.
        tokenizer: its tokenizer.
        vocabulary: the words (a list, or a words file with ``#`` comments).
    """

    def __init__(self, table: Tensor, tokenizer: Any, vocabulary: Sequence[str] | str | Path) -> None:
        owners: dict[int, str] = {}
        for word in read_vocabulary(vocabulary):
            for piece in tokenizer(word, add_special_tokens=False).input_ids:
                owners.setdefault(int(piece), word)
        self.ids = torch.tensor(sorted(owners))
        self.words = [owners[i] for i in self.ids.tolist()]
        self.rows = F.normalize(table.detach().float()[self.ids], dim=-1)

    def __call__(self, v_star: Tensor) -> str:
        """The word whose piece is closest to ``v_star`` (D,) by cosine."""
        sims = self.rows @ F.normalize(v_star.detach().float().reshape(-1), dim=0)
        return self.words[int(sims.argmax())]


def word_of_token(token: str) -> str:
    """A BPE token as a word (``"red</w>"`` -> ``"red"``)."""
    return token.removesuffix("</w>")


def learned_v_star(art: ConceptArtifact | None) -> bool:
    """Whether the artefact's v* was learned (tuned or predicted by the encoder); one-shot LoRA keeps the
    identifier's embedding, which has no nearest word to report."""
    if art is None:
        return False
    tuned = set(str(art.extra.get("tuned", "")).split(","))
    return bool({"embedding", "encoder"} & tuned or art.extra.get("init") == "encoder")


class NearestWordOf:
    """The ``nearest_word`` of an artefact: among ``vocabulary`` words (built on first use from the sampling
    backbone's token table), else the artefact's own nearest token; empty for a v* that is not learned.

    Args:
        vocabulary: words file (None: the artefact's nearest token).
        backbone: returns the sampling backbone (called once, when a word is first needed).
    """

    def __init__(self, vocabulary: str | None, backbone: Callable[[], DiffusionBackbone]) -> None:
        self.vocabulary, self.backbone = vocabulary, backbone
        self.words: NearestWords | None = None

    def __call__(self, art: ConceptArtifact | None) -> str:
        if art is None or not learned_v_star(art):
            return ""
        if self.vocabulary is None:
            return word_of_token(art.nearest_token)
        if self.words is None:
            backbone = self.backbone()
            self.words = NearestWords(backbone.token_embedding_table(), backbone.tokenizer, self.vocabulary)
        return self.words(art.v_star)
