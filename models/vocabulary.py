"""Vocabulary filters: the words a run counts as real (a list, or a one-word-per-line file) and their token ids.

The toy world's text encoder trained only some rows of its token table: the token norm v* is rescaled to and the
nearest-token search use those rows only (:meth:`models.backbone.DiffusionBackbone.restrict_vocabulary`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any


def read_vocabulary(vocabulary: Iterable[str] | str | Path) -> list[str]:
    """Words of a vocabulary filter: a list as given, or a file's non-empty lines (``#`` starts a comment)."""
    if isinstance(vocabulary, (str, Path)):
        path = Path(vocabulary)
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary file {path} does not exist")
        lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
        words = [w for w in lines if w]
    else:
        words = [str(w).strip() for w in vocabulary if str(w).strip()]
    if not words:
        raise ValueError(f"the vocabulary filter {vocabulary!r} has no words")
    return words


def vocabulary_ids(tokenizer: Any, vocabulary: Iterable[str] | str | Path) -> list[int]:
    """Sorted vocabulary ids of the tokens of ``vocabulary``'s words (every BPE piece of a word, no specials)."""
    special = set(tokenizer.all_special_ids)
    ids: set[int] = set()
    for word in read_vocabulary(vocabulary):
        ids |= {int(i) for i in tokenizer(word, add_special_tokens=False).input_ids if int(i) not in special}
    return sorted(ids)
