"""Linear-layer CP on the CPU: state passing vs all-to-all head parallelism, bytes and time vs S.

    python -m benchmarks.linear_cp                          # gloo, P 2 and 4, S 1K..16K, the three layer kinds
    python -m benchmarks.linear_cp --world-sizes 4 --seqs 1024 4096 --kinds delta

Kinds (one layer's attention core, forward + backward, fp32, zigzag layout):

* ``lightning`` (``L``): per-head decay; ``lasp2`` (one all-gather of fp32 chunk states) vs ``ulysses``;
* ``gated`` (``G``): per-token log gates ``g`` on top; LASP-2 also moves the chunks' gate products;
* ``delta`` (``D``): the gated delta rule; ``lasp2`` = :func:`dist_attn.gated_delta.gated_delta_attention`
  (one all-gather of the per-chunk affine maps ``[b | A]``) vs ``ulysses`` (q|k|v|beta and g to heads).

Per row: bytes sent per rank forward and backward (:class:`~dist_attn.comm.CommRecorder`), for ``delta``
next to :func:`dist_attn.cost_model.strategy_cost`'s prediction; median fwd+bwd time. State passing's
bytes do not depend on S; all-to-all's grow linearly with it. CPU times compare the two forms in one
run (one thread per rank, ranks sharing the cores); they say nothing of GPU speed.
Writes ``linear_cp_cpu.json/.md`` under ``--out`` (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import os

import torch

from benchmarks.common import device_name, launch, timed, write_results
from dist_attn.comm import CommRecorder
from dist_attn.context import CPContext

KINDS = ("lightning", "gated", "delta")
FORMS = ("lasp2", "ulysses")


def _inputs(kind, seq_local, args, device, seed):
    gen = torch.Generator().manual_seed(seed)
    b, h, dk = args.batch, args.heads, args.head_dim
    dv = 2 * dk if kind == "delta" else dk
    q, k = (torch.randn(b, seq_local, h, dk, generator=gen) for _ in range(2))
    v = torch.randn(b, seq_local, h, dv, generator=gen)
    extra = {}
    if kind == "delta":
        q, k = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
        extra["beta"] = torch.rand(b, seq_local, h, generator=gen) * 0.9 + 0.05
    if kind in ("gated", "delta"):
        extra["g"] = -torch.rand(b, seq_local, h, generator=gen) * 0.1
    ts = [t.to(device).requires_grad_(True) for t in (q, k, v)]
    return ts, {n: t.to(device).requires_grad_(True) for n, t in extra.items()}


def _layer(kind, cp, qkv, extra, decay):
    from dist_attn import dispatch
    q, k, v = qkv
    if kind == "delta":
        return dispatch.delta_attention(q, k, v, extra["beta"], extra["g"], cp=cp)
    return dispatch.linear_attention(q, k, v, cp=cp, decay=decay, g=extra.get("g"))


def _predicted(kind, form, seq, world, args):
    if kind != "delta":
        return None
    from dist_attn.cost_model import AttnShape, strategy_cost
    shape = AttnShape(seq, args.heads, args.heads, args.head_dim, batch=args.batch, dtype_bytes=4,
                      v_head_dim=2 * args.head_dim)
    c = strategy_cost("delta_state" if form == "lasp2" else "delta_ulysses", shape, world)
    return sum(c.fwd.sent.values()), sum(c.bwd.sent.values())


def _bench(rank, world, device, args):
    import torch.distributed as dist
    rows = []
    decay = torch.linspace(-0.5, -0.01, args.heads, device=device)
    for kind in args.kinds:
        for form in FORMS:
            cp = CPContext(group=dist.group.WORLD, layout="zigzag", linear_strategy=form, backend="torch")
            for seq in args.seqs:
                qkv, extra = _inputs(kind, seq // world, args, device, seed=rank)
                with CommRecorder() as rec_f:
                    out = _layer(kind, cp, qkv, extra, decay)
                dout = torch.ones_like(out)
                with CommRecorder() as rec_b:
                    out.backward(dout)

                def fwd_bwd():
                    _layer(kind, cp, qkv, extra, decay).backward(dout)

                t = timed(fwd_bwd, device, warmup=1, iters=args.iters)
                pred = _predicted(kind, form, seq, world, args)
                rows.append({"kind": kind, "linear_cp": form, "P": world, "S": seq,
                             "fwd_MB": rec_f.total_sent / 1e6, "bwd_MB": rec_b.total_sent / 1e6,
                             "pred_fwd_MB": None if pred is None else pred[0] / 1e6,
                             "pred_bwd_MB": None if pred is None else pred[1] / 1e6,
                             "bytes_match": None if pred is None else
                             (rec_f.total_sent, rec_b.total_sent) == pred,
                             "fwd_bwd_ms": 1e3 * t})
                if rank == 0:
                    r = rows[-1]
                    print(f"{kind:9s} {form:7s} P={world} S={seq:6d}  fwd {r['fwd_MB']:8.3f} MB  bwd "
                          f"{r['bwd_MB']:8.3f} MB  {r['fwd_bwd_ms']:8.1f} ms", flush=True)
    return rows


def plot(rows: list, out_dir: str) -> str | None:
    """Bytes sent per rank (fwd + bwd) and fwd+bwd time vs S, one line per (kind, linear_cp), largest P."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    p = max(r["P"] for r in rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for kind in KINDS:
        for form, style in zip(FORMS, ("-", "--")):
            sel = sorted((r for r in rows if r["kind"] == kind and r["linear_cp"] == form and r["P"] == p),
                         key=lambda r: r["S"])
            if sel:
                xs = [r["S"] for r in sel]
                axes[0].plot(xs, [r["fwd_MB"] + r["bwd_MB"] for r in sel], style, marker="o", label=f"{kind} {form}")
                axes[1].plot(xs, [r["fwd_bwd_ms"] for r in sel], style, marker="o", label=f"{kind} {form}")
    for ax, title in zip(axes, ("MB sent per rank, fwd + bwd", "fwd + bwd ms (CPU, gloo)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("global sequence length S")
        ax.set_title(f"{title}, P={p}")
        ax.legend(fontsize=7)
    path = os.path.join(out_dir, "linear_cp_cpu.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.linear_cp", description=__doc__.split("\n")[0])
    p.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = p.parse_args(argv)
    rows = []
    for world in args.world_sizes:
        rows += launch(_bench, world, args)
    meta = {"device": device_name(), "torch": torch.__version__, "dtype": "fp32", "layout": "zigzag",
            "shape": f"B={args.batch} H={args.heads} Dk={args.head_dim} (Dv=2Dk for delta)",
            "time": "median fwd+bwd of one layer's attention core, gloo, 1 thread per rank"}
    cols = ["kind", "linear_cp", "P", "S", "fwd_MB", "bwd_MB", "pred_fwd_MB", "pred_bwd_MB", "bytes_match",
            "fwd_bwd_ms"]
    print("\n".join(write_results("linear_cp_cpu", rows, cols, meta, args.out)))
    print(plot(rows, args.out) or "no plot (matplotlib missing)")


if __name__ == "__main__":
    main()
