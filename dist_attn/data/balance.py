"""Load balance of packed documents under context parallelism: attended (query, key) pairs per rank.

With documents, causal attention costs token i of a document ``pos(i) + 1`` pairs (the keys of its
document at or before it), or ``min(pos(i), W) + 1`` with a left window W. Rank r of a CP group does
the pairs of the queries it holds, so its work is ``sum over its tokens of pairs(i)``; the slowest rank
sets the step time. ``imbalance = max / mean`` over ranks (1.0 is perfect).

Without documents the zigzag layout balances causal work exactly; with many short documents every
token costs about the same and both layouts are balanced; a few long documents make the cost grow
along each of them, which zigzag spreads but contiguous does not. Measure it with::

    python -m dist_attn.data.balance --seq-len 131072 --world 2 4 8
"""
from __future__ import annotations

import argparse
from typing import Optional

import numpy as np

from dist_attn.layout import check_layout, check_seq_len, num_chunks, rank_chunks


def long_tail_lengths(total: int, seed: int = 0, median: int = 512, sigma: float = 1.6) -> np.ndarray:
    """Document lengths summing to ``total``: log-normal (many short, a few long), the last one cut.
    The defaults give a median of 512 tokens and a tail past 30K, like web text and books mixed."""
    rng = np.random.default_rng(seed)
    out, n = [], 0
    while n < total:
        d = int(min(max(1, round(rng.lognormal(np.log(median), sigma))), total - n))
        out.append(d)
        n += d
    return np.asarray(out, dtype=np.int64)


def pairs_per_token(cu_seqlens, window: Optional[int] = None) -> np.ndarray:
    """Causal keys each token attends: ``pos_in_document + 1``, capped at ``window + 1``."""
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    lengths = np.diff(cu)
    pos = np.arange(cu[-1]) - np.repeat(cu[:-1], lengths)
    pairs = pos + 1
    return pairs if window is None else np.minimum(pairs, window + 1)


def pairs_per_rank(cu_seqlens, world_size: int, layout: str, window: Optional[int] = None) -> np.ndarray:
    """``[P]`` attended pairs of each rank's queries in ``layout`` over the packed sequence."""
    check_layout(layout)
    pairs = pairs_per_token(cu_seqlens, window)
    check_seq_len(len(pairs), world_size, layout, "pairs_per_rank")
    chunks = pairs.reshape(num_chunks(world_size, layout), -1).sum(axis=1)
    return np.array([sum(chunks[c] for c in rank_chunks(r, world_size, layout)) for r in range(world_size)])


def imbalance_table(seq_len: int, worlds=(2, 4, 8), seeds=range(8), window: Optional[int] = None) -> list:
    """Rows ``(P, layout, mean max/mean over seeds, worst max/mean)`` for long-tailed documents."""
    rows = []
    for p in worlds:
        for layout in ("zigzag", "contiguous"):
            ratios = []
            for seed in seeds:
                cu = np.concatenate([[0], np.cumsum(long_tail_lengths(seq_len, seed))])
                w = pairs_per_rank(cu, p, layout, window)
                ratios.append(w.max() / w.mean())
            rows.append((p, layout, float(np.mean(ratios)), float(np.max(ratios))))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dist_attn.data.balance", description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=131072)
    ap.add_argument("--world", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--window", type=int, default=None)
    a = ap.parse_args(argv)
    print(f"| P | layout | max/mean (mean of {a.seeds} seeds) | worst |\n|---|---|---|---|")
    for p, layout, mean, worst in imbalance_table(a.seq_len, a.world, range(a.seeds), a.window):
        print(f"| {p} | {layout} | {mean:.3f} | {worst:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
