"""Predicted training throughput of hybrid models at scale, from the cost model (no GPU needed).

    python -m benchmarks.simulate                       # H100 grid + the LASP-2 paper comparison (A100)
    python -m benchmarks.simulate --profile h200 --models 7b --gpus 64 256 1024

Models (standard shapes; pattern LLLF = three linear layers, then one full softmax layer, repeated):

* ``1b``: Llama-3.2-1B shapes -- 16 layers, d=2048, 32 query heads x D=64, 8 KV heads, SwiGLU FFN 8192,
  vocabulary 128256 (1.24B parameters). Linear layers: 32 heads, Dk = Dv = 64.
* ``7b``: Llama-2-7B shapes -- 32 layers, d=4096, 32 heads x D=128 (MHA), SwiGLU FFN 11008, vocabulary
  32000 (6.7B parameters). Linear layers: 32 heads, Dk = Dv = 128.

One sequence of N tokens per step over a CP group of all P GPUs (8 per node), bf16, causal, zigzag.
Step time = dense matmuls 6·(matmul params)·N/P / gemm rate + sum over layers of the attention layer's
predicted fwd+bwd time (:func:`dist_attn.cost_model.strategy_cost`). Not modelled: norms and other
elementwise work, activation recomputation, optimizer, data-parallel gradient reduction, memory limits.

Configurations (linear layers / softmax layers):

    LASP-2H   lasp2 / allgather         (the LASP-2 paper's hybrid scheme)
    Ring      linear_ring / zigzag_ring (Ring Attention everywhere; linear_ring is model-only)
    LASP-1    lasp1 / zigzag_ring       (serial state chain; model-only)
    Ulysses   linear_ulysses / ulysses  (n/a when the heads do not split over P)
    USP       lasp2 / usp(U=8)          (Ulysses inside a node, ring across; linear layers on LASP-2)
    auto      choose_strategy per layer type
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from benchmarks.common import write_results
from dist_attn.cost_model import AttnShape, choose_strategy, strategy_cost, valid_split
from dist_attn.hardware import get_profile


@dataclass(frozen=True)
class Model:
    name: str
    layers: int
    d_model: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int

    def matmul_params(self) -> int:
        """Weights of every matmul a token passes through (projections, SwiGLU MLP, LM head)."""
        hd = self.heads * self.head_dim
        soft = self.d_model * (2 * hd + 2 * self.kv_heads * self.head_dim)   # q, o + k, v
        lin = 4 * self.d_model * hd                                           # q, k, v, o
        n_lin = sum(c == "L" for c in self.layer_kinds())
        mlp = 3 * self.d_model * self.ffn
        return n_lin * (lin + mlp) + (self.layers - n_lin) * (soft + mlp) + self.vocab * self.d_model

    def layer_kinds(self, pattern: str = "LLLF") -> str:
        return "".join(pattern[i % len(pattern)] for i in range(self.layers))


MODELS = {"1b": Model("1b (Llama-3.2-1B shapes)", 16, 2048, 32, 8, 64, 8192, 128256),
          "7b": Model("7b (Llama-2-7B shapes)", 32, 4096, 32, 32, 128, 11008, 32000)}
CONFIGS = {"LASP-2H": ("lasp2", "allgather"), "Ring": ("linear_ring", "zigzag_ring"),
           "LASP-1": ("lasp1", "zigzag_ring"), "Ulysses": ("linear_ulysses", "ulysses"),
           "USP": ("lasp2", "usp"), "auto": ("auto", "auto")}
AUTO_NAME = {"ulysses": None}  # resolved per layer kind below


def _layer_time(strategy, kind, model, n, p, hw, gpn, u):
    heads, kv = (model.heads, model.heads) if kind == "L" else (model.heads, model.kv_heads)
    shape = AttnShape(n, heads, kv, model.head_dim, dtype_bytes=2)
    if strategy == "auto":
        name, u, _ = choose_strategy("linear" if kind == "L" else "softmax", heads=heads, kv_heads=kv,
                                     head_dim=model.head_dim, seq_len=n, cp=p, gpus_per_node=gpn, profile=hw)
        strategy = "linear_ulysses" if (kind == "L" and name == "ulysses") else name
    if strategy in ("ulysses", "linear_ulysses") and not valid_split(shape, p):
        return None
    if strategy == "usp" and not valid_split(shape, u):
        return None
    return strategy_cost(strategy, shape, p, profile=hw, gpus_per_node=gpn, ulysses_degree=u).time_s


def step_time(model: Model, config: str, n: int, p: int, hw, gpn: int = 8, pattern: str = "LLLF"):
    """Predicted seconds per training step (fwd+bwd) of one N-token sequence on P GPUs, or None (n/a)."""
    lin, soft = CONFIGS[config]
    u = min(gpn, p)
    kinds = model.layer_kinds(pattern)
    total = 6.0 * model.matmul_params() * n / p / hw.gemm_flops
    for kind, strat in (("L", lin), ("F", soft)):
        count = kinds.count(kind)
        if not count:
            continue
        t = _layer_time(strat, kind, model, n, p, hw, gpn, u)
        if t is None:
            return None
        total += count * t
    return total


def grid(models, configs, gpus, seqs, hw, pattern="LLLF"):
    rows = []
    for m in models:
        model = MODELS[m]
        for p in gpus:
            for n in seqs:
                if n % (2 * p):
                    continue
                row = {"model": m, "GPUs": p, "N": n}
                for c in configs:
                    t = step_time(model, c, n, p, hw, pattern=pattern)
                    row[c] = None if t is None else n / t / 1e3     # K tokens/s for the whole group
                if row.get("LASP-2H") and row.get("Ring"):
                    row["LASP-2H/Ring"] = row["LASP-2H"] / row["Ring"]
                rows.append(row)
    return rows


# LASP-2 paper (Sun et al. 2025, arXiv 2502.07563), pure Linear-Llama3-1B (16 heads, d=2048), basic linear
# attention, A100 80GB, SP size = GPUs, batch 1. Table 6: LASP-2 throughput (tokens/s) by (sequence, GPUs);
# Figure 3 (64 GPUs): LASP-2 vs Ring Attention / LASP-1 = +17.8% / +7.3% at 512K, +36.6% / +15.2% at 2048K.
PAPER_TABLE6 = {(16384, 16): 9530, (16384, 64): 9305, (16384, 128): 9313, (65536, 64): 34118,
                (262144, 16): 135635, (262144, 64): 130215, (262144, 128): 131550, (524288, 64): 245353,
                (1048576, 64): 442221, (1048576, 128): 416465, (2097152, 64): None, (2097152, 128): 769030}
# (2048K on 64 GPUs is OOM in Table 6, but Figure 3 reports its gains)
PAPER_2K = {16: 1254, 32: 1209, 64: 1285, 128: 1205}     # Table 6 at 2K tokens: the fixed step cost
PAPER_GAINS = {524288: ("+17.8%", "+7.3%"), 2097152: ("+36.6%", "+15.2%")}
PAPER_MODEL = Model("Linear-Llama3-1B (16 heads x 128)", 16, 2048, 16, 8, 128, 8192, 128256)


def paper_comparison():
    """Rows in the shape of the paper's Table 6 (sequence x GPUs -> LASP-2 tokens/s), pure linear (LLLL),
    a100 profile: the model alone, the model plus the paper's fixed step cost F (its step time at 2K
    tokens, 2048 / Table-6 throughput), the published figure, and LASP-2's gains over Ring / LASP-1."""
    hw = get_profile("a100")
    rows = []
    for (n, p), published in sorted(PAPER_TABLE6.items()):
        t = {c: step_time(PAPER_MODEL, c, n, p, hw, pattern="L") for c in ("LASP-2H", "LASP-1", "Ring")}
        fixed = 2048 / PAPER_2K[p]
        gain = lambda a, b, f=0.0: f"+{100 * ((t[b] + f) / (t[a] + f) - 1):.1f}%"  # noqa: E731
        rows.append({"N": n, "GPUs": p, "model": n / t["LASP-2H"], "model+F": n / (t["LASP-2H"] + fixed),
                     "paper": published or "OOM in Table 6",
                     "paper/(model+F)": published / (n / (t["LASP-2H"] + fixed)) if published else None,
                     "vs Ring (model, +F)": f"{gain('LASP-2H', 'Ring')}, {gain('LASP-2H', 'Ring', fixed)}",
                     "vs LASP-1 (model, +F)": f"{gain('LASP-2H', 'LASP-1')}, {gain('LASP-2H', 'LASP-1', fixed)}",
                     "paper gains (Ring, LASP-1)": ", ".join(PAPER_GAINS.get(n, ())) if p == 64 else ""})
    return rows


DIFFERENCES = """Where the model and the paper differ, and why:
- Fixed cost. The paper's step takes ~1.6 s even at 2K tokens (Table 6: 1205-1285 tokens/s), a cost
  independent of N (optimizer, data-parallel gradient reduction, framework) that the model has no term
  for, so the model alone is 3-50x more optimistic. With that F added ("model+F") it lands within
  0.8-1.25x of every Table 6 entry: the N-dependent part of the step is predicted well.
- LASP-1. The model follows the paper's Algorithm 6: a serial chain of P-1 hops, each a small state
  transfer plus one q·M einsum (which grows with N/P). With F, LASP-2's predicted gain on 64 GPUs grows
  with N (+4.2% at 512K, +6.8% at 2048K) like the paper's (+7.3%, +15.2%), at about half its size:
  the paper's LASP-1 also pays a launch and a synchronisation per hop and loses overlap, which a 20 us
  latency per hop understates.
- Ring. The paper's Ring Attention baseline keeps "the communication primitives and computational
  manners proposed for standard attention" (K/V blocks, left product). The model's Ring column on linear
  layers is the generous right-product variant (K/V blocks circulate, each adds q·(k^T v)); even so its
  K/V hop (2·N/P·H·D·b bytes through one NIC at a node boundary, nothing to hide it) makes it far slower
  than the paper's +36.6% says. Only with the fixed cost F, which dilutes every difference, do the
  two come closer; the remaining gap says the paper's ring moved or hid much less traffic than modelled
  (e.g. intra-node hops, or overlap with the quadratic left-product compute it kept).
- NCCL. LASP-2H all-gathers K/V with NCCL's striped ring collectives (one channel per NIC), which the
  model credits with all 8 NICs of a node, while the P2P ring's boundary hop uses one NIC. This drives
  most of the LASP-2H vs Ring gap for softmax layers across nodes; it is an assumption about NCCL
  (rail-optimised nodes, one NIC per GPU), not a measurement."""


def plot(rows, out_dir, tag, configs):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    for m in sorted({r["model"] for r in rows}):
        seqs = sorted({r["N"] for r in rows if r["model"] == m})
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, n in zip(axes, (seqs[0], seqs[-1])):
            for c in configs:
                pts = [(r["GPUs"], r[c]) for r in rows if r["model"] == m and r["N"] == n and r.get(c)]
                if pts:
                    ax.plot(*zip(*pts), "o-", label=c)
            ax.set(xscale="log", yscale="log", xlabel="GPUs (CP group)", ylabel="K tokens/s (predicted)",
                   title=f"{MODELS[m].name}, N={n // 1024}K, LLLF, {tag}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, f"simulate_{tag}_{m}.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="h100", help="hardware profile (h100, h200, a100)")
    ap.add_argument("--models", nargs="+", default=["1b", "7b"], choices=sorted(MODELS))
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512, 1024])
    ap.add_argument("--seqs", type=int, nargs="+", default=[k * 1024 for k in (128, 256, 512, 1024, 2048, 4096)])
    ap.add_argument("--pattern", default="LLLF")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    hw = get_profile(args.profile)
    configs = list(CONFIGS)
    rows = grid(args.models, configs, args.gpus, args.seqs, hw, args.pattern)
    paper = paper_comparison()
    meta = {"profile": f"{hw.name}: {hw.softmax_flops / 1e12:.0f} TF softmax, {hw.linear_flops / 1e12:.1f} TF "
                       f"linear, {hw.gemm_flops / 1e12:.0f} TF GEMM, NVLink {hw.intra_bw / 1e9:.0f} GB/s, "
                       f"IB {hw.inter_bw / 1e9:.0f} GB/s per GPU, 8 GPUs/node",
            "models": "; ".join(MODELS[m].name + f" {MODELS[m].matmul_params() / 1e9:.2f}B matmul params"
                                for m in args.models),
            "pattern": args.pattern, "unit": "K tokens/s per CP group (one sequence of N tokens), predicted",
            "source": "dist_attn.cost_model; nothing here was measured on a GPU"}
    cols = ["model", "GPUs", "N"] + configs + ["LASP-2H/Ring"]
    j, m = write_results(f"simulate_{hw.name}", rows, cols, meta, args.out)
    pcols = ["N", "GPUs", "model", "model+F", "paper", "paper/(model+F)", "vs Ring (model, +F)",
             "vs LASP-1 (model, +F)", "paper gains (Ring, LASP-1)"]
    pj, pm = write_results("simulate_lasp2_paper", paper, pcols,
                           {"setting": f"{PAPER_MODEL.name}, pure linear, a100-sxm profile, 8 GPUs/node",
                            "unit": "tokens/s of LASP-2, in the shape of the LASP-2 paper's Table 6",
                            "F": "the paper's step time at 2K tokens (2048 / Table 6 throughput), added to the model",
                            "published": "Table 6 (LASP-2 tokens/s) and Figure 3 (gains at 64 GPUs)"}, args.out)
    with open(pm, "a") as f:
        f.write("\n" + DIFFERENCES + "\n")
    pngs = plot(rows, args.out, hw.name, configs)
    for r in rows:
        cells = "  ".join(f"{c} {r[c]:8.1f}" if r.get(c) else f"{c} {'n/a':>8}" for c in configs)
        print(f"{r['model']} P={r['GPUs']:>4} N={r['N'] // 1024:>5}K  {cells}")
    print("\nLASP-2 paper setting (Table 6 shape; LASP-2 tokens/s, pure linear 1B, A100):")
    for r in paper:
        print(f"  N={r['N'] // 1024:>5}K GPUs={r['GPUs']:>3}  model {r['model']:>9.0f}  model+F {r['model+F']:>8.0f}  "
              f"paper {r['paper']!s:>7}  gains vs Ring / LASP-1 (model, model+F): {r['vs Ring (model, +F)']} / "
              f"{r['vs LASP-1 (model, +F)']}  paper: {r['paper gains (Ring, LASP-1)'] or '-'}")
    print(DIFFERENCES)
    print(f"wrote {j}, {m}, {pj}, {pm}, " + ", ".join(pngs))


if __name__ == "__main__":
    main()
