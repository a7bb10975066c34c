"""Benchmarks the nearest-token lookup: torch brute force vs FAISS exact vs FAISS HNSW.

Usage::

    python -m benchmarks.bench_token_index [--vocab 49408] [--dim 768] [--queries 64] [--ks 1 16]

The table is random normal (seeded), not real CLIP weights (none are available offline): random
high-dimensional data is a hard case for HNSW, so its recall here is a pessimistic estimate. Queries are
table rows plus Gaussian noise, like a predicted v* that has drifted from a real word. Every method goes
through ``TokenIndex`` (normalisation and id mapping included), so the times are what the loss pays.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import torch

from models.token_index import TokenIndex

METHODS = {"torch brute force": "torch", "faiss exact (FlatIP)": "exact", "faiss HNSW": "hnsw"}


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _median_search_s(index: TokenIndex, queries: torch.Tensor, k: int, repeats: int) -> float:
    index.search(queries, k=k)  # warm-up: first-call allocations, lazy thread-pool start
    return statistics.median(_timed(lambda: index.search(queries, k=k))[0] for _ in range(repeats))


def _recall(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean fraction of each (Q, k) exact top-k row found in the approximate top-k row."""
    hits = [len(set(a) & set(e)) / len(e) for a, e in zip(approx.tolist(), exact.tolist())]
    return sum(hits) / len(hits)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, default=49408, help="table rows V (CLIP: 49,408)")
    parser.add_argument("--dim", type=int, default=768, help="embedding width D (SD-1.x: 768)")
    parser.add_argument("--queries", type=int, default=64, help="queries per search call Q")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 16], help="neighbour counts k to time")
    parser.add_argument("--repeats", type=int, default=11, help="timed searches per setting (median)")
    parser.add_argument("--noise", type=float, default=0.5, help="per-dimension query noise (rows: std 1)")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--ef-search", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    gen = torch.Generator().manual_seed(args.seed)
    table = torch.randn(args.vocab, args.dim, generator=gen)
    rows = torch.randint(0, args.vocab, (args.queries,), generator=gen)
    queries = table[rows] + args.noise * torch.randn(args.queries, args.dim, generator=gen)
    tokens = [""] * args.vocab
    hnsw = {"hnsw_m": args.hnsw_m, "ef_construction": args.ef_construction, "ef_search": args.ef_search}

    print(
        f"Table {args.vocab} x {args.dim} float32, random normal (seed {args.seed}); {args.queries} queries = "
        f"table rows + N(0, {args.noise}^2) noise; median of {args.repeats} searches after a warm-up."
    )
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), faiss {faiss.__version__}, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}, load average "
        f"{os.getloadavg()[0]:.1f} at start); HNSW {hnsw}.\n"
    )

    indices, build_s = {}, {}
    for name, mode in METHODS.items():
        build_s[name], indices[name] = _timed(
            lambda mode=mode: TokenIndex.build(table, tokens, mode=mode, **hnsw)
        )

    search_ms: dict[tuple[str, int], float] = {}
    recall: dict[tuple[str, int], float] = {}
    for k in args.ks:
        truth = indices["faiss exact (FlatIP)"].search(queries, k=k).ids
        for name, index in indices.items():
            search_ms[name, k] = 1e3 * _median_search_s(index, queries, k, args.repeats)
            recall[name, k] = _recall(index.search(queries, k=k).ids, truth)

    header = ["method", "build (s)"]
    for k in args.ks:
        header += [f"search k={k} (ms)", "speed-up vs torch", f"recall@{k} vs exact"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for name in METHODS:
        cells = [name, f"{build_s[name]:.2f}"]
        for k in args.ks:
            ms = search_ms[name, k]
            cells += [f"{ms:.1f}", f"{search_ms['torch brute force', k] / ms:.2f}x", f"{recall[name, k]:.3f}"]
        print("| " + " | ".join(cells) + " |")
    top1 = indices["faiss exact (FlatIP)"].search(queries, k=1).ids[:, 0]
    source_top1 = (top1 == rows).float().mean().item()
    print(f"\nExact top-1 is the query's source row for {source_top1:.3f} of queries.")
    if args.out:
        result = {
            "args": vars(args),
            "build_s": build_s,
            "search_ms": {f"{name} k={k}": v for (name, k), v in search_ms.items()},
            "recall": {f"{name} k={k}": v for (name, k), v in recall.items()},
            "exact_top1_is_source": source_top1,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
