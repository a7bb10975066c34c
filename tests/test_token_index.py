"""Tests for the nearest-token index used by the nearest-neighbour contrastive loss."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPTextConfig, CLIPTextModel

from models.clip_tokenizer import load_clip_tokenizer, write_clip_tokenizer
from models.token_index import TokenIndex

VOCAB, DIM, NUM_QUERIES = 5000, 64, 64
# Per-dimension noise added to table rows: queries stay closest to their source row, like a v* that has
# drifted from a real word, but are not copies of it.
NOISE = 0.5


def _random_table(vocab: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(vocab, dim, generator=torch.Generator().manual_seed(seed))


def _tokens(vocab: int) -> list[str]:
    return [f"tok{i}</w>" for i in range(vocab)]


def _near_queries(table: torch.Tensor, num: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (num, D) queries near random rows of ``table`` and the (num,) source rows."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, table.shape[0], (num,), generator=gen)
    return table[rows] + NOISE * torch.randn(num, table.shape[1], generator=gen), rows


def _brute_force(table: torch.Tensor, keep: torch.Tensor | None, queries: torch.Tensor, k: int):
    """Independent reference: (Q, k) cosine scores and vocabulary ids over the kept rows (None: all)."""
    rows_kept = table if keep is None else table[keep]
    sims = F.normalize(queries, dim=-1) @ F.normalize(rows_kept, dim=-1).T
    scores, rows = sims.topk(k, dim=-1)
    return scores, rows if keep is None else keep[rows]


@pytest.fixture(scope="module")
def table() -> torch.Tensor:
    return _random_table(VOCAB, DIM, seed=0)


@pytest.fixture(scope="module")
def exact(table) -> TokenIndex:
    return TokenIndex.build(table, _tokens(VOCAB), mode="exact")


@pytest.fixture(scope="module")
def hnsw(table) -> TokenIndex:
    return TokenIndex.build(table, _tokens(VOCAB), mode="hnsw")


@pytest.fixture(scope="module")
def clip_tokenizer_dir(tmp_path_factory):
    return write_clip_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"))


@pytest.fixture(scope="module")
def clip_tokenizer(clip_tokenizer_dir):
    return load_clip_tokenizer(clip_tokenizer_dir)


def _text_encoder(vocab_size: int, seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
    )
    return CLIPTextModel(config).eval()


def test_exact_equals_torch_brute_force(table, exact):
    queries, _ = _near_queries(table, NUM_QUERIES, seed=1)
    k = 5
    result = exact.search(queries, k=k)
    torch_result = TokenIndex.build(table, _tokens(VOCAB), mode="torch").search(queries, k=k)
    ref_scores, ref_ids = _brute_force(table, None, queries, k)

    assert result.ids.shape == result.scores.shape == (NUM_QUERIES, k)
    assert result.ids.dtype == torch.long and result.scores.dtype == torch.float32
    assert torch.equal(result.ids, ref_ids) and torch.equal(torch_result.ids, ref_ids)
    torch.testing.assert_close(result.scores, ref_scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch_result.scores, ref_scores, atol=1e-5, rtol=0)


def test_exact_equals_torch_on_real_size_table():
    """The CLIP-L table shape (49,408 x 768); a few queries keep it fast."""
    vocab, dim, num_queries, k = 49408, 768, 8, 16
    big = _random_table(vocab, dim, seed=2)
    queries, rows = _near_queries(big, num_queries, seed=3)
    result = TokenIndex.build(big, [""] * vocab, mode="exact").search(queries, k=k)
    ref_scores, ref_ids = _brute_force(big, None, queries, k)
    assert torch.equal(result.ids, ref_ids)
    assert torch.equal(result.ids[:, 0], rows)
    torch.testing.assert_close(result.scores, ref_scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["near_rows", "random"])
def test_hnsw_recall_at_1(table, exact, hnsw, kind):
    if kind == "near_rows":
        queries, _ = _near_queries(table, NUM_QUERIES, seed=4)
    else:
        queries = torch.randn(NUM_QUERIES, DIM, generator=torch.Generator().manual_seed(5))
    assert hnsw.ef_search == 64
    approx, truth = hnsw.search(queries, k=1), exact.search(queries, k=1)
    recall = (approx.ids == truth.ids).float().mean().item()
    assert recall >= 0.95, f"hnsw recall@1 {recall:.3f} on {kind} queries"
    # A returned neighbour's score is its true cosine, whichever neighbour it is.
    got = F.normalize(queries, dim=-1) @ F.normalize(table, dim=-1).T
    torch.testing.assert_close(approx.scores[:, 0], got.gather(1, approx.ids).squeeze(1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["exact", "hnsw", "torch"])
def test_excluded_ids_never_returned(table, mode):
    vocab = VOCAB // 5  # a smaller table keeps the HNSW build fast
    small, excluded = table[:vocab], torch.arange(0, vocab, 3)
    index = TokenIndex.build(small, _tokens(vocab), exclude_ids=excluded.tolist(), mode=mode)
    assert len(index) == vocab - len(excluded)
    # Queries equal to excluded rows: their best match would be themselves.
    queries = small[excluded[:NUM_QUERIES]]
    result = index.search(queries, k=10)
    assert not torch.isin(result.ids, excluded).any()
    if mode != "hnsw":
        keep = torch.tensor([i for i in range(vocab) if i % 3])
        assert torch.equal(result.ids, _brute_force(small, keep, queries, k=10)[1])


def test_exclude_ids_beyond_table_are_ignored(table):
    index = TokenIndex.build(table, _tokens(VOCAB), exclude_ids=[VOCAB, VOCAB + 7, 1])
    assert len(index) == VOCAB - 1


@pytest.mark.parametrize("mode", ["exact", "torch"])
def test_tokens_match_ids(table, mode):
    tokens = _tokens(VOCAB)
    result = TokenIndex.build(table, tokens, mode=mode).search(table[:NUM_QUERIES], k=3)
    assert len(result.tokens) == NUM_QUERIES and all(len(row) == 3 for row in result.tokens)
    assert result.tokens == [[tokens[i] for i in row] for row in result.ids.tolist()]
    assert result.ids[:, 0].tolist() == list(range(NUM_QUERIES))


def test_queries_any_dtype_and_grad(table, exact):
    queries = table[:8].to(torch.bfloat16).requires_grad_(True)
    result = exact.search(queries * 2, k=2)
    assert not result.ids.requires_grad and not result.scores.requires_grad
    assert result.ids.device == queries.device and result.scores.dtype == torch.float32
    assert result.ids[:, 0].tolist() == list(range(8))


def test_errors(table, exact):
    queries = table[:2]
    for bad_k in (0, VOCAB + 1):
        with pytest.raises(ValueError, match=rf"k must be in \[1, {VOCAB}\].*got {bad_k}"):
            exact.search(queries, k=bad_k)
    with pytest.raises(ValueError, match=rf"\(Q, {DIM}\).*got \(2, {DIM + 1}\) \(dim {DIM + 1}\)"):
        exact.search(torch.randn(2, DIM + 1), k=1)
    with pytest.raises(ValueError, match="unknown TokenIndex mode 'ivf'"):
        TokenIndex.build(table, _tokens(VOCAB), mode="ivf")
    with pytest.raises(ValueError, match="3 token strings for an embedding table of 5000 rows"):
        TokenIndex.build(table, ["a", "b", "c"])
    with pytest.raises(ValueError, match="nothing to index"):
        TokenIndex.build(table[:2], ["a", "b"], exclude_ids=[0, 1])
    with pytest.raises(ValueError, match="hnsw_m must be >= 1"):
        TokenIndex.build(table, _tokens(VOCAB), mode="hnsw", hnsw_m=0)


def test_from_text_encoder_default_excludes_special_and_placeholder(clip_tokenizer_dir):
    tokenizer = load_clip_tokenizer(clip_tokenizer_dir)
    text_encoder = _text_encoder(tokenizer.vocab_size)
    tokenizer.add_tokens(["<s*>"])
    text_encoder.resize_token_embeddings(len(tokenizer))
    placeholder = tokenizer.convert_tokens_to_ids("<s*>")
    weight = text_encoder.get_input_embeddings().weight

    index = TokenIndex.from_text_encoder(text_encoder, tokenizer)
    excluded = [*tokenizer.all_special_ids, placeholder]
    assert len(index) == weight.shape[0] - len(set(excluded))
    result = index.search(weight[excluded], k=5)
    assert not torch.isin(result.ids, torch.tensor(excluded)).any()

    dog = tokenizer.convert_tokens_to_ids("dog</w>")
    hit = index.search(weight[[dog]], k=1)
    assert hit.ids.item() == dog and hit.tokens == [["dog</w>"]]


def test_from_text_encoder_explicit_exclude_ids(clip_tokenizer):
    text_encoder = _text_encoder(clip_tokenizer.vocab_size)
    weight = text_encoder.get_input_embeddings().weight
    index = TokenIndex.from_text_encoder(text_encoder, clip_tokenizer, exclude_ids=[5, 6])
    assert len(index) == weight.shape[0] - 2
    assert not torch.isin(index.search(weight[[5, 6]], k=3).ids, torch.tensor([5, 6])).any()


@pytest.mark.parametrize(("mode", "vocab_size"), [("exact", 49408), ("hnsw", 500)])
def test_cache_loads_instead_of_rebuilding(clip_tokenizer, tmp_path, mode, vocab_size):
    text_encoder = _text_encoder(vocab_size)
    queries = text_encoder.get_input_embeddings().weight[:16] + 0.1
    first = TokenIndex.from_text_encoder(text_encoder, clip_tokenizer, mode=mode, cache_dir=tmp_path)
    assert not first.loaded_from_cache and first.cache_path.exists()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert [f.rsplit(".", 1)[1] for f in files] == ["faiss", "json", "npy"]
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}

    ef_search = 100
    second = TokenIndex.from_text_encoder(
        text_encoder, clip_tokenizer, mode=mode, cache_dir=tmp_path, ef_search=ef_search
    )
    assert second.loaded_from_cache and second.cache_path == first.cache_path
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == mtimes
    if mode == "hnsw":
        assert second.ef_search == ef_search
    a, b = first.search(queries, k=4), second.search(queries, k=4)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.scores, b.scores) and a.tokens == b.tokens


def test_cache_key_depends_on_table_and_params(clip_tokenizer, tmp_path):
    text_encoder = _text_encoder(1000)
    TokenIndex.from_text_encoder(text_encoder, clip_tokenizer, cache_dir=tmp_path)
    other = TokenIndex.from_text_encoder(text_encoder, clip_tokenizer, exclude_ids=[3], cache_dir=tmp_path)
    assert not other.loaded_from_cache
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight[0, 0] += 1.0
    changed = TokenIndex.from_text_encoder(text_encoder, clip_tokenizer, cache_dir=tmp_path)
    assert not changed.loaded_from_cache
    assert len(list(tmp_path.glob("*.faiss"))) == 3


@pytest.mark.parametrize("victim", ["faiss", "json", "npy"])
def test_corrupt_cache_warns_and_rebuilds(clip_tokenizer, tmp_path, victim):
    text_encoder = _text_encoder(1000)
    queries = text_encoder.get_input_embeddings().weight[:8]
    first = TokenIndex.from_text_encoder(text_encoder, clip_tokenizer, cache_dir=tmp_path)
    path = first.cache_path.with_suffix(f".{victim}")
    path.write_bytes(b"not a valid cache file")

    with pytest.warns(UserWarning, match="unusable.*rebuilding"):
        rebuilt = TokenIndex.from_text_encoder(text_encoder, clip_tokenizer, cache_dir=tmp_path)
    assert not rebuilt.loaded_from_cache
    assert torch.equal(rebuilt.search(queries, k=3).ids, first.search(queries, k=3).ids)
    # The entry was rewritten (atomically, no temp files left) and now loads silently.
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = TokenIndex.from_text_encoder(text_encoder, clip_tokenizer, cache_dir=tmp_path)
    assert again.loaded_from_cache
