"""Ours vs peer implementations of the same CP layer: same inputs, same local kernel, outputs asserted equal.

    python -m benchmarks.peers                           # gloo CPU, P 2 and 4, seqs 1024 4096
    python -m benchmarks.peers --world-sizes 2 --seqs 1024 --iters 3

Pairs (each timed fwd+bwd, interleaved rep by rep so machine load hits both alike):

* ring:    :func:`dist_attn.ring.ring_attention` (zigzag, causal) vs ring-flash-attn's
           ``zigzag_ring_flash_attn_func`` (pip ``ring-flash-attn``, same zigzag layout, fp32 dK/dV ring);
* ulysses: :func:`dist_attn.ulysses.ulysses_attention` (contiguous, causal) vs DeepSpeed's
           ``DistributedAttention`` and yunchang's ``UlyssesAttention`` (neither reorders zigzag shards).

Every implementation runs the same local kernel: ours directly, the peers through a stand-in ``flash_attn``
module put in ``sys.modules`` before they are imported. It provides the functions they import
(``flash_attn_func``, ``flash_attn_interface._flash_attn_forward`` / ``_flash_attn_backward``; the varlen
pair yunchang imports only raises if called) on top of
:func:`dist_attn.kernels.flash_attn.softmax_kernel` (torch on CPU, Triton on GPU), so the comparison is of the CP
layer, not of the kernel. ring-flash-attn's package ``__init__`` imports its HF adapter (``transformers``);
its zigzag module is loaded without that ``__init__``. No peer code is copied here.

ratio = peer time / our time (> 1: ours faster), the median of per-rep ratios. Writes ``peers_<cpu|gpu>``
JSON and markdown under ``--out``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

import torch
import torch.distributed as dist

from benchmarks.common import device_name, launch, write_results

PEER_VERSIONS = {}


def install_flash_attn_standin(backend: str = "auto") -> None:
    """Register a minimal ``flash_attn`` package backed by our kernel (flash-attn 2.6 call signatures)."""
    from dist_attn.kernels.flash_attn import softmax_kernel
    kernel = softmax_kernel(backend)

    def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left=-1,
                            window_size_right=-1, softcap=0.0, alibi_slopes=None, return_softmax=False):
        assert dropout_p == 0 and alibi_slopes is None and window_size_left < 0, "stand-in: plain attention only"
        out, lse = kernel.fwd(q, k, v, causal=causal, softmax_scale=softmax_scale, q_offset=0, k_offset=0)
        return out, lse, None, None                       # out [B,S,H,D], lse fp32 [B,H,S], S_dmask, rng

    def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                             window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
                             deterministic=False, rng_state=None):
        gq, gk, gv = kernel.bwd(dout, q, k, v, out, softmax_lse, causal=causal, softmax_scale=softmax_scale,
                                q_offset=0, k_offset=0)
        dq.copy_(gq)
        dk.copy_(gk)
        dv.copy_(gv)
        return softmax_lse

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        out, _ = kernel(q, k, v, causal=causal, softmax_scale=softmax_scale)     # differentiable
        return out

    def _varlen(*args, **kwargs):
        raise NotImplementedError("flash_attn stand-in: varlen entry points are imported by yunchang, not used")

    pkg = types.ModuleType("flash_attn")
    iface = types.ModuleType("flash_attn.flash_attn_interface")
    iface._flash_attn_forward, iface._flash_attn_backward = _flash_attn_forward, _flash_attn_backward
    iface._flash_attn_varlen_forward = iface._flash_attn_varlen_backward = _varlen
    iface.flash_attn_func = pkg.flash_attn_func = flash_attn_func
    pkg.flash_attn_interface, pkg.__version__, pkg.__path__ = iface, "2.6.3+dist_attn-standin", []
    sys.modules["flash_attn"], sys.modules["flash_attn.flash_attn_interface"] = pkg, iface


def _ring_flash_attn_zigzag():
    """``zigzag_ring_flash_attn_func`` without running the package ``__init__`` (needs transformers)."""
    import importlib.metadata as md
    import importlib.util
    spec = importlib.util.find_spec("ring_flash_attn")
    if spec is None:
        raise ImportError("ring-flash-attn is not installed (pip install --no-deps ring-flash-attn)")
    if "ring_flash_attn" not in sys.modules:
        shell = types.ModuleType("ring_flash_attn")
        shell.__path__ = list(spec.submodule_search_locations)
        sys.modules["ring_flash_attn"] = shell
    PEER_VERSIONS["ring-flash-attn"] = md.version("ring-flash-attn")
    return importlib.import_module("ring_flash_attn.zigzag_ring_flash_attn").zigzag_ring_flash_attn_func


def _peers(kind: str, kernel):
    """{name: fn(q, k, v) -> out} of the peer implementations of ``kind``; failures as strings."""
    import importlib.metadata as md
    out = {}
    if kind == "ring":
        try:
            zz = _ring_flash_attn_zigzag()
            out["ring-flash-attn zigzag"] = lambda q, k, v: zz(q, k, v, causal=True, group=None)
        except Exception as e:  # noqa: BLE001 - reported in the results
            out["ring-flash-attn zigzag"] = f"cannot run: {type(e).__name__}: {e}"
        return out
    try:
        import deepspeed.comm as ds_comm
        from deepspeed.sequence.layer import DistributedAttention
        if not ds_comm.is_initialized():
            ds_comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)
        ds = DistributedAttention(lambda q, k, v, *a, **kw: kernel(q, k, v, causal=True)[0],
                                  dist.group.WORLD, scatter_idx=2, gather_idx=1)
        PEER_VERSIONS["deepspeed"] = md.version("deepspeed")
        out["DeepSpeed DistributedAttention"] = lambda q, k, v: ds(q, k, v, batch_dim_idx=0)
    except Exception as e:  # noqa: BLE001
        out["DeepSpeed DistributedAttention"] = f"cannot run: {type(e).__name__}: {e}"
    try:
        from yunchang.kernels import AttnType
        from yunchang.ulysses import UlyssesAttention
        yc = UlyssesAttention(dist.group.WORLD, scatter_idx=2, gather_idx=1, attn_type=AttnType.FA)
        PEER_VERSIONS["yunchang"] = md.version("yunchang")
        out["yunchang UlyssesAttention"] = lambda q, k, v: yc(q, k, v, causal=True)
    except Exception as e:  # noqa: BLE001
        out["yunchang UlyssesAttention"] = f"cannot run: {type(e).__name__}: {e}"
    return out


NOTES = """Notes:
- Same local kernel everywhere (peers through the flash_attn stand-in), so the ratios compare the CP
  layers: their collectives, merges, copies and Python overhead. out, dq, dk, dv were asserted equal to
  ours (bf16 tolerance 2e-2) before any timing.
- Traffic. ring-flash-attn sends what our ring sends (K/V in the input dtype, dK/dV in fp32, P-1 hops
  each). DeepSpeed and yunchang issue one all-to-all per tensor (q, k, v, out: 4 per direction); ours
  packs q, k, v into one (2 per direction, same bytes).
- Not compared: Ulysses on zigzag shards (neither peer puts the tokens back in global order, so their
  causal result would be wrong there; ours reorders) and Hkv < P (ours replicates KV heads; yunchang
  has no such path, DeepSpeed takes num_kv_heads).
- ring-flash-attn 0.1.8 with fp32 inputs: its zigzag backward takes dq = dq_buffer.to(float32), which
  is the buffer itself for fp32, so later steps overwrite dq (half of dq came out wrong at P=2). Real
  flash-attn only accepts fp16/bf16, so this is reachable only through a stand-in; we compare in bf16.
- CPU timings come from a shared 2-core machine (load average 4-7 from other jobs): rep-to-rep spread
  is 10-30%, so ratios inside 0.85-1.15 are parity. No GPU was available for this run; on GPUs
  `torchrun --nproc_per_node 8 -m benchmarks.peers` runs the same pairs on the Triton kernel."""


def summary(rows: list) -> str:
    """One line per peer: min / median / max of peer/ours over the sizes measured."""
    lines = []
    for peer in sorted({r["peer"] for r in rows if "peer/ours" in r}):
        rs = sorted(r["peer/ours"] for r in rows if r.get("peer") == peer and "peer/ours" in r)
        lines.append(f"- {peer}: peer/ours min {rs[0]:.2f}, median {statistics.median(rs):.2f}, max {rs[-1]:.2f} "
                     f"over {len(rs)} (P, seq) points")
    return "Summary (> 1: ours faster):\n" + "\n".join(lines)


def _fwd_bwd(fn, q, k, v, go):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(go)
    return [out.detach()] + [t.grad for t in leaves]


def _bench(rank, world, device, args):
    install_flash_attn_standin()
    from dist_attn.ring import ring_attention
    from dist_attn.ulysses import ulysses_attention
    from dist_attn.kernels.flash_attn import softmax_kernel
    kernel = softmax_kernel("auto")
    ours = {"ring": lambda q, k, v: ring_attention(q, k, v, group=None, causal=True, layout="zigzag",
                                                   local_attn=kernel),
            "ulysses": lambda q, k, v: ulysses_attention(q, k, v, group=None, causal=True, layout="contiguous",
                                                         local_attn=kernel)}
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    rows = []
    for kind in ("ring", "ulysses"):
        peers = _peers(kind, kernel)
        for seq in args.seqs:
            torch.manual_seed(seq)
            shape = (args.batch, seq // world, args.heads, args.head_dim)
            q, k, v, go = (torch.randn(shape, device=device, dtype=dtype) for _ in range(4))
            ref = _fwd_bwd(ours[kind], q, k, v, go)
            for name, fn in peers.items():
                row = {"layer": kind, "ours": f"dist_attn {kind}", "peer": name, "P": world, "seq": seq}
                if isinstance(fn, str):
                    rows.append({**row, "note": fn})
                    continue
                try:                                     # same math, same kernel: must agree
                    got = _fwd_bwd(fn, q, k, v, go)
                    for what, a, b in zip(("out", "dq", "dk", "dv"), ref, got):
                        torch.testing.assert_close(b, a, **tol, msg=lambda m, w=what: f"{w}: {m.splitlines()[0]}")
                    err = ""
                except Exception as e:  # noqa: BLE001 - every rank must take the same branch below
                    err = f"{type(e).__name__}: {e}"
                bad = torch.tensor([float(bool(err))])
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
                if bad.item():
                    rows.append({**row, "outputs_equal": False,
                                 "note": f"not timed, outputs differ ({err or 'on another rank'})"})
                    continue
                times = {"ours": [], "peer": []}
                for rep in range(args.warmup + args.iters):
                    for who in (("ours", "peer") if rep % 2 == 0 else ("peer", "ours")):
                        f = ours[kind] if who == "ours" else fn
                        dist.barrier()
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        _fwd_bwd(f, q, k, v, go)
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        if rep >= args.warmup:
                            times[who].append(time.perf_counter() - t0)
                paired = [p / o for p, o in zip(times["peer"], times["ours"])]
                ratio = statistics.median(paired)
                rows.append({**row, "ours_ms": 1e3 * statistics.median(times["ours"]),
                             "peer_ms": 1e3 * statistics.median(times["peer"]), "peer/ours": ratio,
                             "paired range": f"{min(paired):.2f}-{max(paired):.2f}",
                             "min/min": min(times["peer"]) / min(times["ours"]), "outputs_equal": True})
                if rank == 0:
                    print(f"  P={world} S={seq:>6} {kind:>7}: ours {rows[-1]['ours_ms']:8.1f} ms, {name} "
                          f"{rows[-1]['peer_ms']:8.1f} ms, peer/ours {ratio:.2f}", flush=True)
    return rows, dict(PEER_VERSIONS)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--seqs", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"],
                    help="bf16: the dtypes flash-attn supports (ring-flash-attn's dq aliases a buffer in fp32)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    under_torchrun = "WORLD_SIZE" in os.environ
    rows, versions = [], {}
    for world in ([int(os.environ["WORLD_SIZE"])] if under_torchrun else args.world_sizes):
        res = launch(_bench, world, args)
        if res:
            rows += res[0]
            versions.update(res[1])
    if under_torchrun and int(os.environ.get("RANK", 0)) != 0:
        return None
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    meta = {"device": device_name(), "dtype": args.dtype, "shape": f"B={args.batch}, H={args.heads} (MHA), "
            f"D={args.head_dim}, causal", "peers": ", ".join(f"{k} {v}" for k, v in sorted(versions.items())),
            "kernel": "every implementation runs dist_attn.kernels.flash_attn (peers through a flash_attn stand-in)",
            "ratio": "peer/ours = median over reps of paired fwd+bwd times (> 1: ours faster); paired range = "
                     "min-max of those ratios; min/min = fastest peer rep / fastest ours rep",
            "check": "out, dq, dk, dv asserted equal to ours (torch.testing.assert_close) before timing",
            "load average after": load}
    cols = ["layer", "P", "seq", "ours", "peer", "ours_ms", "peer_ms", "peer/ours", "paired range", "min/min",
            "outputs_equal", "note"]
    tag = "gpu" if torch.cuda.is_available() else "cpu"
    j, m = write_results(f"peers_{tag}", rows, cols, meta, args.out)
    with open(m, "a") as f:
        f.write("\n" + summary(rows) + "\n\n" + NOTES + "\n")
    print(summary(rows))
    print(f"wrote {j} and {m}")
    return rows


if __name__ == "__main__":
    main()
