"""Load balance of packed documents under context parallelism: zigzag vs contiguous, P = 2..8.

Packed sequences of a long-tailed document-length distribution (log-normal lengths: many short
documents, a few long ones, from a seed) are cut over P ranks. For each layout and P this reports
the visible (query, key) pairs per rank under the causal document mask (attention FLOPs are
proportional to them), as max/mean over ranks (1.00 = balanced), averaged over several packed
sequences, and the ring traffic that survives skipping (blocks sent per rank, of P-1). The pair
counts come from :func:`dist_attn.documents.doc_cost`, the function the cost model uses.

Timing: on a small sequence, the local work of every rank (forward + backward of the torch CPU kernel
for its query chunks against the keys they see, which is what the ring computes once all blocks
have arrived) is timed on one thread; the slowest rank sets the step time. ``python -m
benchmarks.doc_balance`` writes ``benchmarks/results/doc_balance_cpu.md``.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from dist_attn.documents import doc_cost, visible_pairs
from dist_attn.kernels.flash_attn import torch_kernel
from dist_attn.layout import rank_ranges

RESULTS = Path(__file__).resolve().parent / "results"


def packed_offsets(seq_len: int, seed: int, median: float, sigma: float = 1.3) -> list:
    """cu_seqlens of one packed sequence: log-normal document lengths (>= 1), the last one cut at S."""
    rng = np.random.default_rng(seed)
    cu = [0]
    while cu[-1] < seq_len:
        n = max(1, int(rng.lognormal(np.log(median), sigma)))
        cu.append(min(seq_len, cu[-1] + n))
    return cu


def pair_table(seq_len: int, median: float, worlds, seeds, window=None) -> list:
    rows = []
    for p in worlds:
        for layout in ("zigzag", "contiguous"):
            ratios, sends = [], []
            for seed in seeds:
                cost = doc_cost(packed_offsets(seq_len, seed, median), window, p, layout)
                ratios.append(cost["pairs_max_over_mean"])
                sends.append(np.mean(cost["ring_sends"]))
            rows.append(dict(P=p, layout=layout, ratio_mean=float(np.mean(ratios)), ratio_worst=float(np.max(ratios)),
                             sends=float(np.mean(sends))))
    return rows


def balanced_ratio(cu: list, p: int, per_rank: int) -> float:
    """max/mean pairs of a document-aware layout (not implemented in the strategies): the sequence cut
    into p·per_rank equal chunks, each rank given ``per_rank`` of them by greedy longest-first
    assignment on the chunks' visible pairs (a chunk's cost depends only on its queries)."""
    s = cu[-1]
    n = p * per_rank
    c = s // n
    cost = [visible_pairs((i * c, (i + 1) * c), (0, s), tuple(cu), True, None, s) for i in range(n)]
    load, count = [0] * p, [0] * p
    for i in sorted(range(n), key=lambda i: -cost[i]):
        r = min((r for r in range(p) if count[r] < per_rank), key=lambda r: load[r])
        load[r] += cost[i]
        count[r] += 1
    return max(load) / (sum(load) / p)


def rank_times(seq_len: int, cu: list, p: int, layout: str, heads: int = 2, d: int = 64, reps: int = 3) -> list:
    """Seconds of forward + backward of each rank's local work (its query chunks vs all keys, masked)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, seq_len, heads, d, generator=g) for _ in range(3))
    cu_t = torch.tensor(cu, dtype=torch.int64)
    times = []
    for r in range(p):
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            for a, b in rank_ranges(seq_len, r, p, layout):
                qc = q[:, a:b].contiguous()
                out, lse = torch_kernel.fwd(qc, k, v, causal=True, q_offset=a, cu_seqlens=cu_t)
                torch_kernel.bwd(out, qc, k, v, out, lse, causal=True, q_offset=a, cu_seqlens=cu_t)
            best = min(best, time.perf_counter() - t0)
        times.append(best)
    return times


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=107520, help="pair counts: global tokens (divisible by 2P for P = 2..8)")
    ap.add_argument("--median", type=float, default=1024.0, help="median document length")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--time-seq-len", type=int, default=8192, help="timed run: global tokens")
    ap.add_argument("--time-median", type=float, default=512.0)
    ap.add_argument("--out", default=str(RESULTS / "doc_balance_cpu.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    worlds = range(2, 9)
    seeds = range(args.seeds)
    docs = pair_table(args.seq_len, args.median, worlds, seeds)
    win = pair_table(args.seq_len, args.median, worlds, seeds, window=4096)
    lines = [f"# Packed documents: per-rank load, zigzag vs contiguous (CPU, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores)", "",
             f"`python -m benchmarks.doc_balance`. Documents: log-normal lengths, median {args.median:.0f}, sigma 1.3, "
             f"packed into S = {args.seq_len} tokens; {args.seeds} packed sequences (seeds 0..{args.seeds - 1}). "
             "Causal document mask. `max/mean` = the busiest rank's visible (query, key) pairs over the mean "
             "(1.00 = balanced; the step waits for the busiest rank), mean and worst over the seeds. `blocks sent` = "
             "K/V blocks the skipping ring sends per rank (P-1 without documents).", "",
             "| P | layout | max/mean (mean) | max/mean (worst) | ring blocks sent / rank | same + window 4096: max/mean | blocks sent |",
             "|---|---|---|---|---|---|---|"]
    for a, b in zip(docs, win):
        lines.append(f"| {a['P']} | {a['layout']} | {a['ratio_mean']:.3f} | {a['ratio_worst']:.3f} | {a['sends']:.2f} "
                     f"of {a['P'] - 1} | {b['ratio_mean']:.3f} | {b['sends']:.2f} |")
    lines += ["", "## What a document-aware layout could reach (measured on the same sequences, not implemented)", "",
              "The sequence cut into P·f equal chunks, f per rank, assigned greedily (longest first) by visible "
              "pairs; max/mean, mean over the seeds. f = 2 has zigzag's granularity.", "",
              "| P | zigzag | f = 2 | f = 4 | f = 8 |", "|---|---|---|---|---|"]
    for p in (2, 4, 8):
        cus = [packed_offsets(args.seq_len, seed, args.median) for seed in seeds]
        zz = next(r["ratio_mean"] for r in docs if r["P"] == p and r["layout"] == "zigzag")
        fs = [np.mean([balanced_ratio(cu, p, f) for cu in cus]) for f in (2, 4, 8)]
        lines.append(f"| {p} | {zz:.3f} | " + " | ".join(f"{x:.3f}" for x in fs) + " |")
    lines += ["", f"## Slowest rank, measured (torch CPU kernel, 1 thread, S = {args.time_seq_len}, median document "
              f"{args.time_median:.0f}, Hq = Hkv = 2, D = 64, forward + backward of each rank's local work)", "",
              "| P | layout | slowest rank s | mean rank s | slowest/mean | pairs max/mean |", "|---|---|---|---|---|---|"]
    cu = packed_offsets(args.time_seq_len, 0, args.time_median)
    load0 = os.getloadavg()[0]
    for p in (2, 4, 8):
        for layout in ("zigzag", "contiguous"):
            t = rank_times(args.time_seq_len, cu, p, layout)
            ratio = doc_cost(cu, None, p, layout)["pairs_max_over_mean"]
            lines.append(f"| {p} | {layout} | {max(t):.3f} | {np.mean(t):.3f} | {max(t) / np.mean(t):.2f} | {ratio:.3f} |")
    lines += ["", f"Load average during the timed run: {load0:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
              "(other jobs share the machine: times are noisy; the pair counts are exact). On CPU a rank's time also "
              "carries per-tile overhead (zigzag makes two kernel calls per rank), so slowest/mean tracks the pair "
              "ratio only loosely at this size."]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
