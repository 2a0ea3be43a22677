"""Single-device kernel benchmark: forward, backward and fwd+bwd time and TFLOP/s.

    python -m benchmarks.kernels                                   # GPU: seq 1K..32K, D 64/128, bf16, causal
    python -m benchmarks.kernels --seqs 8192 --head-dims 128 --ops flash_attn sdpa
    python -m benchmarks.kernels --preset gpu_check --budget-s 280   # the prepared GPU check's sweep
    python -m benchmarks.kernels --help

Ops compared (each skipped with a note when unavailable):

* ``flash_attn``  -- ours (:func:`dist_attn.kernels.flash_attn.flash_attn`, Triton on GPU);
* ``sdpa_kernel`` -- ours through torch's flash ops (:mod:`dist_attn.kernels.flash_attn.sdpa_kernel`);
* ``sdpa``        -- ``torch.nn.functional.scaled_dot_product_attention`` (inputs pre-laid out [B,H,S,D]);
* ``sdpa_flash`` / ``sdpa_cudnn`` / ``sdpa_efficient`` -- the same, pinned to one backend
  (``torch.nn.attention.sdpa_kernel``);
* ``flash_attn_pkg`` -- ``flash_attn.flash_attn_func`` of the flash-attn package, if installed;
* ``lightning_attn`` -- ours (:func:`dist_attn.kernels.lightning_attn.lightning_attn`), per-head decay;
* ``fla_simple_gla`` -- ``fla.ops.simple_gla.chunk_simple_gla`` with the same per-head decay, if installed;
* ``gated_delta`` -- ours (``dist_attn.kernels.gated_delta``, when it exports ``gated_delta_attn``);
* ``fla_gated_delta`` -- ``fla.ops.gated_delta_rule.chunk_gated_delta_rule``, if installed;
* ``flex`` -- ``torch.nn.attention.flex_attention`` (compiled on GPU) with a block mask built from
  the same rule (document / causal / window ``mask_mod``), if importable.

Packed documents and windows (issue 11): points with mask ``docs`` (causal, documents of a seeded
long-tailed length distribution, mean about S/8, ``cu_seqlens`` on the device) or ``window``
(causal, left window W = min(1024, S/4), with the same documents) run ``flash_attn`` and
``sdpa_kernel`` with ``cu_seqlens``/``window_size``, ``sdpa`` / ``sdpa_efficient`` /
``sdpa_cudnn`` with the same rule as a boolean ``attn_mask`` [S, S] (S <= 16K), and ``flex``
with the equivalent block mask; their TFLOP/s count the visible pairs only (4·B·H·D·pairs
forward, from the interval form of ``dist_attn.kernels.flash_attn.masks``).

On a GPU the sweep also writes ``sdpa_select_<gpu>.json``: per (mask class, D, dtype, S) the faster
of ``flash_attn`` (ours) and ``sdpa_kernel`` (torch's op) at fwd+bwd, the table
``softmax_kernel("auto")`` reads (:class:`dist_attn.kernels.flash_attn.sdpa_kernel.SelectTable`).

``--preset gpu_check`` replaces the grid by an ordered list of points, most important first (flash
causal D=128 8K against SDPA's backends, lightning 16K against fla, then the rest: flash 2K-32K
causal/full D 64/128, lightning 2K-64K, gated delta); with ``--budget-s`` the sweep starts no point
once the budget is spent, and the result files are rewritten after every point, so a run that is
killed still leaves what it measured.

FLOP conventions (printed with every run):

* softmax attention forward 4·B·H·Sq·Sk·D (two matmuls of 2·Sq·Sk·D), x0.5 when causal;
  with documents/windows 4·B·H·D·(visible pairs);
  backward 2.5x forward (2.0 for the four matmuls + 0.5 for recomputing QK^T); fwd+bwd 3.5x;
* chunked linear attention (chunk C) forward 4·B·H·N·D·(C + D), backward counted as 2x forward
  (gated delta uses the same count: a lower bound, its WY solve is extra).

Shapes keep the token count fixed (batch = max(1, tokens // seq)) and the model width fixed
(heads = width // D), as the FlashAttention papers do. Without a GPU the script says so and runs a
tiny fp32 size on CPU as a sanity check of the plumbing (the numbers mean nothing there).
Writes ``kernels_<gpu|cpu>.json`` and ``.md`` under ``--out-dir``. ``--preset tiny`` runs one point of
each kind (flash, lightning, docs, window; every masked op) at S=256 on whatever device there is.
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import device_name, write_results
from benchmarks.kernels_masked import (MASKED_OPS, make_masked_op, mask_spec, masked_flops, visible_pairs,
                                       write_select_table)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SOFTMAX_OPS = ("flash_attn", "sdpa_kernel", "sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flash_attn_pkg",
               "flex")
LINEAR_OPS = ("lightning_attn", "fla_simple_gla", "gated_delta", "fla_gated_delta")
DEFAULT_OPS = ("flash_attn", "sdpa", "flash_attn_pkg", "lightning_attn", "fla_simple_gla")
MODES = ("fwd", "bwd", "fwd+bwd")
FLOP_NOTE = ("softmax fwd = 4*B*H*Sq*Sk*D (x0.5 causal; documents/window: 4*B*H*D*visible pairs), "
             "bwd = 2.5x fwd, fwd+bwd = 3.5x fwd; "
             "linear fwd = 4*B*H*N*D*(C+D) with chunk C, bwd = 2x fwd, fwd+bwd = 3x fwd")


def softmax_flops(b, h, sq, sk, d, causal, mode) -> float:
    fwd = 4.0 * b * h * sq * sk * d * (0.5 if causal else 1.0)
    return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


def linear_flops(b, h, n, d, chunk, mode) -> float:
    fwd = 4.0 * b * h * n * d * (chunk + d)
    return fwd * {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}[mode]


def _make_op(name: str, causal: bool):
    """Returns ``(layout, fn(q, k, v, decay) -> out)``; layout "bshd" or "bhsd". Raises ImportError."""
    if name == "flex":
        from torch.nn.attention.flex_attention import flex_attention
        fa = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention
        if not causal:
            return "bhsd", lambda q, k, v, g: fa(q, k, v)
        from torch.nn.attention.flex_attention import create_block_mask
        blocks = {}

        def causal_fa(q, k, v, g):
            key = (q.shape[2], q.device)
            if key not in blocks:
                blocks[key] = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, q.shape[2], q.shape[2],
                                                device=q.device)
            return fa(q, k, v, block_mask=blocks[key])
        return "bhsd", causal_fa
    if name == "flash_attn":
        from dist_attn.kernels.flash_attn import flash_attn
        return "bshd", lambda q, k, v, g: flash_attn(q, k, v, causal=causal)
    if name == "sdpa":
        import torch.nn.functional as F
        return "bhsd", lambda q, k, v, g: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if name == "sdpa_kernel":
        from dist_attn.kernels.flash_attn.sdpa_kernel import sdpa_softmax_kernel
        kern = sdpa_softmax_kernel()
        return "bshd", lambda q, k, v, g: kern(q, k, v, causal=causal)[0]
    if name.startswith("sdpa_"):
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
                   "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}[name]

        def pinned(q, k, v, g):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return "bhsd", pinned
    if name == "flash_attn_pkg":
        from flash_attn import flash_attn_func  # the flash-attn package, not dist_attn.kernels.flash_attn
        return "bshd", lambda q, k, v, g: flash_attn_func(q, k, v, causal=causal)
    if name == "lightning_attn":
        from dist_attn.kernels.lightning_attn import lightning_attn
        return "bshd", lambda q, k, v, g: lightning_attn(q, k, v, decay=g)[0]
    if name == "fla_simple_gla":
        if not torch.cuda.is_available():
            raise ImportError("fla's Triton kernels need a GPU")
        from fla.ops.simple_gla import chunk_simple_gla
        return "bshd", lambda q, k, v, g: chunk_simple_gla(q, k, v, g_gamma=g)[0]
    if name in ("gated_delta", "fla_gated_delta"):
        if name == "gated_delta":
            import dist_attn.kernels.gated_delta as mod
            if not hasattr(mod, "gated_delta_attn"):
                raise ImportError("dist_attn.kernels.gated_delta exports no gated_delta_attn yet")
            fn = mod.gated_delta_attn
        else:
            if not torch.cuda.is_available():
                raise ImportError("fla's Triton kernels need a GPU")
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fn

        def delta(q, k, v, g):
            # unit-norm keys/queries, beta in (0, 1), a per-token log gate <= 0 derived from the head decay
            b, s, h, _ = q.shape
            qn, kn = (torch.nn.functional.normalize(t.float(), dim=-1).to(t.dtype) for t in (q, k))
            beta = torch.full((b, s, h), 0.5, device=q.device, dtype=q.dtype)
            gate = g.view(1, 1, h).expand(b, s, h).to(torch.float32).contiguous()
            res = fn(qn, kn, v, beta, gate) if name == "gated_delta" else fn(qn, kn, v, g=gate, beta=beta)
            return res[0] if isinstance(res, tuple) else res
        return "bshd", delta
    raise ValueError(f"unknown op {name!r}")


def _time_ms(fn, device, warmup: int, rep: int, grad_to_none=None) -> float:
    """Median time of ``fn()`` in ms: ``triton.testing.do_bench`` on GPU (L2 flushed between
    runs), wall clock with the same median on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")
    for _ in range(2):
        fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def bench_one(op: str, b: int, h: int, s: int, d: int, dtype, device, causal: bool, chunk: int,
              warmup: int, rep: int, mask=None) -> list[dict]:
    """Time one op at one shape in every mode; returns one row per mode (``ms`` None on error).
    ``mask`` None, "docs" or "window" (causal; see :func:`mask_spec`)."""
    kind = "softmax" if op in SOFTMAX_OPS else "linear"
    base = dict(op=op, kind=kind, B=b, H=h, S=s, D=d, dtype=str(dtype).replace("torch.", ""),
                causal=causal if kind == "softmax" else True, mask=mask or ("causal" if causal else "full"))
    spec = mask_spec(mask, s)
    try:
        layout, fn = make_masked_op(op, spec, s, device) if mask else _make_op(op, causal)
        shape = (b, s, h, d) if layout == "bshd" else (b, h, s, d)
        q, k, v = (torch.randn(shape, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
        decay = -torch.linspace(0.01, 0.5, h, device=device, dtype=torch.float32)  # log decay per head
        dout = torch.randn(shape, dtype=dtype, device=device)
        qf, kf, vf = q.detach(), k.detach(), v.detach()  # FlexAttention on CPU refuses inputs that need grad
        with torch.no_grad():
            ms_f = _time_ms(lambda: fn(qf, kf, vf, decay), device, warmup, rep)
    except Exception as exc:  # an unavailable op or an OOM must not stop the sweep
        return [dict(base, mode=m, ms=None, tflops=None, note=_note(exc)) for m in MODES]
    ms_b = ms_fb = None
    note = ""
    try:
        out = fn(q, k, v, decay)
        ms_b = _time_ms(lambda: out.backward(dout, retain_graph=True), device, warmup, rep, [q, k, v])
        ms_fb = _time_ms(lambda: fn(q, k, v, decay).backward(dout), device, warmup, rep, [q, k, v])
        del out
    except Exception as exc:  # e.g. no backward on this device: keep the forward
        note = _note(exc)
    rows = []
    pairs = visible_pairs(s, spec) if mask else None
    for mode, ms in zip(MODES, (ms_f, ms_b, ms_fb)):
        if ms is None:
            rows.append(dict(base, mode=mode, ms=None, tflops=None, note=note))
            continue
        if mask:
            fl = masked_flops(b, h, d, pairs, mode)
        elif kind == "softmax":
            fl = softmax_flops(b, h, s, s, d, causal, mode)
        else:
            fl = linear_flops(b, h, s, d, chunk, mode)
        rows.append(dict(base, mode=mode, ms=ms, tflops=fl / (ms * 1e-3) / 1e12,
                         note=f"{pairs} visible pairs" if mask else ""))
    return rows


def _note(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Kernel benchmark: ours vs SDPA / flash-attn / fla (fwd, bwd, fwd+bwd).",
                                epilog=FLOP_NOTE)
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768],
                   help="sequence lengths (Sq = Sk)")
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128], help="head dims D")
    p.add_argument("--tokens", type=int, default=32768, help="tokens per batch: batch = max(1, tokens // seq)")
    p.add_argument("--width", type=int, default=2048, help="model width: heads = width // D")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--no-causal", action="store_true", help="full (non-causal) softmax attention")
    p.add_argument("--chunk", type=int, default=64, help="chunk size C in the linear-attention FLOP count")
    p.add_argument("--ops", nargs="+", default=list(DEFAULT_OPS), choices=list(SOFTMAX_OPS + LINEAR_OPS))
    p.add_argument("--masks", nargs="+", default=["none"], choices=["none", "docs", "window"],
                   help="grid: also documents / window (causal) points, for the ops that take them")
    p.add_argument("--preset", choices=["grid", "gpu_check", "tiny"], default="grid",
                   help="grid: every op x seq x head dim (x mask); gpu_check: the ordered point list of "
                        "gpu_check.sh; tiny: one point of each kind at S=256 (a plumbing check on any device)")
    p.add_argument("--budget-s", type=float, default=None, help="start no new point after this many seconds")
    p.add_argument("--name", default=None, help="result file name (default kernels_<gpu|cpu>)")
    p.add_argument("--warmup", type=int, default=25, help="GPU warm-up time per measurement, ms")
    p.add_argument("--rep", type=int, default=100, help="GPU measuring time per measurement, ms")
    p.add_argument("--out-dir", default="benchmarks/results")
    return p.parse_args(argv)


def gpu_check_points(full_ops=True) -> list[tuple]:
    """The ordered points of ``--preset gpu_check``: ``(op, seq, head_dim, causal, mask)``, most
    important first, so that a budget cut drops the least informative ones. Documents and windows
    (8K and 16K, D=128: ours, torch's op through ours, SDPA with a boolean mask; FlexAttention at 8K,
    whose compiles are slow) come after the main flash and lightning points."""
    flash_peers = ["flash_attn", "sdpa_cudnn", "sdpa_flash", "sdpa_kernel", "flash_attn_pkg"]
    short_peers = ["flash_attn", "sdpa_kernel", "sdpa_cudnn", "sdpa_flash"]
    pts = [(op, 8192, 128, True) for op in flash_peers + ["sdpa_efficient"]]
    pts += [(op, 16384, 128, True) for op in ("lightning_attn", "fla_simple_gla")]
    pts += [(op, s, 128, True) for s in (2048, 4096, 16384, 32768) for op in flash_peers]
    pts = [p + (None,) for p in pts]
    masked_peers = [op for op in MASKED_OPS if op != "flex"]
    pts += [(op, s, 128, True, m) for s in (8192, 16384) for m in ("docs", "window") for op in masked_peers]
    pts += [("flex", 8192, 128, True, m) for m in ("docs", "window")]  # last: each compile takes tens of s
    more = [(op, s, 128, True) for s in (2048, 4096, 8192, 32768, 65536) for op in ("lightning_attn", "fla_simple_gla")]
    more += [(op, s, 64, True) for s in (2048, 8192, 32768) for op in short_peers]
    more += [(op, s, d, False) for d in (128, 64) for s in (2048, 8192, 32768) for op in short_peers]
    more += [(op, s, 128, True) for s in (2048, 8192, 16384, 65536) for op in ("gated_delta", "fla_gated_delta")]
    more += [(op, s, 64, True) for s in (4096, 16384) for op in short_peers]
    more += [(op, s, 64, False) for s in (4096, 16384) for op in short_peers]
    return pts + [p + (None,) for p in more]


def tiny_points() -> list[tuple]:
    """``--preset tiny``: one point of each kind at S=256, D=64 (every op that takes documents)."""
    pts = [("flash_attn", 256, 64, True, None), ("sdpa_kernel", 256, 64, True, None), ("flex", 256, 64, True, None),
           ("lightning_attn", 256, 64, True, None)]
    return pts + [(op, 256, 64, True, m) for m in ("docs", "window") for op in MASKED_OPS]


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype, seqs, dims, tokens, width = DTYPES[args.dtype], args.seqs, args.head_dims, args.tokens, args.width
    causal = not args.no_causal
    if args.preset == "gpu_check":
        points = gpu_check_points()
        if not on_gpu:  # the plumbing only, tiny: one flash and one lightning point
            points = [("flash_attn", 256, 64, True, None), ("lightning_attn", 256, 64, True, None)]
    elif args.preset == "tiny":
        points = tiny_points()
    else:
        masks = [None if m == "none" else m for m in args.masks]
        points = [(op, s, d, causal if m is None else True, m) for m in masks for d in dims for s in seqs
                  for op in args.ops if m is None or op in MASKED_OPS]
    if not on_gpu:
        print("No GPU found: running a tiny fp32 sanity size on CPU (plumbing check; timings are not meaningful).")
        dtype, tokens, width = torch.float32, 256, 128
        if args.preset != "tiny":
            points = list(dict.fromkeys((op, 256, 64, c, m) for op, _, _, c, m in points))[:4]
    if args.preset == "tiny":
        tokens, width = 256, 128
    print(f"device: {device_name()}\nFLOPs: {FLOP_NOTE}")
    meta = dict(device=device_name(), dtype=str(dtype), flops=FLOP_NOTE, torch=torch.__version__,
                triton=_version("triton"), cuda=torch.version.cuda, preset=args.preset,
                shapes=f"batch = max(1, {tokens} // S), heads = {width} // D",
                masks="docs: seeded log-normal document lengths (median S/16), causal; window: the same "
                      "documents and a left window min(1024, S/4); TFLOP/s on visible pairs")
    name = args.name or ("kernels_gpu" if on_gpu else "kernels_cpu")
    cols = ["op", "mode", "mask", "B", "H", "S", "D", "ms", "tflops", "note"]
    rows, skipped, paths, table = [], 0, (), None
    for op, s, d, c, m in points:
        if args.budget_s is not None and time.perf_counter() - t_start > args.budget_s:
            skipped += 1
            continue
        b, h = max(1, tokens // s), max(1, width // d)
        new = bench_one(op, b, h, s, d, dtype, device, c, args.chunk, args.warmup, args.rep, mask=m)
        rows += new
        cells = "  ".join(f"{r['mode']} {r['ms']:.3f} ms {r['tflops']:.3g} TFLOP/s" if r["ms"] is not None
                          else f"{r['mode']} -" for r in new)
        print(f"{op:>15} {new[0]['mask']:>6} B={b} H={h} S={s} D={d}: {cells} {new[-1]['note'] or new[0]['note']}")
        if on_gpu:
            torch.cuda.empty_cache()
        meta["points_skipped_for_budget"] = skipped
        paths = write_results(name, rows, cols, meta, args.out_dir)  # after every point: a kill keeps them
        table = write_select_table(rows, args.out_dir) or table
    if skipped:
        print(f"budget of {args.budget_s} s spent: {skipped} of {len(points)} points not run")
    meta["points_skipped_for_budget"] = skipped
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)
    paths = write_results(name, rows, cols, meta, args.out_dir)
    print("wrote", *paths, *([table] if table else []))
    return rows


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except Exception as exc:  # noqa: BLE001 -- a missing package is a fact to record, not an error
        return f"not importable ({type(exc).__name__})"


if __name__ == "__main__":
    main()
