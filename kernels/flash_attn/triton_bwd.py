"""Triton backward kernels of softmax attention, from the saved (possibly merged) log-sum-exp.

Math per (batch, query head), with s = scale * q k^T, P = exp(s - lse) and
delta_i = rowsum(dout_i * out_i) - dlse_i::

    dV = P^T dout      dP = dout V^T      dS = P * (dP - delta)
    dQ = scale * dS K  dK = scale * dS^T Q

When ``out``/``lse`` are the merge of several key blocks (ring attention), P above is this block's
share of the merged softmax and the formulas return exactly this block's share of the gradient.

Three kernels, no atomics:
  * ``_bwd_preprocess``: delta, and lse in base 2 (lse2 = log2(e) * lse, +inf for rows that saw no
    key, so exp2(t - lse2) = 0 there instead of NaN);
  * ``_attn_bwd_dkdv``: one program per (key block, batch, KV head) loops over the G query heads of
    its group and over query blocks, accumulating dK, dV in registers (GQA sum included);
  * ``_attn_bwd_dq``: one program per (query block, batch, query head) loops over key blocks.
Visibility: dQ uses the per-row key intervals of the forward (:func:`.triton_fwd._row_bounds`);
dK/dV uses the transposed form, per key j the query rows [qlo_j, qhi_j) that see it (QLO/QHI int32
vectors with documents / a window, else computed from the causal offsets). Blocks invisible to every
pair are skipped; fully visible blocks run without masks.
See :mod:`dist_attn.kernels.flash_attn.triton_fwd` for the ``DOT_FP32`` interpreter flag.
"""
from __future__ import annotations

import triton
import triton.language as tl

from dist_attn.kernels.flash_attn.triton_fwd import LOG2E, _block_ranges, _dot, _row_bounds


@triton.jit
def _bwd_preprocess(O, DO, LSE, DLSE, DELTA, LSE2,
                    stride_ob, stride_os, stride_oh, stride_od,
                    stride_dob, stride_dos, stride_doh, stride_dod,
                    Hq, Sq, D, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (cdiv(Sq, BLOCK_M), B * Hq). LSE, DLSE, DELTA, LSE2 are contiguous fp32 [B, Hq, Sq]."""
    bh = tl.program_id(1)
    off_b = (bh // Hq).to(tl.int64)
    off_h = bh % Hq
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < Sq) & (offs_d[None, :] < D)
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dos
                 + offs_d[None, :] * stride_dod, mask=mask, other=0.0).to(tl.float32)
    row = bh.to(tl.int64) * Sq + offs_m
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + row, mask=offs_m < Sq, other=0.0)
    lse = tl.load(LSE + row, mask=offs_m < Sq, other=0.0)
    tl.store(DELTA + row, delta, mask=offs_m < Sq)
    tl.store(LSE2 + row, tl.where(lse == float("-inf"), float("inf"), lse * LOG2E), mask=offs_m < Sq)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse2_base, delta_base, stride_qs, stride_qd, stride_dos, stride_dod,
                offs_n, offs_d, lo, hi, Sq, Sk, D, qk_scale, col_lo, col_hi,
                BLOCK_M: tl.constexpr, MASKED: tl.constexpr, DOT_FP32: tl.constexpr):
    """Accumulate one key block's dK, dV over query blocks [lo, hi), in transposed form
    (key rows x query columns) so no [BLOCK_M, BLOCK_N] tile needs a register transpose."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Sq  # rows past Sq load q = do = 0 and lse2 = +inf, so they add nothing
        qt = tl.load(q_base + offs_m[None, :] * stride_qs + offs_d[:, None] * stride_qd,
                     mask=row_ok[None, :] & (offs_d[:, None] < D), other=0.0)  # Q^T [BLOCK_D, BLOCK_M]
        lse2 = tl.load(lse2_base + offs_m, mask=row_ok, other=float("inf"))
        pt = tl.exp2(_dot(k, qt, DOT_FP32) * qk_scale - lse2[None, :])  # P^T [BLOCK_N, BLOCK_M]
        if MASKED:  # keys past Sk have an empty row range
            visible = (offs_m[None, :] >= col_lo[:, None]) & (offs_m[None, :] < col_hi[:, None])
            pt = tl.where(visible, pt, 0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod,
                     mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)  # [BLOCK_M, BLOCK_D]
        dv += _dot(pt.to(do.dtype), do, DOT_FP32)  # dV += P^T dout
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        dpt = _dot(v, tl.trans(do), DOT_FP32)  # dP^T = V dout^T
        dst = pt * (dpt - delta[None, :])  # dS^T = P^T (dP^T - delta)
        dk += _dot(dst.to(qt.dtype), tl.trans(qt), DOT_FP32)  # dK += dS^T Q (scale applied once later)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE2, DELTA, DK, DV, QLO, QHI,
                   stride_qb, stride_qs, stride_qh, stride_qd,
                   stride_kb, stride_ks, stride_kh, stride_kd,
                   stride_vb, stride_vs, stride_vh, stride_vd,
                   stride_dob, stride_dos, stride_doh, stride_dod,
                   Hq, Hkv, Sq, Sk, D, GROUP, sm_scale, q_offset, k_offset,
                   CAUSAL: tl.constexpr, INTERVALS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr):
    """Grid (cdiv(Sk, BLOCK_N), B * Hkv). DK, DV contiguous [B, Sk, Hkv, D] in the input dtype."""
    tl.static_assert(BLOCK_M % 16 == 0 and BLOCK_N % 16 == 0, "tl.dot needs tiles of at least 16")
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    off_b = (bh // Hkv).to(tl.int64)
    off_kvh = bh % Hkv
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < Sk) & (offs_d[None, :] < D)
    k = tl.load(K + off_b * stride_kb + off_kvh * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + off_b * stride_vb + off_kvh * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # query rows [col_lo_j, col_hi_j) see key j; both never decrease with j
    last = tl.minimum(start_n + BLOCK_N, Sk) - 1
    if INTERVALS:
        col_lo = tl.load(QLO + offs_n, mask=offs_n < Sk, other=0)
        col_hi = tl.load(QHI + offs_n, mask=offs_n < Sk, other=0)
        lo_first = tl.load(QLO + start_n)
        lo_last = tl.load(QLO + last)
        hi_first = tl.load(QHI + start_n)
        hi_last = tl.load(QHI + last)
    else:
        if CAUSAL:  # row i sees key j iff k_offset + j <= q_offset + i
            col_lo = tl.minimum(tl.maximum(k_offset + offs_n - q_offset, 0), Sq)
            lo_first = tl.minimum(tl.maximum(k_offset + start_n - q_offset, 0), Sq)
            lo_last = tl.minimum(tl.maximum(k_offset + last - q_offset, 0), Sq)
        else:
            col_lo = offs_n * 0
            lo_first = start_n * 0
            lo_last = lo_first
        col_hi = tl.where(offs_n < Sk, Sq, 0)
        hi_first = lo_first * 0 + Sq
        hi_last = hi_first
    lo_last = tl.where(start_n + BLOCK_N > Sk, hi_last, lo_last)  # a ragged last key block: masked throughout
    a0, a1, u0, u1, b0 = _block_ranges(lo_first, lo_last, hi_first, hi_last, BLOCK_M)
    qk_scale = sm_scale * LOG2E
    for g in range(GROUP):  # the query heads sharing this KV head: dK, dV sum over them
        off_h = off_kvh * GROUP + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        row_base = (off_b * Hq + off_h) * Sq
        # masked [a0, a1), unmasked [u0, u1), masked [b0, hi_last)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE2 + row_base, DELTA + row_base,
                             stride_qs, stride_qd, stride_dos, stride_dod, offs_n, offs_d, u0, u1,
                             Sq, Sk, D, qk_scale, col_lo, col_hi, BLOCK_M, False, DOT_FP32)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE2 + row_base, DELTA + row_base,
                             stride_qs, stride_qd, stride_dos, stride_dod, offs_n, offs_d, a0, a1,
                             Sq, Sk, D, qk_scale, col_lo, col_hi, BLOCK_M, True, DOT_FP32)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE2 + row_base, DELTA + row_base,
                             stride_qs, stride_qd, stride_dos, stride_dod, offs_n, offs_d, b0, hi_last,
                             Sq, Sk, D, qk_scale, col_lo, col_hi, BLOCK_M, True, DOT_FP32)
    out_off = off_b * Sk * Hkv * D + off_kvh * D + offs_n[:, None] * (Hkv * D) + offs_d[None, :]
    tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
              offs_m, offs_d, lo, hi, Sk, D, qk_scale, row_lo, row_hi,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_FP32: tl.constexpr):
    """Accumulate one query block's dQ over key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        t_mask = offs_d[:, None] < D
        if MASKED:
            t_mask = t_mask & (offs_n[None, :] < Sk)
        kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=t_mask, other=0.0)
        vt = tl.load(v_base + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd, mask=t_mask, other=0.0)
        p = tl.exp2(_dot(q, kt, DOT_FP32) * qk_scale - lse2[:, None])  # [BLOCK_M, BLOCK_N]
        if MASKED:  # row_hi <= Sk, so keys past Sk are masked too
            visible = (offs_n[None, :] >= row_lo[:, None]) & (offs_n[None, :] < row_hi[:, None])
            p = tl.where(visible, p, 0.0)
        dp = _dot(do, vt, DOT_FP32)  # dP = dout V^T
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), DOT_FP32)  # dQ += dS K (scale applied once later)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE2, DELTA, DQ, LO, HI,
                 stride_qb, stride_qs, stride_qh, stride_qd,
                 stride_kb, stride_ks, stride_kh, stride_kd,
                 stride_vb, stride_vs, stride_vh, stride_vd,
                 stride_dob, stride_dos, stride_doh, stride_dod,
                 Hq, Sq, Sk, D, GROUP, sm_scale, q_offset, k_offset,
                 CAUSAL: tl.constexpr, INTERVALS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr):
    """Grid (cdiv(Sq, BLOCK_M), B * Hq). DQ contiguous [B, Sq, Hq, D] in the input dtype."""
    tl.static_assert(BLOCK_M % 16 == 0 and BLOCK_N % 16 == 0, "tl.dot needs tiles of at least 16")
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # longest causal programs first
    bh = tl.program_id(1)
    off_b = (bh // Hq).to(tl.int64)
    off_h = bh % Hq
    off_kvh = off_h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < Sq) & (offs_d[None, :] < D)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=mask, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dos
                 + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
    row = bh.to(tl.int64) * Sq + offs_m
    lse2 = tl.load(LSE2 + row, mask=offs_m < Sq, other=float("inf"))
    delta = tl.load(DELTA + row, mask=offs_m < Sq, other=0.0)
    k_base = K + off_b * stride_kb + off_kvh * stride_kh
    v_base = V + off_b * stride_vb + off_kvh * stride_vh
    # same key ranges as the forward
    row_lo, row_hi, lo_first, lo_last, hi_first, hi_last = _row_bounds(
        LO, HI, start_m, offs_m, Sq, Sk, q_offset, k_offset, CAUSAL, INTERVALS, BLOCK_M)
    a0, a1, u0, u1, b0 = _block_ranges(lo_first, lo_last, hi_first, hi_last, BLOCK_N)
    qk_scale = sm_scale * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                   offs_m, offs_d, u0, u1, Sk, D, qk_scale, row_lo, row_hi, BLOCK_N, False, DOT_FP32)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                   offs_m, offs_d, a0, a1, Sk, D, qk_scale, row_lo, row_hi, BLOCK_N, True, DOT_FP32)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                   offs_m, offs_d, b0, hi_last, Sk, D, qk_scale, row_lo, row_hi, BLOCK_N, True, DOT_FP32)
    out_off = off_b * Sq * Hq * D + off_h * D + offs_m[:, None] * (Hq * D) + offs_d[None, :]
    tl.store(DQ + out_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask)
