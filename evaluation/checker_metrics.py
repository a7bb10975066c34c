"""The toy world's exact metrics: the attribute checker's readings against what each prompt asked for, and the
nearest words of each learned v* (how "semantic" the tokens are, the paper's claim for its regulariser).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from models.checker import AttributeChecker
from models.token_index import read_vocabulary

IDENTITY_ATTRIBUTES = ("shape", "colour", "pattern")
PROMPT_ATTRIBUTES = ("background", "position", "size")
# Per-image columns: all identity attributes right (and each alone), all prompt attributes as asked (and each).
CHECKER_COLUMNS: tuple[str, ...] = (
    "identity_acc",
    *(f"{a}_acc" for a in IDENTITY_ATTRIBUTES),
    "prompt_acc",
    *(f"{a}_acc" for a in PROMPT_ATTRIBUTES),
)
CHECKER_NAMES = {
    "identity_acc": "identity (checker)",
    "prompt_acc": "prompt (checker)",
    **{f"{a}_acc": a for a in (*IDENTITY_ATTRIBUTES, *PROMPT_ATTRIBUTES)},
}


def checker_scores(
    readings: dict[str, list[str]], wanted: Sequence[dict[str, str]]
) -> dict[str, list[float]]:
    """Per-image 0/1 scores of the checker's readings against the wanted scenes.

    Args:
        readings: the checker's class name per attribute, each a list of N (``AttributeChecker.predict``).
        wanted: N scenes asked for (shape, colour, pattern: the concept's identity; background, position, size:
            the prompt's context).

    Returns:
        ``{column: [N floats in {0, 1}]}`` for every column of :data:`CHECKER_COLUMNS`.
    """
    n = len(wanted)
    if any(len(readings[a]) != n for a in (*IDENTITY_ATTRIBUTES, *PROMPT_ATTRIBUTES)):
        raise ValueError(f"readings and wanted scenes differ in length ({n} wanted)")
    hit = {
        a: [float(readings[a][i] == wanted[i][a]) for i in range(n)]
        for a in (*IDENTITY_ATTRIBUTES, *PROMPT_ATTRIBUTES)
    }
    out = {f"{a}_acc": hit[a] for a in hit}
    out["identity_acc"] = [float(all(hit[a][i] for a in IDENTITY_ATTRIBUTES)) for i in range(n)]
    out["prompt_acc"] = [float(all(hit[a][i] for a in PROMPT_ATTRIBUTES)) for i in range(n)]
    return {c: out[c] for c in CHECKER_COLUMNS}


class CheckerMetric:
    """The attribute checker as a metric on generated images in [0, 1].

    Args:
        path: checker folder (``AttributeChecker.save_pretrained``).
        device: device of the checker.
    """

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        self.path = str(path)
        self.model = AttributeChecker.from_pretrained(path).float().eval().to(device)
        self.model.requires_grad_(False)
        self.size = 32  # the world's resolution, which the checker was trained at

    @torch.no_grad()
    def read(self, images: Tensor) -> dict[str, list[str]]:
        """The checker's reading of (N, 3, H, W) images in [0, 1] (resized to 32 px if needed)."""
        x = images.float().to(next(self.model.parameters()).device)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        return self.model.predict(x * 2 - 1)

    def score(self, images: Tensor, wanted: Sequence[dict[str, str]]) -> dict[str, list[float]]:
        """:func:`checker_scores` of the checker's readings of ``images``."""
        return checker_scores(self.read(images), wanted)

    def describe(self) -> dict[str, Any]:
        return {
            "backbone": self.path,
            "preprocessing": f"[0, 1] -> resized to {self.size} px (bilinear, antialiased) -> [-1, 1]",
            "pairing": "each image against the scene its prompt asked for: identity = shape, colour and "
            "pattern all the concept's; prompt = background, position and size all as the prompt says",
        }


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


def nearest_word_table(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Method x concept nearest words and each method-setting's semantic share.

    The semantic share is the fraction of concepts whose v* has one of the concept's own identity words
    (colour, pattern, shape) as its nearest word; rows without a nearest word (no learned v*) are left out.

    Args:
        rows: typed result rows with ``nearest_word`` and the concept's identity (from ``attributes``).

    Returns:
        ``{"words": {"method/setting": {concept: word}}, "semantic_share": {"method/setting": share}}``.
    """
    words: dict[str, dict[str, str]] = defaultdict(dict)
    own: dict[str, set[str]] = {}
    for r in rows:
        if r.get("nearest_word"):
            words[f"{r['method']}/{r['setting']}"][r["concept"]] = r["nearest_word"]
            own[r["concept"]] = set(str(r.get("concept_words") or "").split())
    share = {
        key: sum(w in own[c] for c, w in by_concept.items()) / len(by_concept)
        for key, by_concept in words.items()
    }
    return {"words": {k: dict(sorted(v.items())) for k, v in words.items()}, "semantic_share": share}


def format_word_table(table: dict[str, Any]) -> str:
    """A Markdown table: a row per method/setting, a column per concept, and the semantic share."""
    concepts = sorted({c for by in table["words"].values() for c in by})
    lines = [
        "| method/setting | " + " | ".join(concepts) + " | semantic share |",
        "|" + "---|" * (len(concepts) + 2),
    ]
    for key, by in table["words"].items():
        cells = [by.get(c, "-") for c in concepts]
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {table['semantic_share'][key]:.2f} |")
    return "\n".join(lines)
