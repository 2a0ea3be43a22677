"""Triton forward kernel of softmax attention with log-sum-exp (FlashAttention-2 style).

One program owns BLOCK_M query rows of one (batch, query head) and streams the key/value blocks of
the matching KV head (GQA: kv head = query head // G) through an online softmax. Scores live in the
base-2 domain, t = s * log2(e) with log2(e) = 1.44269504 = 1/ln 2, because exp(s) = exp2(t) and
exp2 is the native GPU instruction; the returned lse is converted back: lse = ln 2 * (m + log2 l).

Visibility is one key interval per query row, [lo_i, hi_i) in local key indices: [0, Sk) for full
attention, [0, q_offset + i + 1 - k_offset) for causal (global positions), and with packed documents
or a window the intervals of :mod:`dist_attn.kernels.flash_attn.masks`, precomputed on the device and
passed as int32 vectors LO/HI (``INTERVALS``). lo and hi never decrease with i, so for a block of rows
[first, last] the key range splits into:
  [lo_first, hi_last) outside it      invisible to every row of the block: skipped entirely;
  [lo_last, hi_first), whole blocks   every row sees every key: no mask at all (the fast loop);
  the rest of [lo_first, hi_last)     partially visible or past Sk: masked loop.

Interpreter caveat (Triton issue 11584): under ``TRITON_INTERPRET=1`` ``tl.dot`` on bf16 operands
returns silently wrong numbers, so the constexpr ``DOT_FP32`` (set by the host from
``triton_interpreting()``) casts dot operands to fp32 there. Values are first rounded to the input
dtype, so the interpreter reproduces the GPU's numerics; on a GPU the flag is off and fp16/bf16
operands go to the tensor cores with fp32 accumulation. fp32 inputs use ``input_precision="ieee"``
(no silent TF32), which is ignored for 16-bit operands.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # log2(e) = 1 / ln 2
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # ln 2 = 1 / log2(e)


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    """a @ b with fp32 accumulation; fp32 operands under the interpreter (see module docstring)."""
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _row_bounds(LO, HI, start_m, offs_m, Sq, Sk, q_offset, k_offset, CAUSAL: tl.constexpr,
                INTERVALS: tl.constexpr, BLOCK_M: tl.constexpr):
    """Per-row key intervals [row_lo, row_hi) of the block's rows, and the block's key ranges:
    returns (row_lo, row_hi, n_lo, lo_last, hi_first, hi_last) where the rows together see keys
    [n_lo, hi_last) (n_lo rounded down to nothing) and all of them see [lo_last, hi_first)."""
    last = tl.minimum(start_m + BLOCK_M, Sq) - 1
    if INTERVALS:
        row_lo = tl.load(LO + offs_m, mask=offs_m < Sq, other=0)
        row_hi = tl.load(HI + offs_m, mask=offs_m < Sq, other=0)
        lo_first = tl.load(LO + start_m)
        lo_last = tl.load(LO + last)
        hi_first = tl.load(HI + start_m)
        hi_last = tl.load(HI + last)
    elif CAUSAL:
        row_lo = offs_m * 0
        row_hi = tl.minimum(tl.maximum(q_offset + offs_m + 1 - k_offset, 0), Sk)
        lo_first = start_m * 0
        lo_last = lo_first
        hi_first = tl.minimum(tl.maximum(q_offset + start_m + 1 - k_offset, 0), Sk)
        hi_last = tl.minimum(tl.maximum(q_offset + last + 1 - k_offset, 0), Sk)
    else:
        row_lo = offs_m * 0
        row_hi = row_lo + Sk
        lo_first = start_m * 0
        lo_last = lo_first
        hi_first = lo_first + Sk
        hi_last = hi_first
    return row_lo, row_hi, lo_first, lo_last, hi_first, hi_last


@triton.jit
def _block_ranges(lo_first, lo_last, hi_first, hi_last, BLOCK_N: tl.constexpr):
    """Split the visited key range [lo_first, hi_last) into masked [a0, a1), unmasked [u0, u1) and
    masked [b0, hi_last), with u0, u1 on block boundaries; every range may be empty."""
    a0 = (lo_first // BLOCK_N) * BLOCK_N
    full_lo = tl.cdiv(lo_last, BLOCK_N) * BLOCK_N
    full_hi = (hi_first // BLOCK_N) * BLOCK_N
    has_full = full_hi > full_lo
    a1 = tl.where(has_full, full_lo, hi_last)
    u0 = tl.where(has_full, full_lo, 0)
    u1 = tl.where(has_full, full_hi, 0)
    b0 = tl.where(has_full, full_hi, hi_last)
    return a0, a1, u0, u1, b0


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
               offs_m, offs_d, lo, hi, Sk, D, qk_scale, row_lo, row_hi,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_FP32: tl.constexpr):
    """Online softmax over key blocks [lo, hi). State per row: running max m (base 2), running sum
    l = sum exp2(t - m), and acc = sum exp2(t - m) v. A new block with max m' rescales both by
    alpha = exp2(m - m'). While a row has seen no key, m' = -inf and the base is taken as 0, so
    alpha = exp2(-inf) = 0 and p = exp2(-inf) = 0: no NaN for fully masked rows."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # K^T tile [BLOCK_D, BLOCK_N]: loading it transposed avoids a register transpose.
        kt_mask = offs_d[:, None] < D
        kv_mask = offs_d[None, :] < D
        if MASKED:
            kt_mask = kt_mask & (offs_n[None, :] < Sk)
            kv_mask = kv_mask & (offs_n[:, None] < Sk)
        kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=kt_mask, other=0.0)
        t = _dot(q, kt, DOT_FP32) * qk_scale  # t = log2(e) * scale * q k^T   [BLOCK_M, BLOCK_N]
        if MASKED:  # row_hi <= Sk, so keys past Sk are masked too
            visible = (offs_n[None, :] >= row_lo[:, None]) & (offs_n[None, :] < row_hi[:, None])
            t = tl.where(visible, t, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(t, 1))
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_base)
        p = tl.exp2(t - m_base[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        # P is rounded to the input dtype for the tensor-core PV product (as FlashAttention does).
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, LO, HI,
              stride_qb, stride_qs, stride_qh, stride_qd,
              stride_kb, stride_ks, stride_kh, stride_kd,
              stride_vb, stride_vs, stride_vh, stride_vd,
              stride_ob, stride_os, stride_oh, stride_od,
              Hq, Sq, Sk, D, GROUP, sm_scale, q_offset, k_offset,
              CAUSAL: tl.constexpr, INTERVALS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr):
    """Grid (cdiv(Sq, BLOCK_M), B * Hq). Writes O [B,Sq,Hq,D] and LSE fp32 [B,Hq,Sq] (contiguous).
    LO/HI: int32 [Sq] key intervals when INTERVALS (documents / window), else unused."""
    tl.static_assert(BLOCK_M % 16 == 0 and BLOCK_N % 16 == 0, "tl.dot needs tiles of at least 16")
    # Reverse the row-block order so that, under a causal mask, the longest programs start first.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    off_b = (bh // Hq).to(tl.int64)
    off_h = bh % Hq
    off_kvh = off_h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)  # BLOCK_D = next power of two >= D; columns >= D are masked
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd
    q_mask = (offs_m[:, None] < Sq) & (offs_d[None, :] < D)
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    k_base = K + off_b * stride_kb + off_kvh * stride_kh
    v_base = V + off_b * stride_vb + off_kvh * stride_vh
    qk_scale = sm_scale * LOG2E  # fold log2(e) into the softmax scale

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_lo, row_hi, lo_first, lo_last, hi_first, hi_last = _row_bounds(
        LO, HI, start_m, offs_m, Sq, Sk, q_offset, k_offset, CAUSAL, INTERVALS, BLOCK_M)
    a0, a1, u0, u1, b0 = _block_ranges(lo_first, lo_last, hi_first, hi_last, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                               offs_m, offs_d, u0, u1, Sk, D, qk_scale, row_lo, row_hi, BLOCK_N, False, DOT_FP32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                               offs_m, offs_d, a0, a1, Sk, D, qk_scale, row_lo, row_hi, BLOCK_N, True, DOT_FP32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                               offs_m, offs_d, b0, hi_last, Sk, D, qk_scale, row_lo, row_hi, BLOCK_N, True,
                               DOT_FP32)
    # out = acc / l; lse = ln2 * (m + log2 l). l = 0 means the row saw no key: out 0, lse -inf.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=q_mask)
    tl.store(LSE + bh.to(tl.int64) * Sq + offs_m, lse, mask=offs_m < Sq)
