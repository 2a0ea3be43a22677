"""One command for every CP measurement: strategies x mask x sequence x world size x layer type,
measured next to the cost model's prediction (:mod:`dist_attn.cost_model`).

    python -m benchmarks.harness                                    # CPU: gloo, P 2 and 4, seqs 512..4096
    python -m benchmarks.harness --world-sizes 2 --seqs 512 1024 --masks causal   # a quick look
    torchrun --nproc_per_node 8 -m benchmarks.harness --seqs 16384 65536 --dtype bf16 --heads 32 --head-dim 128

Per row: forward, backward and fwd+bwd time (median of ``--iters`` after ``--warmup``), TFLOP/s per rank,
bytes sent per rank forward and backward (:class:`~dist_attn.comm.CommRecorder`) with the model's
prediction and whether they agree exactly, the predicted time, and peak CUDA memory (GPU only).
Layer types: ``softmax`` (zigzag_ring, ulysses, usp, allgather), ``linear`` (lasp2, linear_ulysses),
``hybrid`` (a stack in ``--pattern``, L = linear layer, F = full softmax layer, each layer x + attn(x)).
The strategies come from :mod:`benchmarks.cp`; on CPU USP runs with U = 2 for P >= 4.

Masks: ``causal``, ``full``, and for softmax layers ``docs`` (causal + packed documents: log-normal lengths
with median ``--doc-median``, from seed 0, :func:`benchmarks.doc_balance.packed_offsets`) and ``window``
(causal + a left window of ``--window`` tokens). The cost model does not know documents or windows yet:
their rows carry the causal prediction (time), and their bytes are checked against
:func:`dist_attn.documents.doc_cost`'s ring plan (the ring skips blocks; the others move every block).

FLOPs (per rank, fwd+bwd): softmax 3.5 x 4·B·H·(N/P)·N·D, x0.5 causal; linear 3 x 4·B·H·(N/P)·D·(C+D)
with C = 64, plus LASP-2's state einsums (see the cost model). CPU timings (gloo, one thread per rank,
ranks sharing the machine's cores) compare strategies within one run; they say nothing of GPU speed.
Writes ``harness_<cpu|gpu>.json/.md`` and PNG plots under ``--out`` (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import os
import platform

import torch

from benchmarks import cp as cp_bench
from benchmarks.common import device_name, launch, timed, write_results
from dist_attn.comm import CommRecorder
from dist_attn.cost_model import AttnShape, strategy_cost

MODEL_NAME = {"linear_ulysses": "linear_ulysses"}  # benchmark name -> cost-model name (identity today)
HYBRIDS = (("lasp2", "allgather"), ("lasp2", "zigzag_ring"), ("linear_ulysses", "ulysses"))


MASKED = ("docs", "window")  # softmax-only masks on top of causal


def _mask_kw(mask: str, seq: int, args) -> dict:
    """cu_seqlens / window_size of a docs or window row (identical on every rank)."""
    if mask == "docs":
        from benchmarks.doc_balance import packed_offsets
        median = args.doc_median or max(seq // 16, 1)
        return dict(cu_seqlens=torch.tensor(packed_offsets(seq, 0, median), dtype=torch.int32))
    return dict(window_size=args.window) if mask == "window" else {}


def _layer(name: str, world: int, layout: str, groups, mask: str, seq: int, args):
    """(kind, fn) from the table of benchmarks.cp, with the requested mask for softmax strategies."""
    if name in cp_bench.LINEAR:              # linear attention is causal only
        return cp_bench._strategy(name, world, layout, groups)
    if mask not in MASKED:
        return cp_bench._strategy(name, world, layout, groups, causal=mask == "causal")
    from dist_attn import allgather_attention, ring_attention, ulysses_attention, usp_attention
    kw = dict(causal=True, layout=layout, **_mask_kw(mask, seq, args))
    if name == "usp":
        if groups is None:
            raise ValueError("usp needs a world size with a Ulysses degree 1 < U < P")
        return "softmax", lambda q, k, v: usp_attention(q, k, v, ulysses_group=groups[0], ring_group=groups[1], **kw)
    fn = {"zigzag_ring": ring_attention, "allgather": allgather_attention, "ulysses": ulysses_attention}[name]
    return "softmax", lambda q, k, v: fn(q, k, v, group=None, **kw)


def _masked_ring_bytes(rank, world, seq, mask, args, elem):
    """Exact ring bytes of a docs/window row from the host plan: (forward, backward) sent by ``rank``."""
    from dist_attn.documents import ring_need
    kw = _mask_kw(mask, seq, args)
    cu = tuple(kw["cu_seqlens"].tolist()) if "cu_seqlens" in kw else None
    need = ring_need(cu, True, kw.get("window_size"), world, args.layout, seq)
    sends = sum(need[d][rank] for d in range(world) if d != rank)
    recvs = sum(need[rank][s] for s in range(world) if s != rank)
    block = 2 * args.batch * (seq // world) * args.heads * args.head_dim
    return sends * block * elem, sends * block * elem + recvs * block * 4


def _predict(names, shape_kw, world, profile, u_deg):
    """Summed cost-model prediction for the layers ``names`` (one per layer of the stack)."""
    pred = dict(fwd_B=0, bwd_B=0, fwd_s=0.0, bwd_s=0.0, flops=0.0)
    for name in names:
        linear = name in ("lasp2", "linear_ulysses")
        shape = AttnShape(**{**shape_kw, "causal": True if linear else shape_kw["causal"]})
        c = strategy_cost(MODEL_NAME.get(name, name), shape, world, profile=profile,
                          ulysses_degree=u_deg if name == "usp" else None)
        pred["fwd_B"] += sum(c.fwd.sent.values())
        pred["bwd_B"] += sum(c.bwd.sent.values())
        pred["fwd_s"] += c.fwd.time_s
        pred["bwd_s"] += c.bwd.time_s
        pred["flops"] += c.fwd.flops + c.bwd.flops
    return pred


def _cases(args, world):
    """(layer_type, label, [strategy per layer], mask) for this world size."""
    soft = [s for s in args.strategies if s in cp_bench.SOFTMAX]
    lin = [s for s in args.strategies if s in cp_bench.LINEAR]
    out = []
    for mask in args.masks:
        if "softmax" in args.layer_types:
            out += [("softmax", s, [s], mask) for s in soft]
        if "linear" in args.layer_types and mask == "causal":  # linear attention is causal only
            out += [("linear", s, [s], mask) for s in lin]
        if "hybrid" in args.layer_types and mask not in MASKED:
            for ls, ss in HYBRIDS:
                if ls in lin and ss in soft:
                    out.append(("hybrid", f"{args.pattern}:{ls}+{ss}",
                                [ls if c == "L" else ss for c in args.pattern], mask))
    return out


def _bench(rank, world, device, args):
    torch.manual_seed(0)
    dtype = cp_bench.DTYPES[args.dtype]
    groups, u_deg = None, None
    if world >= 4 and world % 2 == 0:
        from dist_attn.groups import make_usp_groups
        u_deg = 2
        groups = make_usp_groups(None, u_deg)
    profile = args.profile or ("auto" if device.type == "cuda" else "cpu-gloo")
    rows = []
    for seq in args.seqs:
        for ltype, label, names, mask in _cases(args, world):
            causal = mask == "causal"
            row = dict(layer=ltype, strategy=label, mask=mask, P=world, seq=seq, layout=args.layout)
            try:
                fns = {n: _layer(n, world, args.layout, groups, mask, seq, args) for n in set(names)}
                pred = _predict(names, dict(seq_len=seq, heads=args.heads, kv_heads=args.heads,
                                            head_dim=args.head_dim, batch=args.batch,
                                            dtype_bytes=torch.finfo(dtype).bits // 8,
                                            causal=causal or mask in MASKED, layout=args.layout),
                                world, profile, u_deg)
                if mask in MASKED and names == ["zigzag_ring"]:  # the ring skips blocks: its own exact count
                    pred["fwd_B"], pred["bwd_B"] = _masked_ring_bytes(rank, world, seq, mask, args,
                                                                      torch.finfo(dtype).bits // 8)
            except (ImportError, ValueError) as e:
                rows.append({**row, "note": f"skipped: {str(e).split('. Fix')[0]}"})
                continue
            shape = (args.batch, seq // world, args.heads, args.head_dim)
            x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
            decay = -torch.rand(args.heads, device=device) * 0.5
            go = torch.randn(shape, device=device, dtype=dtype)

            def stack():
                h = x
                for n in names:
                    kind, fn = fns[n]
                    h = h + (fn(h, h, h, decay) if kind == "linear" else fn(h, h, h))
                return h

            def fwd():
                with torch.no_grad():
                    stack()

            def fwd_bwd():
                stack().backward(go)

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t_f = timed(fwd, device, args.warmup, args.iters)
            t_fb = timed(fwd_bwd, device, args.warmup, args.iters)
            with CommRecorder() as rec_f:
                out = stack()
            with CommRecorder() as rec_b:
                out.backward(go)
            row.update(fwd_ms=1e3 * t_f, bwd_ms=1e3 * (t_fb - t_f), fwd_bwd_ms=1e3 * t_fb,
                       TFLOPs=pred["flops"] / t_fb / 1e12,
                       fwd_MB=rec_f.total_sent / 2**20, bwd_MB=rec_b.total_sent / 2**20,
                       bytes_match=(rec_f.total_sent == pred["fwd_B"] and rec_b.total_sent == pred["bwd_B"]),
                       pred_fwd_bwd_ms=1e3 * (pred["fwd_s"] + pred["bwd_s"]),
                       meas_over_pred=t_fb / (pred["fwd_s"] + pred["bwd_s"]),
                       peak_mem_MB=(torch.cuda.max_memory_allocated(device) / 2**20
                                    if device.type == "cuda" else None))
            rows.append(row)
            if rank == 0 and not args.quiet:
                print(f"  P={world} S={seq:>6} {mask:>6} {label:>28}: fwd+bwd {row['fwd_bwd_ms']:8.1f} ms "
                      f"(model {row['pred_fwd_bwd_ms']:8.1f}), sent {row['fwd_MB']:.2f}+{row['bwd_MB']:.2f} MB "
                      f"{'==' if row['bytes_match'] else '!='} model", flush=True)
    return rows


def summary(rows: list) -> str:
    """Model vs measurement over every measured row: bytes (exact) and time (meas/pred spread)."""
    done = [r for r in rows if "fwd_bwd_ms" in r]
    if not done:
        return "Summary: nothing measured."
    ratios = sorted(r["meas_over_pred"] for r in done)
    within = {f: sum(1 / f < x < f for x in ratios) for f in (2, 4)}
    return (f"Summary: bytes equal to the model in {sum(r['bytes_match'] for r in done)}/{len(done)} rows; "
            f"measured/predicted time min {ratios[0]:.2f}, median {ratios[len(ratios) // 2]:.2f}, max "
            f"{ratios[-1]:.2f}; within 2x: {within[2]}/{len(done)}, within 4x: {within[4]}/{len(done)}. "
            "A median above 1 is the machine's load (other jobs) slowing every rank; compare ratios between "
            "strategies and across sequence lengths, and see tests/test_cost_model.py for the interleaved, "
            "load-normalised check.")


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def plot(rows: list, out_dir: str, tag: str) -> list:
    """time vs seq, bytes vs seq (measured points, model lines) and fwd+bwd time vs world size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "fwd_bwd_ms" in r and r["mask"] == "causal"]
    worlds = sorted({r["P"] for r in done})
    paths = []
    if not worlds:  # the plots show the causal runs; none were asked for
        return paths
    for what, key, pkey, ylabel in (("time", "fwd_bwd_ms", "pred_fwd_bwd_ms", "fwd+bwd ms per step"),
                                    ("bytes", "MB", None, "MiB sent per rank (fwd+bwd)")):
        fig, axes = plt.subplots(1, len(worlds), figsize=(6 * len(worlds), 4.5), squeeze=False)
        for ax, p in zip(axes[0], worlds):
            for label in sorted({r["strategy"] for r in done if r["P"] == p}):
                pts = sorted((r for r in done if r["P"] == p and r["strategy"] == label), key=lambda r: r["seq"])
                xs = [r["seq"] for r in pts]
                ys = [r[key] if key != "MB" else r["fwd_MB"] + r["bwd_MB"] for r in pts]
                line, = ax.plot(xs, ys, "o-", label=label)
                if pkey:
                    ax.plot(xs, [r[pkey] for r in pts], "--", color=line.get_color(), alpha=0.6)
            ax.set(xscale="log", yscale="log", xlabel="global sequence length", ylabel=ylabel,
                   title=f"P={p}, causal" + (" (dashed: cost model)" if pkey else " (bytes match the model)"))
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, f"harness_{tag}_{what}_vs_seq.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    if len(worlds) > 1:
        seq = max(r["seq"] for r in done)
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for label in sorted({r["strategy"] for r in done}):
            pts = sorted((r for r in done if r["strategy"] == label and r["seq"] == seq), key=lambda r: r["P"])
            if len(pts) > 1:
                ax.plot([r["P"] for r in pts], [r["fwd_bwd_ms"] for r in pts], "o-", label=label)
        ax.set(xlabel="world size P", ylabel="fwd+bwd ms", title=f"scaling with P at S={seq}, causal", xticks=worlds)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, f"harness_{tag}_scaling.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths + plot_masked(rows, out_dir, tag)


def plot_masked(rows: list, out_dir: str, tag: str) -> list:
    """Per docs/window mask: fwd+bwd time and MiB sent vs sequence length (solid), the causal run of the
    same strategy dotted, one column per world size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "fwd_bwd_ms" in r and r.get("layer") == "softmax"]
    paths = []
    for mask in MASKED:
        worlds = sorted({r["P"] for r in done if r["mask"] == mask})
        if not worlds:
            continue
        fig, axes = plt.subplots(2, len(worlds), figsize=(6 * len(worlds), 9), squeeze=False)
        for col, p in enumerate(worlds):
            for row, (key, ylabel) in enumerate((("fwd_bwd_ms", "fwd+bwd ms per step"),
                                                 ("MB", "MiB sent per rank (fwd+bwd)"))):
                ax = axes[row][col]
                for label in sorted({r["strategy"] for r in done if r["P"] == p and r["mask"] == mask}):
                    color = None
                    for m, style in ((mask, "o-"), ("causal", ":")):
                        pts = sorted((r for r in done if r["P"] == p and r["strategy"] == label and r["mask"] == m),
                                     key=lambda r: r["seq"])
                        if not pts:
                            continue
                        ys = [r[key] if key != "MB" else r["fwd_MB"] + r["bwd_MB"] for r in pts]
                        line, = ax.plot([r["seq"] for r in pts], ys, style, color=color,
                                        label=label if m == mask else None)
                        color = line.get_color()
                ax.set(xscale="log", yscale="log", xlabel="global sequence length", ylabel=ylabel,
                       title=f"P={p}, {mask} (dotted: causal)")
                ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, f"harness_{tag}_{mask}_vs_seq.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4], help="gloo world sizes (CPU)")
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--masks", nargs="+", default=["causal", "full"], choices=["causal", "full", "docs", "window"])
    p.add_argument("--doc-median", type=int, default=0, help="docs mask: median document length (0: S/16)")
    p.add_argument("--window", type=int, default=128, help="window mask: left window in tokens")
    p.add_argument("--layer-types", nargs="+", default=["softmax", "linear", "hybrid"],
                   choices=["softmax", "linear", "hybrid"])
    p.add_argument("--pattern", default="LLLF", help="hybrid layer pattern: L linear, F full softmax")
    p.add_argument("--strategies", nargs="+", default=list(cp_bench.SOFTMAX + cp_bench.LINEAR),
                   choices=cp_bench.SOFTMAX + cp_bench.LINEAR)
    p.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="fp32", choices=list(cp_bench.DTYPES))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--profile", default=None, help="cost-model profile (default: cpu-gloo on CPU, auto on GPU)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if set(args.pattern) - {"L", "F"}:
        p.error(f"--pattern expected letters L and F only, got {args.pattern!r}")
    load0 = _load()
    under_torchrun = "WORLD_SIZE" in os.environ
    rows = []
    for world in ([int(os.environ["WORLD_SIZE"])] if under_torchrun else args.world_sizes):
        for attempt in (1, 2):  # a shared CI machine occasionally kills a spawned rank: retry once
            try:
                rows += launch(_bench, world, args) or []
                break
            except RuntimeError as e:
                print(f"P={world}: attempt {attempt} failed: {e}", flush=True)
                if attempt == 2:
                    rows.append({"P": world, "note": f"failed twice: {str(e)[:200]}"})
    if under_torchrun and int(os.environ.get("RANK", 0)) != 0:
        return None
    tag = "gpu" if torch.cuda.is_available() else "cpu"
    meta = {"device": device_name(), "machine": f"{platform.node()} {platform.platform()}",
            "torch": torch.__version__, "dtype": args.dtype, "batch": args.batch, "heads": args.heads,
            "head_dim": args.head_dim, "layout": args.layout, "pattern": args.pattern,
            "load average before/after": f"{load0} / {_load()}",
            "flops": "softmax 3.5x4·B·H·(N/P)·N·D (x0.5 causal), "
                     "linear 3x4·B·H·(N/P)·D·(64+D) + LASP-2 einsums",
            "model": "pred_* from dist_attn.cost_model with the cpu-gloo profile on CPU (ratios, not GPU speed)",
            "note": "bytes are exact per rank (bytes_match: equal to the model); CPU times compare strategies "
                    "within one run on a shared, loaded machine"}
    cols = ["layer", "strategy", "mask", "P", "seq", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "pred_fwd_bwd_ms",
            "meas_over_pred", "TFLOPs", "fwd_MB", "bwd_MB", "bytes_match", "peak_mem_MB", "note"]
    j, m = write_results(f"harness_{tag}", rows, cols, meta, args.out)
    with open(m, "a") as f:
        f.write("\n" + summary(rows) + "\n")
    pngs = plot(rows, args.out, tag)
    print(summary(rows))
    print(f"wrote {j}, {m}, " + ", ".join(pngs))
    return rows


if __name__ == "__main__":
    main()
