"""Lightning Attention-2 in Triton: chunked causal linear attention with per-head decay and state in/out.

Layout: q, k ``[B, S, H, Dk]``, v ``[B, S, H, Dv]`` (contiguous), state fp32 ``[B, H, Dk, Dv]``;
``decay`` is the per-head log-decay g ``[H]`` (<= 0), lambda = exp(g). Chunk C = BT = 64 tokens.

Per chunk of L <= C tokens entering with state S (local indices i, j; M[i, j] = lambda^(i-j), i >= j)::

    O  = scale * [ (Q K^T ⊙ M) V  +  (Q ⊙ lambda^(i+1)) S ]                  intra + inter chunk
    S' = lambda^L S + (K ⊙ lambda^(L-1-j))^T V                                state carried in fp32

Backward (derivation). O depends on S linearly through scale * Q~ S with Q~_i = lambda^(i+1) q_i, and
S' = lambda^L S + K~^T V with K~_j = lambda^(L-1-j) k_j. Write dS' for dLoss/dS' (the gradient of the
state *leaving* the chunk; for the last chunk that is dfinal_state, or 0). Then::

    dS  = lambda^L dS' + scale * Q~^T dO                       (dLoss/dS; what is left at the start is
                                                                 dinitial_state)
    dQ  = scale * [ (dO V^T ⊙ M) K + lambda^(i+1) ⊙ (dO S^T) ]   needs S: forward-order pass
    dK  = scale * (V dO^T ⊙ M^T) Q + lambda^(L-1-j) ⊙ (V dS'^T)  needs dS': reverse-order pass
    dV  = scale * (K Q^T ⊙ M^T) dO + K~ dS'

Programs: one per (Dv-block, batch*head), each looping over the chunks and holding a [BK, BV] slice of
the state (BK covers all of Dk, so Q K^T is complete). dV, O and the state slices are complete per
program; dQ and dK sum over the Dv-blocks, so each program writes an fp32 partial and the host sums.

Numerics: matmul operands are rounded to the input dtype (fp32 accumulation), fp32 inputs use IEEE
fp32 dots (no tf32). Under TRITON_INTERPRET=1 all dot operands are upcast to fp32 after that rounding,
because the interpreter's bf16 ``tl.dot`` returns wrong numbers (triton issue 11584).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dist_attn.kernels.interface import triton_interpreting
from dist_attn.kernels.lightning_attn.torch_kernel import check_inputs

BT = 64  # chunk length
MAX_HEAD_DIM = 256
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """a @ b accumulated in fp32 (see the module docstring for DOT_FP32 and IEEE)."""
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _decay_mask(g, BT: tl.constexpr, TRANSPOSE: tl.constexpr):
    """M[i, j] = lambda^(i-j) for i >= j else 0, or its transpose; exponent clamped before masking
    so lambda^(i-j) for j > i cannot overflow to inf."""
    t = tl.arange(0, BT).to(tl.float32)
    if TRANSPOSE:
        diff = t[None, :] - t[:, None]
    else:
        diff = t[:, None] - t[None, :]
    return tl.where(diff >= 0, tl.exp(g * tl.maximum(diff, 0.0)), 0.0)


@triton.jit
def _fwd_kernel(Q, K, V, G, S0, O, ST, DQ, DO, scale, T, H: tl.constexpr, DK: tl.constexpr,
                DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                HAS_INIT: tl.constexpr, GRAD_Q: tl.constexpr, DOT_FP32: tl.constexpr,
                IEEE: tl.constexpr):
    """Forward-order pass. GRAD_Q=False: writes O and the final state ST. GRAD_Q=True (backward):
    recomputes the entering states and writes this Dv-block's fp32 share of dQ into DQ[i_v]."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    dt = Q.dtype.element_ty
    t = tl.arange(0, BT)
    ok = tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    mk, mv = ok < DK, ov < DV
    g = tl.load(G + i_h).to(tl.float32)
    m = _decay_mask(g, BT, False)
    q_dec = tl.exp(g * (t.to(tl.float32) + 1.0))  # lambda^(i+1)
    qk_base = i_b.to(tl.int64) * T * H * DK + i_h * DK
    v_base = i_b.to(tl.int64) * T * H * DV + i_h * DV
    s_off = i_bh.to(tl.int64) * DK * DV + ok[:, None] * DV + ov[None, :]
    ms = mk[:, None] & mv[None, :]
    if HAS_INIT:
        s = tl.load(S0 + s_off, mask=ms, other=0.0).to(tl.float32)
    else:
        s = tl.zeros([BK, BV], dtype=tl.float32)
    for start in range(0, T, BT):
        rows = (start + t).to(tl.int64)
        mt = rows < T
        n = tl.minimum(T - start, BT).to(tl.float32)  # tokens in this chunk (the last may be partial)
        qk_off = qk_base + rows[:, None] * (H * DK) + ok[None, :]
        v_off = v_base + rows[:, None] * (H * DV) + ov[None, :]
        mqk, mvv = mt[:, None] & mk[None, :], mt[:, None] & mv[None, :]
        k = tl.load(K + qk_off, mask=mqk, other=0.0)
        v = tl.load(V + v_off, mask=mvv, other=0.0)
        if GRAD_Q:
            do = tl.load(DO + v_off, mask=mvv, other=0.0)
            d_scores = _dot(do, tl.trans(v), DOT_FP32, IEEE) * m  # (dO V^T ⊙ M), this Dv-block's share
            dq = _dot(d_scores.to(dt), k, DOT_FP32, IEEE) + \
                q_dec[:, None] * _dot(do, tl.trans(s.to(dt)), DOT_FP32, IEEE)
            dq_off = i_v.to(tl.int64) * tl.num_programs(1) * T * DK + qk_off  # DQ[i_v]
            tl.store(DQ + dq_off, scale * dq, mask=mqk)
        else:
            q = tl.load(Q + qk_off, mask=mqk, other=0.0)
            scores = _dot(q, tl.trans(k), DOT_FP32, IEEE) * m  # Q K^T ⊙ M, fp32
            o = _dot(scores.to(dt), v, DOT_FP32, IEEE) + \
                _dot((q * q_dec[:, None]).to(dt), s.to(dt), DOT_FP32, IEEE)
            tl.store(O + v_off, (scale * o).to(O.dtype.element_ty), mask=mvv)
        # S' = lambda^L S + (K ⊙ lambda^(L-1-j))^T V; padded rows get weight 0, not lambda^(negative)
        k_dec = tl.where(t < n, tl.exp(g * tl.maximum(n - 1.0 - t.to(tl.float32), 0.0)), 0.0)
        s = tl.exp(g * n) * s + _dot(tl.trans((k * k_dec[:, None]).to(dt)), v, DOT_FP32, IEEE)
    if not GRAD_Q:
        tl.store(ST + s_off, s, mask=ms)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, G, DO, DST, DK_, DV_, DS0, scale, T, H: tl.constexpr, DK: tl.constexpr,
                     DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     HAS_DFINAL: tl.constexpr, HAS_INIT: tl.constexpr, DOT_FP32: tl.constexpr,
                     IEEE: tl.constexpr):
    """Reverse-order pass carrying dS (a [BK, BV] slice): writes dV, this Dv-block's fp32 share of
    dK into DK_[i_v], and the dS left at the start as dinitial_state."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    dt = Q.dtype.element_ty
    t = tl.arange(0, BT)
    ok = tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    mk, mv = ok < DK, ov < DV
    g = tl.load(G + i_h).to(tl.float32)
    m_t = _decay_mask(g, BT, True)  # M^T[j, i] = lambda^(i-j) for i >= j
    q_dec = tl.exp(g * (t.to(tl.float32) + 1.0))
    qk_base = i_b.to(tl.int64) * T * H * DK + i_h * DK
    v_base = i_b.to(tl.int64) * T * H * DV + i_h * DV
    s_off = i_bh.to(tl.int64) * DK * DV + ok[:, None] * DV + ov[None, :]
    ms = mk[:, None] & mv[None, :]
    if HAS_DFINAL:
        ds = tl.load(DST + s_off, mask=ms, other=0.0).to(tl.float32)
    else:
        ds = tl.zeros([BK, BV], dtype=tl.float32)
    n_chunks = tl.cdiv(T, BT)
    for it in range(0, n_chunks):
        start = (n_chunks - 1 - it) * BT
        rows = (start + t).to(tl.int64)
        mt = rows < T
        n = tl.minimum(T - start, BT).to(tl.float32)
        qk_off = qk_base + rows[:, None] * (H * DK) + ok[None, :]
        v_off = v_base + rows[:, None] * (H * DV) + ov[None, :]
        mqk, mvv = mt[:, None] & mk[None, :], mt[:, None] & mv[None, :]
        q = tl.load(Q + qk_off, mask=mqk, other=0.0)
        k = tl.load(K + qk_off, mask=mqk, other=0.0)
        v = tl.load(V + v_off, mask=mvv, other=0.0)
        do = tl.load(DO + v_off, mask=mvv, other=0.0)
        k_dec = tl.where(t < n, tl.exp(g * tl.maximum(n - 1.0 - t.to(tl.float32), 0.0)), 0.0)
        # here ds is dS' (the gradient of the state leaving this chunk)
        scores_t = _dot(k, tl.trans(q), DOT_FP32, IEEE) * m_t  # (K Q^T ⊙ M^T)[j, i]
        dv = scale * _dot(scores_t.to(dt), do, DOT_FP32, IEEE) + \
            _dot((k * k_dec[:, None]).to(dt), ds.to(dt), DOT_FP32, IEEE)
        tl.store(DV_ + v_off, dv.to(DV_.dtype.element_ty), mask=mvv)
        d_scores_t = _dot(v, tl.trans(do), DOT_FP32, IEEE) * m_t  # (V dO^T ⊙ M^T)[j, i]
        dk = scale * _dot(d_scores_t.to(dt), q, DOT_FP32, IEEE) + \
            k_dec[:, None] * _dot(v, tl.trans(ds.to(dt)), DOT_FP32, IEEE)
        dk_off = i_v.to(tl.int64) * tl.num_programs(1) * T * DK + qk_off  # DK_[i_v]
        tl.store(DK_ + dk_off, dk, mask=mqk)
        # dS = lambda^L dS' + scale * (Q ⊙ lambda^(i+1))^T dO
        ds = tl.exp(g * n) * ds + scale * _dot(tl.trans((q * q_dec[:, None]).to(dt)), do, DOT_FP32, IEEE)
    if HAS_INIT:
        tl.store(DS0 + s_off, ds, mask=ms)


def _prepare(q, k, v, decay, initial_state, scale, check_values):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    check_inputs(q, k, v, decay, initial_state, scale, dtypes=_DTYPES, op="lightning_attn[triton]",
                 check_values=check_values)
    b, s, h, dk = q.shape
    dv = v.shape[-1]
    if max(dk, dv) > MAX_HEAD_DIM:
        raise ValueError(f"lightning_attn[triton]: head dims expected <= {MAX_HEAD_DIM}, got Dk={dk}, "
                         f"Dv={dv}. Fix: split the heads, or use backend='torch'.")
    g = (torch.zeros(h, device=q.device, dtype=torch.float32) if decay is None
         else decay.detach().float().contiguous())
    bk = max(16, triton.next_power_of_2(dk))
    bv = max(16, min(64, triton.next_power_of_2(dv)))
    meta = dict(H=h, DK=dk, DV=dv, BT=BT, BK=bk, BV=bv, DOT_FP32=triton_interpreting(),
                IEEE=q.dtype == torch.float32)
    grid = (triton.cdiv(dv, bv), b * h)
    return float(scale), g, meta, grid


def lightning_fwd(q, k, v, *, decay=None, initial_state=None, scale=None):
    """Forward. Returns ``(out [B,S,H,Dv] in v.dtype, final_state fp32 [B,H,Dk,Dv])``."""
    scale, g, meta, grid = _prepare(q, k, v, decay, initial_state, scale, check_values=True)
    b, s, h, dk = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(v)
    final = torch.empty(b, h, dk, v.shape[-1], device=q.device, dtype=torch.float32)
    s0 = final if initial_state is None else initial_state.detach().float().contiguous()
    _fwd_kernel[grid](q, k, v, g, s0, out, final, q, v, scale, s, HAS_INIT=initial_state is not None,
                      GRAD_Q=False, **meta)
    return out, final


def lightning_bwd(dout, dfinal_state, q, k, v, *, decay=None, initial_state=None, scale=None):
    """Backward. Returns ``(dq, dk, dv, dinitial_state)``; ``dinitial_state`` is None without an
    ``initial_state`` and is in its dtype otherwise. ``dfinal_state`` may be None (no gradient)."""
    scale, g, meta, grid = _prepare(q, k, v, decay, initial_state, scale, check_values=False)
    b, s, h, dk = q.shape
    dv = v.shape[-1]
    assert dout.shape == v.shape, f"dout {tuple(dout.shape)} != v {tuple(v.shape)}"
    q, k, v, dout = q.contiguous(), k.contiguous(), v.contiguous(), dout.to(v.dtype).contiguous()
    nv = grid[0]
    dq_part = torch.empty(nv, b, s, h, dk, device=q.device, dtype=torch.float32)
    dk_part = torch.empty_like(dq_part)
    dv_out = torch.empty_like(v)
    has_init = initial_state is not None
    s0 = initial_state.detach().float().contiguous() if has_init else dq_part
    dinit = torch.empty(b, h, dk, dv, device=q.device, dtype=torch.float32) if has_init else dq_part
    dfinal = dfinal_state.float().contiguous() if dfinal_state is not None else dq_part
    _fwd_kernel[grid](q, k, v, g, s0, dv_out, dq_part, dq_part, dout, scale, s, HAS_INIT=has_init,
                      GRAD_Q=True, **meta)
    _bwd_dkdv_kernel[grid](q, k, v, g, dout, dfinal, dk_part, dv_out, dinit, scale, s,
                           HAS_DFINAL=dfinal_state is not None, HAS_INIT=has_init, **meta)
    dq = dq_part.sum(0).to(q.dtype)
    dk_ = dk_part.sum(0).to(k.dtype)
    return dq, dk_, dv_out, (dinit.to(initial_state.dtype) if has_init else None)
