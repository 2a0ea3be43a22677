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


def _config(kind: str, block_d: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch options for ``kind`` in {"fwd", "dkdv", "dq"}.

    Under the interpreter every tile op is a numpy call, so the tile count matters more than the
    tile size: 64 x 64 still spans several tiles with ragged edges at the test lengths (63, 200,
    257) while running several times faster than 32 x 32. Otherwise :func:`gpu_config`.
    """
    if triton_interpreting():
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)
    return gpu_config(kind, block_d, dtype)


def gpu_config(kind: str, block_d: int, dtype: torch.dtype) -> dict:
    """GPU tiles (H100-class, ~228 KB shared memory per SM), a fixed heuristic, not autotuned.

    The forward keeps a 128-row query tile and streams 64-key tiles; dK/dV keeps a 128-key tile
    resident and streams 32-row query tiles; dQ the opposite (the split of the Triton
    fused-attention tutorial). fp32 tiles cost twice the shared memory, so they are halved.
    The tests also run these shapes under the interpreter (uneven BLOCK_M / BLOCK_N edges).
    Warps and tiles keep every bf16 kernel free of register spills on sm_90a at D 64/128, MHA and
    GQA 4:1 (measured by ``benchmarks/kernels_aot.py``): 8 warps for the forward and dK/dV at D=64
    too (4 warps spilled 4 B and 80-336 B), and 16-row query tiles for dK/dV at D=128 (the GQA
    loop over the group's query heads spilled 120 B with 32-row tiles).
    """
    big_d = block_d > 64
    if kind == "fwd":
        cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    elif kind == "dkdv":
        cfg = dict(BLOCK_M=16 if big_d else 32, BLOCK_N=128, num_warps=8, num_stages=2 if big_d else 3)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=32, num_warps=8 if big_d else 4, num_stages=3)
    if dtype == torch.float32:
        cfg["BLOCK_M"] = max(cfg["BLOCK_M"] // 2, 16)
        cfg["BLOCK_N"] = max(cfg["BLOCK_N"] // 2, 16)
        cfg["num_stages"] = 2
    return cfg


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
    cfg = _config("fwd", block_d, q.dtype)
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
    cfg = _config("dkdv", block_d, q.dtype)
    _attn_bwd_dkdv[(triton.cdiv(sk, cfg["BLOCK_N"]), b * hkv)](
        q, k, v, dout, lse2, delta, dk, dv, qlo, qhi, *common, hq, hkv, sq, sk, d, hq // hkv, scale,
        int(q_offset), int(k_offset), CAUSAL=bool(causal), INTERVALS=masked, BLOCK_D=block_d,
        DOT_FP32=dot_fp32, **cfg)
    lo, hi = _intervals(row_intervals, q, sq, sk, causal, q_offset, k_offset, cu_seqlens, window_size)
    cfg = _config("dq", block_d, q.dtype)
    _attn_bwd_dq[(triton.cdiv(sq, cfg["BLOCK_M"]), b * hq)](
        q, k, v, dout, lse2, delta, dq, lo, hi, *common, hq, sq, sk, d, hq // hkv, scale,
        int(q_offset), int(k_offset), CAUSAL=bool(causal), INTERVALS=masked, BLOCK_D=block_d,
        DOT_FP32=dot_fp32, **cfg)
    return dq, dk, dv
