"""The nearest-word table: the nearest word of each method's learned v* per concept, and the semantic share."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any


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
