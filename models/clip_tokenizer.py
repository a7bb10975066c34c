"""The real CLIP tokenizer (49,408 entries), built offline from OpenAI's BPE merge list.

Stable Diffusion 1.x uses OpenAI's CLIP tokenizer unchanged. Its vocabulary is fully determined by the BPE
merge file shipped in ``models/assets/clip_bpe`` (see the NOTICE there): the 256 byte-level symbols, the same
256 with the end-of-word marker ``</w>``, the first 48,894 merges joined, then ``<|startoftext|>`` and
``<|endoftext|>``. :func:`write_clip_tokenizer` writes the ``vocab.json`` / ``merges.txt`` pair that
``transformers.CLIPTokenizer.from_pretrained`` reads, so no hub access is ever needed.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from transformers import CLIPTokenizer

BPE_FILE = Path(__file__).parent / "assets" / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408
# CLIP keeps 49152 - 256 - 2 merges: the vocabulary size minus the two special tokens and the 256 byte
# symbols that appear twice (with and without ``</w>``).
_NUM_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def clip_vocab_and_merges(bpe_file: Path = BPE_FILE) -> tuple[dict[str, int], list[str]]:
    """Returns CLIP's vocabulary (token -> id) and its merge list (``"a b"`` strings)."""
    with gzip.open(bpe_file, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : _NUM_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(f"{bpe_file}: expected {CLIP_VOCAB_SIZE} CLIP tokens, built {len(vocab)}")
    return vocab, merges


def write_clip_tokenizer(out_dir: str | Path, model_max_length: int = 77) -> Path:
    """Writes a ``CLIPTokenizer`` folder (Stable Diffusion 1.x settings) to ``out_dir``.

    Args:
        out_dir: folder to create; it can then be read by ``CLIPTokenizer.from_pretrained(out_dir)``.
        model_max_length: padded prompt length (77 in every Stable Diffusion release).

    Returns:
        The folder path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "model_max_length": model_max_length,
        "do_lower_case": True,
        "errors": "replace",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return out


def load_clip_tokenizer(name_or_path: str | Path, subfolder: str = "") -> CLIPTokenizer:
    """Loads a CLIP tokenizer and checks that it holds the full CLIP vocabulary.

    With ``HF_HUB_OFFLINE=1`` an uncached hub id silently yields a 2-token tokenizer; this refuses it.
    """
    kwargs = {"subfolder": subfolder} if subfolder else {}
    tok = CLIPTokenizer.from_pretrained(str(name_or_path), **kwargs)
    if tok.vocab_size < CLIP_VOCAB_SIZE:
        raise ValueError(
            f"tokenizer at {name_or_path!r} (subfolder {subfolder!r}) has {tok.vocab_size} entries, expected "
            f"{CLIP_VOCAB_SIZE}: it is not a CLIP tokenizer or it was not found offline; pass a local folder"
        )
    return tok
