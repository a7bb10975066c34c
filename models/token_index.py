"""Nearest-token lookup over the CLIP text encoder's input-embedding table (cosine, FAISS).

The nearest-neighbour contrastive loss (docs/method.md, "Losses") pulls the predicted word embedding v* toward
its nearest real token embeddings; the dual-path attention builds its hard prompt from the nearest token.
Both only need the vocabulary *ids* of the neighbours: the lookup is non-differentiable by design and
gradients reach v* through the gathered (frozen) neighbour embeddings.

Rows and queries are L2-normalised, so inner product equals cosine similarity. Special tokens and the
placeholder S* are left out of the index, and search returns ids of the original table (not FAISS row ids).

Modes:
    ``"exact"``: ``faiss.IndexFlatIP``, exact.
    ``"hnsw"``: ``faiss.IndexHNSWFlat`` with inner product, approximate; build once and cache it.
    ``"torch"``: brute-force matmul + top-k on the queries' device, the reference for the two others.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models.errors import NonFiniteError
from models.token_index_cache import cache_key, cache_paths, load_cached, save_cached
from models.vocabulary import vocabulary_ids

MODES = ("exact", "hnsw", "torch")
# Bump when the cached files' layout or meaning changes: old entries then get a different key.


@dataclass(frozen=True)
class TokenSearchResult:
    """Top-k neighbours of each query, best first.

    Attributes:
        ids: (Q, k) int64 vocabulary ids (rows of the original embedding table), on the queries' device.
        scores: (Q, k) float32 cosine similarities, on the queries' device.
        tokens: Q lists of k token strings, ``tokens[q][j]`` being the token of ``ids[q, j]``.
    """

    ids: Tensor
    scores: Tensor
    tokens: list[list[str]]


@contextlib.contextmanager
def _faiss_threads(num_threads: int) -> Iterator[None]:
    """Sets FAISS's OpenMP thread count for the block, then restores the previous value."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(num_threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


NON_FINITE_QUERY = (
    "non-finite query (NaN or inf in v*) to the nearest-token index"  # FAISS would crash or lie
)


class TokenIndex:
    """Cosine nearest-neighbour search over a token-embedding table, returning vocabulary ids.

    Build it with :meth:`build` or :meth:`from_text_encoder`; the constructor only assembles parts.

    Attributes:
        mode: one of ``MODES``.
        dim: embedding width D.
        vocab_ids: (N,) int64 vocabulary ids of the indexed rows, in FAISS row order.
        tokens: token string of every vocabulary id (length V, the table's row count).
        loaded_from_cache: True when the FAISS index was read from the cache instead of being built.
        cache_path: the cached ``.faiss`` file used or written, or None.
    """

    ids_in_range = (
        True  #: search returns indexed rows' ids only (FAISS's -1 padding is searched again exactly)
    )

    def __init__(
        self,
        mode: str,
        vocab_ids: np.ndarray,
        tokens: list[str],
        dim: int,
        faiss_index: faiss.Index | None = None,
        table: Tensor | None = None,
        num_threads: int | None = None,
        loaded_from_cache: bool = False,
        cache_path: Path | None = None,
    ) -> None:
        """Assembles an index; prefer :meth:`build`.

        Args:
            mode: one of ``MODES``.
            vocab_ids: (N,) vocabulary id of each indexed row.
            tokens: token string of every vocabulary id (length V).
            dim: embedding width D.
            faiss_index: the FAISS index over the N normalised rows (``"exact"`` and ``"hnsw"``).
            table: (N, D) float32 normalised rows (``"torch"`` mode).
            num_threads: FAISS threads; None means ``torch.get_num_threads()`` (the process's budget).
            loaded_from_cache: whether ``faiss_index`` came from the cache.
            cache_path: the cache file, if any.
        """
        _check_mode(mode)
        if mode == "torch" and table is None:
            raise ValueError("mode 'torch' needs the normalised table")
        if mode != "torch" and faiss_index is None:
            raise ValueError(f"mode {mode!r} needs a faiss index")
        self.mode = mode
        self.vocab_ids = torch.as_tensor(np.asarray(vocab_ids, dtype=np.int64))
        self.tokens = tokens
        self.dim = dim
        self.num_threads = num_threads if num_threads is not None else torch.get_num_threads()
        self.loaded_from_cache = loaded_from_cache
        self.cache_path = cache_path
        self._index = faiss_index
        self._table = table

    def __len__(self) -> int:
        """Number of indexed (searchable) tokens N."""
        return int(self.vocab_ids.numel())

    def __repr__(self) -> str:
        return (
            f"TokenIndex(mode={self.mode!r}, indexed={len(self)}, vocab={len(self.tokens)}, dim={self.dim})"
        )

    @property
    def ef_search(self) -> int | None:
        """HNSW search breadth (higher: better recall, slower); None outside ``"hnsw"`` mode."""
        return int(self._index.hnsw.efSearch) if self.mode == "hnsw" else None

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        if self.mode != "hnsw":
            raise ValueError(f"ef_search only applies to mode 'hnsw', this index is {self.mode!r}")
        _check_positive(ef_search=value)
        self._index.hnsw.efSearch = value

    @classmethod
    def build(
        cls,
        embeddings: Tensor,
        tokens: list[str],
        exclude_ids: Iterable[int] = (),
        mode: str = "exact",
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 64,
        num_threads: int | None = None,
    ) -> TokenIndex:
        """Indexes every row of ``embeddings`` except ``exclude_ids``.

        Args:
            embeddings: (V, D) token-embedding table, any dtype or device; it is copied, never modified.
            tokens: token string of every vocabulary id (length V).
            exclude_ids: vocabulary ids never to return (special tokens, the placeholder). Ids >= V are
                ignored (a placeholder added to the tokenizer but not to the table has no row anyway).
            mode: ``"exact"``, ``"hnsw"`` or ``"torch"``.
            hnsw_m: HNSW graph degree (``"hnsw"`` only).
            ef_construction: HNSW build breadth (``"hnsw"`` only).
            ef_search: HNSW search breadth (``"hnsw"`` only).
            num_threads: FAISS threads; None means ``torch.get_num_threads()``.

        Returns:
            The index.
        """
        _check_mode(mode)
        table, vocab_ids = _prepare(embeddings, tokens, exclude_ids)
        threads = num_threads if num_threads is not None else torch.get_num_threads()
        if mode == "torch":
            return cls(mode, vocab_ids, list(tokens), table.shape[1], table=table, num_threads=threads)
        index = _build_faiss(table.numpy(), mode, hnsw_m, ef_construction, ef_search, threads)
        return cls(mode, vocab_ids, list(tokens), table.shape[1], faiss_index=index, num_threads=threads)

    @classmethod
    def from_text_encoder(
        cls,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        exclude_ids: Iterable[int] = (),
        mode: str = "exact",
        cache_dir: str | Path | None = None,
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 64,
        num_threads: int | None = None,
        vocabulary: Iterable[str] | str | Path | None = None,
    ) -> TokenIndex:
        """Indexes the text encoder's input-embedding table, optionally through an on-disk cache.

        Args:
            text_encoder: a ``transformers`` text model; its ``get_input_embeddings().weight`` (V, D) is used.
            tokenizer: its tokenizer (gives the token strings and the special ids).
            exclude_ids: ids never to return. Empty means: the tokenizer's special ids, the tokens added to
                it beyond its base vocabulary (the placeholder S*), and table rows it has no token for.
            mode: ``"exact"``, ``"hnsw"`` or ``"torch"``.
            cache_dir: folder for the built FAISS index, keyed by a sha256 of the table bytes, mode, build
                parameters and excluded ids; a later call with the same key loads it instead of building.
                Ignored in ``"torch"`` mode (nothing to build).
            hnsw_m: HNSW graph degree.
            ef_construction: HNSW build breadth.
            ef_search: HNSW search breadth (applied after loading too; not part of the cache key).
            num_threads: FAISS threads; None means ``torch.get_num_threads()``.
            vocabulary: a vocabulary filter: only the tokens of these words are searchable (a list of words, or
                the path of a text file with one word per line; see :func:`vocabulary_ids`). Use it when rows of
                the table were never trained (a small text encoder trained on a few hundred words: the other
                rows are initialisation noise) or to restrict neighbours to, e.g., English nouns. None: no filter.

        Returns:
            The index; ``loaded_from_cache`` tells whether the cache was used.
        """
        _check_mode(mode)
        weight = text_encoder.get_input_embeddings().weight.detach()
        num_rows = weight.shape[0]
        num_named = min(len(tokenizer), num_rows)
        tokens = [str(t) for t in tokenizer.convert_ids_to_tokens(list(range(num_named)))]
        tokens += [""] * (num_rows - num_named)
        excluded = set(int(i) for i in exclude_ids)
        if not excluded:
            excluded = set(tokenizer.all_special_ids) | set(range(tokenizer.vocab_size, num_rows))
        if vocabulary is not None:
            allowed = set(vocabulary_ids(tokenizer, vocabulary))
            excluded |= set(range(num_rows)) - allowed
        if mode == "torch" or cache_dir is None:
            return cls.build(
                weight, tokens, excluded, mode, hnsw_m, ef_construction, ef_search, num_threads=num_threads
            )

        table, vocab_ids = _prepare(weight, tokens, excluded)
        threads = num_threads if num_threads is not None else torch.get_num_threads()
        build_params = {"hnsw_m": hnsw_m, "ef_construction": ef_construction} if mode == "hnsw" else {}
        if mode == "hnsw":
            _check_positive(ef_search=ef_search)
        key = cache_key(weight, mode, build_params, vocab_ids)
        paths = cache_paths(cache_dir, key)
        index = load_cached(paths, key, vocab_ids, table.shape[1])
        loaded = index is not None
        if index is None:
            index = _build_faiss(table.numpy(), mode, hnsw_m, ef_construction, ef_search, threads)
            save_cached(paths, index, vocab_ids, key, mode, build_params)
        elif mode == "hnsw":
            index.hnsw.efSearch = ef_search
        return cls(
            mode,
            vocab_ids,
            tokens,
            table.shape[1],
            faiss_index=index,
            num_threads=threads,
            loaded_from_cache=loaded,
            cache_path=paths["faiss"],
        )

    @torch.no_grad()
    def search(self, queries: Tensor, k: int = 1) -> TokenSearchResult:
        """Finds the k most cosine-similar indexed tokens of each query.

        Args:
            queries: (Q, D) query embeddings (e.g. v*), any dtype or device, may require grad (detached).
            k: neighbours per query, 1 <= k <= ``len(self)``.

        Returns:
            The neighbours, best first, with ids and scores on the queries' device.
        """
        if not 1 <= k <= len(self):
            raise ValueError(f"k must be in [1, {len(self)}] (the number of indexed tokens), got {k}")
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(
                f"queries must have shape (Q, {self.dim}) to match the index dim {self.dim}, "
                f"got {tuple(queries.shape)} (dim {queries.shape[-1] if queries.ndim else None})"
            )
        if self.mode == "torch" and not bool(torch.isfinite(queries.detach()).all()):
            raise NonFiniteError(NON_FINITE_QUERY)  # FAISS checks its host copy of the queries instead
        device = queries.device
        if queries.shape[0] == 0:
            empty_ids = torch.empty(0, k, dtype=torch.long, device=device)
            return TokenSearchResult(empty_ids, torch.empty(0, k, device=device), [])
        if self.mode == "torch":
            scores, rows = self._search_torch(queries.detach(), k)
        else:
            scores, rows = self._search_faiss(queries.detach(), k)
        ids = self.vocab_ids[rows]
        tokens = [[self.tokens[i] for i in row] for row in ids.numpy().tolist()]  # host ids: no device read
        return TokenSearchResult(ids.to(device), scores.to(device), tokens)

    def _search_torch(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Brute force on the queries' device; returns (Q, k) scores and (Q, k) cpu row indices."""
        if self._table.device != queries.device:
            self._table = self._table.to(queries.device)
        q = F.normalize(queries.float(), dim=-1)
        scores, rows = (q @ self._table.T).topk(k, dim=-1)
        return scores.float(), rows.cpu()

    def _search_faiss(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """FAISS search on cpu; returns (Q, k) scores and (Q, k) row indices."""
        q = np.ascontiguousarray(F.normalize(queries.float().cpu(), dim=-1).numpy())  # the round trip
        if not np.isfinite(q).all():
            raise NonFiniteError(NON_FINITE_QUERY)
        # More threads than queries only adds OpenMP overhead (both index types split work by query).
        with _faiss_threads(max(1, min(self.num_threads, q.shape[0]))):
            if self.mode == "hnsw":
                params = faiss.SearchParametersHNSW()
                params.efSearch = max(int(self._index.hnsw.efSearch), k)
                scores, rows = self._index.search(q, k, params=params)
            else:
                scores, rows = self._index.search(q, k)
            missing = (rows < 0).any(axis=1)
            if missing.any():
                # HNSW may return fewer than k hits from a poorly connected region: search those queries
                # exactly over the same stored vectors.
                storage = faiss.downcast_index(self._index.storage)
                scores[missing], rows[missing] = storage.search(np.ascontiguousarray(q[missing]), k)
        return torch.from_numpy(scores), torch.from_numpy(rows.astype(np.int64))


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown TokenIndex mode {mode!r}; expected one of {MODES}")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _prepare(embeddings: Tensor, tokens: list[str], exclude_ids: Iterable[int]) -> tuple[Tensor, np.ndarray]:
    """Validates inputs and returns the (N, D) normalised float32 cpu rows kept and their (N,) vocab ids."""
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be a (V, D) table, got shape {tuple(embeddings.shape)}")
    num_rows = embeddings.shape[0]
    if len(tokens) != num_rows:
        raise ValueError(f"got {len(tokens)} token strings for an embedding table of {num_rows} rows")
    excluded = np.fromiter((int(i) for i in exclude_ids), dtype=np.int64)
    if (excluded < 0).any():
        raise ValueError(f"exclude_ids must be non-negative, got {excluded[excluded < 0].tolist()}")
    keep = np.ones(num_rows, dtype=bool)
    keep[excluded[excluded < num_rows]] = False
    vocab_ids = np.flatnonzero(keep).astype(np.int64)
    if vocab_ids.size == 0:
        raise ValueError(f"all {num_rows} rows are excluded: nothing to index")
    table = embeddings.detach().to(device="cpu", dtype=torch.float32)[torch.from_numpy(vocab_ids)]
    return F.normalize(table, dim=-1).contiguous(), vocab_ids


def _build_faiss(
    table: np.ndarray, mode: str, hnsw_m: int, ef_construction: int, ef_search: int, num_threads: int
) -> faiss.Index:
    """Builds an inner-product FAISS index over the (N, D) normalised rows."""
    dim = table.shape[1]
    if mode == "exact":
        index = faiss.IndexFlatIP(dim)
    else:
        _check_positive(hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search)
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
    with _faiss_threads(max(1, num_threads)):
        index.add(np.ascontiguousarray(table, dtype=np.float32))
    return index
