"""Decoding speed vs context length: tokens/s of one incremental step (dist_attn.model.generate.step)
for a pure-linear, a hybrid and a pure-softmax model of the same size.

    python -m benchmarks.decode                                   # CPU, 256..16K, results/decode_cpu.md
    python -m benchmarks.decode --lengths 1024 65536 --device cuda --out benchmarks/results/decode_gpu.md

A linear layer's step reads and writes its fixed ``[H, Dk, Dv]`` state: constant time and memory per
token at any context. A softmax layer's step reads its whole KV cache: time and memory grow linearly
with the context. The cache at context C is filled with random values (the step's cost does not
depend on them), so long contexts need no prefill; each point is the best over ``--repeats`` runs
of ``--steps`` steps (best of the repeats: other jobs only add time). Memory column: the decode state (KV caches + recurrent states) in MiB.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from dist_attn.model import HybridLM, ModelConfig
from dist_attn.model.generate import DecodeCache, KVCache, decoder_for, step

PATTERNS = {"linear (LLLL)": "LLLL", "hybrid (LLLF)": "LLLF", "softmax (FFFF)": "FFFF"}


def _cache_at(model, batch: int, context: int, extra: int, device) -> DecodeCache:
    """A cache as after ``context`` tokens (random contents), with room for ``extra`` more."""
    cache = DecodeCache(length=context)
    g = torch.Generator(device="cpu").manual_seed(0)
    for blk in model.blocks:
        state = decoder_for(blk.mixer).init_state(blk.mixer, batch, device, torch.float32)
        if isinstance(state, KVCache):
            m = blk.mixer
            k = torch.randn(batch, context + extra, m.hkv, m.hd, generator=g).to(device)
            state = KVCache(k, torch.randn_like(k), length=context)
        elif isinstance(state, torch.Tensor):
            state = torch.randn(state.shape, generator=g).to(device) * 0.1
        cache.layers.append(state)
    return cache


def _state_bytes(cache: DecodeCache) -> int:
    total = 0
    for s in cache.layers:
        if isinstance(s, KVCache):
            total += 2 * s.length * s.k[0, 0].numel() * s.k.shape[0] * s.k.element_size()
        elif isinstance(s, torch.Tensor):
            total += s.numel() * s.element_size()
        else:
            total += sum(t.numel() * t.element_size() for t in s)
    return total


def measure(pattern: str, lengths: list, *, d_model: int, heads: int, batch: int, steps: int, repeats: int,
            device: str) -> list:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, d_model=d_model, n_layers=len(pattern), n_heads=heads, pattern=pattern,
                      max_seq_len=max(lengths) + steps * (repeats + 1) + 1)
    model = HybridLM(cfg).to(device).eval()
    rows = []
    tok = torch.zeros(batch, dtype=torch.long, device=device)
    for n in lengths:
        cache = _cache_at(model, batch, n, steps * (repeats + 1), device)
        step(model, tok, cache)  # warm-up
        times = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                step(model, tok, cache)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) / steps)
        t = min(times)  # best of the repeats: the machine is shared, contention only adds time
        rows.append(dict(context=n, ms_per_token=1e3 * t, tokens_per_s=batch / t,
                         state_mib=_state_bytes(cache) / 2 ** 20))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "decode_cpu.md"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    results = {name: measure(p, a.lengths, d_model=a.d_model, heads=a.heads, batch=a.batch, steps=a.steps,
                             repeats=a.repeats, device=a.device) for name, p in PATTERNS.items()}
    lines = ["# Decoding speed vs context length", "",
             f"`python -m benchmarks.decode` on {a.device} ({platform.processor() or platform.machine()}, "
             f"{a.threads} thread(s), torch {torch.__version__}; machine shared with other jobs, so compare "
             f"rows within this table, not absolute speeds). Model: 4 layers, d_model {a.d_model}, {a.heads} heads "
             f"(head dim {a.d_model // a.heads}), vocab 256, fp32, batch {a.batch}; one incremental step "
             f"(`dist_attn.model.generate.step`), best of {a.repeats} x {a.steps} steps; state = KV caches + "
             "recurrent states.", "",
             "| model | " + " | ".join(f"{n} ctx: tok/s (state MiB)" for n in a.lengths) + " | slowdown "
             f"{a.lengths[0]} -> {a.lengths[-1]} |",
             "|---|" + "---|" * (len(a.lengths) + 1)]
    for name, rows in results.items():
        cells = [f"{r['tokens_per_s']:.0f} ({r['state_mib']:.2f})" for r in rows]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {rows[0]['tokens_per_s'] / rows[-1]['tokens_per_s']:.2f}x |")
    lines += ["", "The linear model's step cost and state are independent of the context (constant "
              "`[H, D, D]` state per layer); every softmax layer reads its whole KV cache, so its cost and "
              "memory grow linearly with the context; the 3:1 hybrid carries a quarter of the pure-softmax "
              "model's cache and slows down proportionally less."]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
