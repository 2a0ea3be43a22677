"""Host wrappers of the Triton softmax-attention kernels: validation, block sizes, launches.

Contract (see :mod:`dist_attn.kernels.interface`; no autograd in here)::

    fwd(q, k, v, *, causal, softmax_scale, q_offset, k_offset, cu_seqlens=None, window_size=None)
        -> out [B,Sq,Hq,D] (q.dtype), lse fp32 [B,Hq,Sq]
    bwd(dout, q, k, v, out, lse, *, ..., dlse=None, cu_seqlens=None, window_size=None) -> dq, dk, dv

With documents or a window the per-row key intervals (and, for dK/dV, the per-key query intervals)
are computed on the device by :mod:`.masks` (a few tiny torch ops, no host sync) and passed to the
kernels as int32 vectors; without them the kernels derive the causal intervals from the offsets.

Inputs may be non-contiguous: every kernel takes the four strides of each [B, S, H, D] tensor.
Head dims 32/64/96/128 are padded to the next power of two inside the kernels (masked columns).
Block sizes come from a fixed heuristic rather than ``triton.autotune``: several autotune configs do
not work under the Triton 3.7 interpreter, and the tests run the same launch path as the GPU.
The kernels themselves live in :mod:`~dist_attn.kernels.flash_attn.triton_fwd` and
:mod:`~dist_attn.kernels.flash_attn.triton_bwd`.
"""
from __future__ import annotations

import torch
import triton

from dist_attn.kernels.flash_attn.masks import check_mask_args, col_intervals, has_mask, row_intervals
from dist_attn.kernels.flash_attn.torch_kernel import check_inputs
from dist_attn.kernels.flash_attn.triton_bwd import _attn_bwd_dkdv, _attn_bwd_dq, _bwd_preprocess
from dist_attn.kernels.flash_attn.triton_fwd import _attn_fwd
from dist_attn.kernels.interface import triton_interpreting

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Head dims are padded to a power of two (>= 16) inside the kernels; tiles are sized for D <= 128.
MAX_HEAD_DIM = 128


def _strides(t: torch.Tensor):
    return tuple(t.stride())


H100_SMS = 132  # streaming multiprocessors of an H100/H200 SXM: the AOT compile's assumption
_SMS: dict = {}


def sm_count(device: torch.device) -> int:
    """SMs of ``device`` (a host-side property, cached: no sync); 132 (H100/H200) off CUDA (AOT, meta)."""
    if device.type != "cuda":
        return H100_SMS
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def _sms(device: torch.device) -> int:
    """SM count for the small-grid rules; 0 (rules off) under the interpreter, where the tiles are
    fixed (tests patch this and ``_config`` to run the GPU rules under the interpreter)."""
    return 0 if triton_interpreting() else sm_count(device)


def _config(kind: str, block_d: int, dtype: torch.dtype, seq_len=None, batch_heads=None, sms=H100_SMS) -> dict:
    """Tile sizes and launch options for ``kind`` in {"fwd", "dkdv", "dq"}.

    Under the interpreter every tile op is a numpy call, so the tile count matters more than the
    tile size: 64 x 64 still spans several tiles with ragged edges at the test lengths (63, 200,
    257) while running several times faster than 32 x 32. Otherwise :func:`gpu_config`.
    """
    if triton_interpreting():
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)
    return gpu_config(kind, block_d, dtype, seq_len, batch_heads, sms)


def _small_grid(n_programs: int, sms: int) -> bool:
    """Fewer programs than about two waves of the SMs (at most one resident program per SM at these
    tiles): smaller tiles make more programs and balance better (ring shards, short blocks)."""
    return n_programs < 2 * sms


def gpu_config(kind: str, block_d: int, dtype: torch.dtype, seq_len: int | None = None,
               batch_heads: int | None = None, sms: int = H100_SMS) -> dict:
    """GPU tiles (H100-class, ~228 KB shared memory per SM), a fixed heuristic, not autotuned.

    The forward keeps a 128-row query tile and streams 64-key tiles; dK/dV keeps a 128-key tile
    resident and streams 32-row query tiles; dQ the opposite (the split of the Triton
    fused-attention tutorial). fp32 tiles cost twice the shared memory, so they are halved.
    The tests also run these shapes under the interpreter (uneven BLOCK_M / BLOCK_N edges).
    Warps and tiles keep every bf16 kernel free of register spills on sm_90a at D 64/128, MHA and
    GQA 4:1 (measured by ``benchmarks/kernels_aot.py``): 8 warps for the forward and dK/dV at D=64
    too (4 warps spilled 4 B and 80-336 B), and 16-row query tiles for dK/dV at D=128 (the GQA
    loop over the group's query heads spilled 120 B with 32-row tiles).

    Small grids: given ``seq_len`` (Sq for fwd/dQ, Sk for dK/dV) and ``batch_heads`` (B*Hq; for
    dK/dV B*Hkv*split, see :func:`gqa_split`), n_programs = cdiv(seq_len, resident tile) *
    batch_heads at the tiles above. Below two waves of ``sms`` SMs the resident tile (query rows for
    fwd/dQ, keys for dK/dV) drops to 64, doubling the programs, with 4 warps (one warpgroup, wgmma
    M = 64) except the D=128 forward (8 warps: 4 spilled 32 B); spill-free on sm_90a as well (the
    small-grid rows of the AOT table).
    """
    big_d = block_d > 64
    if kind == "fwd":
        cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    elif kind == "dkdv":
        cfg = dict(BLOCK_M=16 if big_d else 32, BLOCK_N=128, num_warps=8, num_stages=2 if big_d else 3)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=32, num_warps=8 if big_d else 4, num_stages=3)
    if seq_len is not None and batch_heads is not None:
        tile = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
        if _small_grid(triton.cdiv(seq_len, cfg[tile]) * batch_heads, sms):
            cfg[tile] = 64
            cfg["num_warps"] = 8 if kind == "fwd" and big_d else 4  # fwd D=128 at 4 warps spilled 32 B
    if dtype == torch.float32:
        cfg["BLOCK_M"] = max(cfg["BLOCK_M"] // 2, 16)
        cfg["BLOCK_N"] = max(cfg["BLOCK_N"] // 2, 16)
        cfg["num_stages"] = 2
    return cfg


def gqa_split(sk: int, batch_kv_heads: int, group: int, block_n: int = 128, sms: int = H100_SMS) -> int:
    """How many dK/dV programs share one KV head's G query heads (1: one program loops over all G).

    dK/dV runs one program per (key block, batch, KV head) looping over the G query heads of the
    group, so GQA divides its grid by G. Below two waves the wrapper gives each of ``split``
    programs G/split of the heads: K/V are repeated ``split`` times (KV head h' = h*split + s with
    the kernel's GROUP = G/split, so query head h'*G/split + g = h*G + s*G/split + g is unchanged),
    each program writes an fp32 partial dK/dV and the host sums the ``split`` partials (fp32, one
    rounding to the input dtype, as the fused loop). No kernel change; costs a K/V copy and two fp32
    partials of B*Sk*Hkv*split*D, small exactly when the grid is small. ``split`` is the smallest
    divisor of G that reaches two waves, else G.
    """
    n = triton.cdiv(sk, block_n) * batch_kv_heads
    if group <= 1 or not _small_grid(n, sms):
        return 1
    for split in range(2, group + 1):
        if group % split == 0 and n * split >= 2 * sms:
            return split
    return group


def _check_int32_offsets(op: str, *tensors) -> None:
    """Row offsets inside one batch element are int32 in the kernels (the batch offset is int64)."""
    for t in tensors:
        span = sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:])) + 1
        if span >= 2 ** 31:
            raise ValueError(f"{op}: one batch element expected to span < 2^31 elements, got {span} for shape "
                             f"{tuple(t.shape)}. Fix: shard the sequence further (context parallelism) "
                             f"or call the kernel on sequence chunks.")


def _scale(q, softmax_scale):
    return q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)


def _intervals(fn, q, sq, sk, causal, q_offset, k_offset, cu_seqlens, window_size):
    """int32 interval vectors on q's device, or two 1-element dummies when there is no mask."""
    if not has_mask(cu_seqlens, window_size):
        dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
        return dummy, dummy
    dev = q.device if cu_seqlens is None else cu_seqlens.device
    if cu_seqlens is None:
        lo, hi = fn(sq, sk, int(q_offset), int(k_offset), causal, None, window_size, device=dev)
    else:
        lo, hi = fn(sq, sk, int(q_offset), int(k_offset), causal, cu_seqlens, window_size)
    return lo.to(q.device).contiguous(), hi.to(q.device).contiguous()


def fwd(q, k, v, *, causal=False, softmax_scale=None, q_offset=0, k_offset=0, cu_seqlens=None, window_size=None):
    """Flash-attention forward on Triton. Returns ``out [B,Sq,Hq,D]`` (q.dtype) and ``lse`` fp32 ``[B,Hq,Sq]``."""
    check_inputs("flash_attn(triton).fwd", q, k, v, TRITON_DTYPES, MAX_HEAD_DIM)
    check_mask_args("flash_attn(triton).fwd", q, k.shape[1], causal, q_offset, k_offset, cu_seqlens, window_size)
    _check_int32_offsets("flash_attn(triton).fwd", q, k, v)
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    out = torch.empty((b, sq, hq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    if sq == 0:
        return out, lse
    block_d = triton.next_power_of_2(d)
    cfg = _config("fwd", block_d, q.dtype, sq, b * hq, _sms(q.device))
    grid = (triton.cdiv(sq, cfg["BLOCK_M"]), b * hq)
    lo, hi = _intervals(row_intervals, q, sq, sk, causal, q_offset, k_offset, cu_seqlens, window_size)
    _attn_fwd[grid](q, k, v, out, lse, lo, hi, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                    hq, sq, sk, d, hq // hkv, _scale(q, softmax_scale), int(q_offset), int(k_offset),
                    CAUSAL=bool(causal), INTERVALS=has_mask(cu_seqlens, window_size), BLOCK_D=block_d,
                    DOT_FP32=triton_interpreting(), **cfg)
    return out, lse


def bwd(dout, q, k, v, out, lse, *, causal=False, softmax_scale=None, q_offset=0, k_offset=0, dlse=None,
        cu_seqlens=None, window_size=None):
    """Flash-attention backward on Triton from the saved (or merged) ``out``/``lse``.

    ``dlse`` ``[B,Hq,Sq]`` is the gradient flowing into ``lse`` (None means zero); it enters only
    through delta = rowsum(dout * out) - dlse. Returns ``dq, dk, dv`` in the input dtypes.
    """
    check_inputs("flash_attn(triton).bwd", q, k, v, TRITON_DTYPES, MAX_HEAD_DIM)
    check_mask_args("flash_attn(triton).bwd", q, k.shape[1], causal, q_offset, k_offset, cu_seqlens, window_size)
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    if dout.shape != q.shape or out.shape != q.shape or tuple(lse.shape) != (b, hq, sq):
        raise ValueError(f"flash_attn(triton).bwd: dout/out expected {tuple(q.shape)} and lse {(b, hq, sq)}, got "
                         f"dout {tuple(dout.shape)}, out {tuple(out.shape)}, lse {tuple(lse.shape)}. "
                         f"Fix: pass the out/lse returned by fwd (or their merge) for these queries.")
    dout = dout.to(q.dtype)  # the dot operands must share one dtype
    _check_int32_offsets("flash_attn(triton).bwd", q, k, v, dout, out)
    dq = torch.empty((b, sq, hq, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, sk, hkv, d), dtype=k.dtype, device=q.device)
    dv = torch.empty((b, sk, hkv, d), dtype=v.dtype, device=q.device)
    if sq == 0 or sk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    block_d = triton.next_power_of_2(d)
    dot_fp32 = triton_interpreting()
    scale = _scale(q, softmax_scale)
    lse = lse.to(torch.float32).contiguous()
    delta = torch.empty_like(lse)
    lse2 = torch.empty_like(lse)
    has_dlse = dlse is not None
    dlse_t = dlse.to(torch.float32).contiguous() if has_dlse else lse  # dummy pointer when absent
    pre_m = 64
    _bwd_preprocess[(triton.cdiv(sq, pre_m), b * hq)](
        out, dout, lse, dlse_t, delta, lse2, *_strides(out), *_strides(dout), hq, sq, d,
        HAS_DLSE=has_dlse, BLOCK_M=pre_m, BLOCK_D=block_d)
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout))
    masked = has_mask(cu_seqlens, window_size)
    qlo, qhi = _intervals(col_intervals, q, sq, sk, causal, q_offset, k_offset, cu_seqlens, window_size)
    sms = _sms(q.device)
    group = hq // hkv
    split = gqa_split(sk, b * hkv, group, sms=sms) if sms else 1
    cfg = _config("dkdv", block_d, q.dtype, sk, b * hkv * split, sms)
    ks, vs, dks, dvs = k, v, dk, dv
    if split > 1:  # see gqa_split: KV head h' = h*split + s serves query heads h*G + s*G/split + [0, G/split)
        ks, vs = (t.repeat_interleave(split, dim=2) for t in (k, v))
        dks, dvs = (torch.empty((b, sk, hkv * split, d), dtype=torch.float32, device=q.device) for _ in range(2))
    _attn_bwd_dkdv[(triton.cdiv(sk, cfg["BLOCK_N"]), b * hkv * split)](
        q, ks, vs, dout, lse2, delta, dks, dvs, qlo, qhi, *_strides(q), *_strides(ks), *_strides(vs),
        *_strides(dout), hq, hkv * split, sq, sk, d, group // split, scale,
        int(q_offset), int(k_offset), CAUSAL=bool(causal), INTERVALS=masked, BLOCK_D=block_d,
        DOT_FP32=dot_fp32, **cfg)
    if split > 1:  # sum the fp32 partials of each KV head, one rounding to the input dtype
        dk.copy_(dks.view(b, sk, hkv, split, d).sum(3))
        dv.copy_(dvs.view(b, sk, hkv, split, d).sum(3))
    lo, hi = _intervals(row_intervals, q, sq, sk, causal, q_offset, k_offset, cu_seqlens, window_size)
    cfg = _config("dq", block_d, q.dtype, sq, b * hq, sms)
    _attn_bwd_dq[(triton.cdiv(sq, cfg["BLOCK_M"]), b * hq)](
        q, k, v, dout, lse2, delta, dq, lo, hi, *common, hq, sq, sk, d, hq // hkv, scale,
        int(q_offset), int(k_offset), CAUSAL=bool(causal), INTERVALS=masked, BLOCK_D=block_d,
        DOT_FP32=dot_fp32, **cfg)
    return dq, dk, dv
