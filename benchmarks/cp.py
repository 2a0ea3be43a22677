"""Context-parallel strategies side by side: forward/backward time, bytes per rank, peak memory.

    python -m benchmarks.cp --nproc 4                       # gloo CPU processes (ratios only)
    torchrun --nproc_per_node 8 -m benchmarks.cp --seqs 32768 131072 --dtype bf16   # NCCL on GPUs

Softmax strategies (zigzag ring, Ulysses, USP, all-gather KV) and linear ones (LASP-2, Ulysses) run on
the same inputs in one run. CPU figures are for ratios between strategies in one run, not absolute
speed. FLOPs per rank are not reported here (see benchmarks/kernels.py for the kernel-level rates).
"""
from __future__ import annotations

import argparse
import os

import torch

from benchmarks.common import device_name, launch, timed, write_results
from dist_attn.allgather import allgather_attention
from dist_attn.comm import CommRecorder
from dist_attn.lasp2 import lasp2_attention
from dist_attn.ring import ring_attention
from dist_attn.ulysses import ulysses_attention
from dist_attn.usp import usp_attention
from dist_attn.kernels.lightning_attn import linear_kernel

SOFTMAX = ("zigzag_ring", "ulysses", "usp", "allgather")
LINEAR = ("lasp2", "linear_ulysses")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _strategy(name: str, world_size: int, layout: str, groups, causal: bool = True):
    """Returns ``(kind, fn(q, k, v) -> out)`` or raises ValueError. ``causal`` applies to
    the softmax strategies; linear attention is causal by construction."""
    if name == "zigzag_ring":
        return "softmax", lambda q, k, v: ring_attention(q, k, v, group=None, causal=causal, layout=layout)
    if name == "ulysses":
        return "softmax", lambda q, k, v: ulysses_attention(q, k, v, group=None, causal=causal, layout=layout)
    if name == "allgather":
        return "softmax", lambda q, k, v: allgather_attention(q, k, v, group=None, causal=causal, layout=layout)
    if name == "usp":
        if groups is None:
            raise ValueError("usp needs a world size with a Ulysses degree 1 < U < P")
        ug, rg = groups
        return "softmax", lambda q, k, v: usp_attention(q, k, v, ulysses_group=ug, ring_group=rg, causal=causal,
                                                        layout=layout)
    if name == "lasp2":
        return "linear", lambda q, k, v, d: lasp2_attention(q, k, v, group=None, decay=d, layout=layout)
    if name == "linear_ulysses":
        return "linear", lambda q, k, v, d: ulysses_attention(q, k, v, group=None, causal=True, layout=layout,
                                                              local_attn=linear_kernel("auto"), decay=d)
    raise ValueError(f"unknown strategy {name}")


def _bench(rank, world_size, device, args):
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    groups = None
    if world_size >= 4 and world_size % 2 == 0:
        from dist_attn.groups import make_usp_groups
        groups = make_usp_groups(None, 2)
    rows = []
    for seq in args.seqs:
        for name in args.strategies:
            row = {"strategy": name, "P": world_size, "seq": seq, "layout": args.layout}
            try:
                kind, fn = _strategy(name, world_size, args.layout, groups)
            except ValueError as e:
                row["note"] = f"skipped: {e}"
                rows.append(row)
                continue
            local = seq // world_size
            shape = (args.batch, local, args.heads, args.head_dim)
            q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            extra = (-torch.rand(args.heads, device=device) * 0.5,) if kind == "linear" else ()
            go = torch.randn(shape, device=device, dtype=dtype)

            def fwd():
                with torch.no_grad():
                    fn(q, k, v, *extra)

            def fwd_bwd():
                fn(q, k, v, *extra).backward(go)

            try:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                t_f = timed(fwd, device, args.warmup, args.iters)
                t_fb = timed(fwd_bwd, device, args.warmup, args.iters)
                with CommRecorder() as rec_f:
                    out = fn(q, k, v, *extra)
                with CommRecorder() as rec_b:
                    out.backward(go)
            except ValueError as e:  # e.g. heads not divisible for this P
                row["note"] = f"n/a: {str(e).split('. Fix')[0]}"
                rows.append(row)
                continue
            row.update(kind=kind, fwd_ms=1e3 * t_f, bwd_ms=1e3 * (t_fb - t_f), fwd_bwd_ms=1e3 * t_fb,
                       fwd_MB_sent=rec_f.total_sent / 2**20, bwd_MB_sent=rec_b.total_sent / 2**20,
                       peak_mem_MB=(torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                                    else None))
            rows.append(row)
            if rank == 0 and not args.quiet:
                print(f"  {name:>15} P={world_size} S={seq:>7}: fwd {row['fwd_ms']:.1f} ms, "
                      f"bwd {row['bwd_ms']:.1f} ms, sent fwd {row['fwd_MB_sent']:.2f} MB", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=4, help="gloo processes to spawn when not under torchrun")
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096], help="global sequence lengths")
    p.add_argument("--strategies", nargs="+", default=list(SOFTMAX + LINEAR), choices=SOFTMAX + LINEAR)
    p.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--name", default=None, help="result file stem (default cp_<device>_P<n>)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    rows = launch(_bench, args.nproc, args)
    if rows is None:  # non-zero ranks under torchrun
        return None
    if "WORLD_SIZE" in os.environ and int(os.environ.get("RANK", 0)) != 0:
        return None
    dev = device_name()
    world = rows[0]["P"] if rows else args.nproc
    name = args.name or f"cp_{'gpu' if torch.cuda.is_available() else 'cpu'}_P{world}"
    meta = {"device": dev, "dtype": args.dtype, "batch": args.batch, "heads": args.heads,
            "head_dim": args.head_dim, "layout": args.layout, "causal": True,
            "note": "CPU timings compare strategies within one run; bytes are exact per rank"}
    cols = ["strategy", "kind", "P", "seq", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "fwd_MB_sent", "bwd_MB_sent",
            "peak_mem_MB", "note"]
    j, m = write_results(name, rows, cols, meta, args.out)
    print(f"wrote {j} and {m}")
    return rows


if __name__ == "__main__":
    main()
