"""The on-disk cache of built FAISS token indexes (:meth:`models.token_index.TokenIndex.from_text_encoder`).

An entry is three files named by a sha256 of the table bytes, mode, build parameters and kept ids: the index
(``.faiss``), the kept vocabulary ids (``.npy``) and the metadata (``.json``, written last: its presence with a
matching key marks a complete entry). An unusable entry is rebuilt, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import faiss
import numpy as np
import torch
from torch import Tensor

from models.io import atomic_write

CACHE_FORMAT_VERSION = 1


def cache_paths(cache_dir: str | Path, key: str) -> dict[str, Path]:
    """``{"faiss", "npy", "json"}`` paths of the entry for ``key`` (the folder is created)."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    return {ext: cache / f"token_index-{key[:32]}.{ext}" for ext in ("faiss", "npy", "json")}


def save_cached(
    paths: dict[str, Path], index: faiss.Index, vocab_ids: np.ndarray, key: str, mode: str, params: dict
) -> None:
    """Writes an entry, each file atomically, the json last."""
    meta = {"key": key, "format": CACHE_FORMAT_VERSION, "mode": mode, "params": params}
    meta |= {"dim": index.d, "num_indexed": len(vocab_ids), "faiss": faiss.__version__}
    atomic_write(paths["faiss"], lambda p: faiss.write_index(index, p))
    atomic_write(paths["npy"], lambda p: save_npy(p, vocab_ids))
    atomic_write(paths["json"], lambda p: Path(p).write_text(json.dumps(meta, indent=2)))


def cache_key(weight: Tensor, mode: str, params: dict[str, int], vocab_ids: np.ndarray) -> str:
    """sha256 over the raw table bytes (dtype and shape included), mode, build params and kept ids."""
    digest = hashlib.sha256()
    raw = weight.detach().cpu().contiguous()
    digest.update(f"{CACHE_FORMAT_VERSION}|{raw.dtype}|{tuple(raw.shape)}|{mode}|".encode())
    digest.update(json.dumps(params, sort_keys=True).encode())
    # view(uint8) hashes the exact bytes of any dtype (bf16 has no numpy equivalent).
    digest.update(raw.view(-1).view(torch.uint8).numpy().tobytes())
    digest.update(vocab_ids.astype(np.int64).tobytes())
    return digest.hexdigest()


def save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


def load_cached(paths: dict[str, Path], key: str, vocab_ids: np.ndarray, dim: int) -> faiss.Index | None:
    """Returns the cached index if a complete, consistent entry exists; warns and returns None if corrupt."""
    if not paths["json"].exists():
        return None
    try:
        meta = json.loads(paths["json"].read_text())
        if meta.get("key") != key:
            raise ValueError("metadata key does not match")
        cached_ids = np.load(paths["npy"], allow_pickle=False)
        if not np.array_equal(cached_ids, vocab_ids):
            raise ValueError("cached vocabulary ids differ")
        index = faiss.read_index(str(paths["faiss"]))
        if index.d != dim or index.ntotal != len(vocab_ids):
            raise ValueError(f"cached index has d={index.d}, ntotal={index.ntotal}")
    except Exception as err:  # any unreadable entry is rebuilt, never fatal
        warnings.warn(f"token index cache {paths['faiss']} is unusable ({err}); rebuilding", stacklevel=3)
        return None
    return index
