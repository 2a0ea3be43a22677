"""Lightning attention in Triton, parallel over chunks: decay, per-token gates, documents, state in/out.

Layout: q, k ``[B, S, H, Dk]``, v ``[B, S, H, Dv]`` (contiguous), state fp32 ``[B, H, Dk, Dv]``; the
per-token log gate is a_t = decay_h + g_t (``decay`` [H] <= 0, ``g`` [B, S, H] <= 0), ``cu_seqlens``
local document offsets (state reset to 0 before every interior start)::

    S_t = exp(a_t) S_{t-1} + k_t^T v_t,     o_t = scale * q_t S_t

Chunks of C = 64 tokens. The host prepares, in fp32, the cumulative gate inside each chunk
G_i = sum_{t <= i} a_t (a = 0 on padding) and the document id of every token. Inside chunk n, with
S_n the state entering it (the formulas of ``torch_kernel.py``; exponents are always <= 0)::

    D[i, j] = exp(G_i - G_j) [j <= i, seg_i = seg_j]      Q~_i = exp(G_i) [seg_i = seg_before] q_i
    K~_j = exp(G_last - G_j) [seg_j = seg_last] k_j       A_n = exp(G_last) [seg_last = seg_before]
    O_n = scale * [ (Q K^T ⊙ D) V + Q~ S_n ]              S_{n+1} = A_n S_n + K~^T V

Three launches, only the second sequential over chunks (FLA / MiniMax style):
  1. ``_chunk_contrib`` (grid Dv-blocks x chunks x B*H): U_n = K~^T V of every chunk at once;
  2. ``_state_scan`` (grid Dk-blocks x Dv-blocks x B*H): S_{n+1} = A_n S_n + U_n, an elementwise
     axpy per chunk; U_n is overwritten in place by S_n, the entering state; writes final_state;
  3. ``_chunk_out`` (grid Dv-blocks x chunks x B*H): O_n, intra-chunk plus inter-chunk.
Backward, with R_n = dLoss/dS_{n+1} (R_{N-1} = dfinal): steps 1-2 recompute S_n; the same two kernels
run the reverse scan R_{n-1} = A_n R_n + scale * Q~_n^T dO_n (what is left is dinitial); then
``_chunk_bwd`` (grid chunks x B*H, looping over Dv-blocks) writes, in parallel over chunks::

    dQ = scale * [ (dO V^T ⊙ D) K + (Q~/q) ⊙ (dO S_n^T) ]      dK = scale * (V dO^T ⊙ D^T) Q + (K~/k) ⊙ (V R_n^T)
    dV = scale * (K Q^T ⊙ D^T) dO + K~ R_n

The gate gradient is a document-limited reverse cumulative sum (torch_kernel.py derives it), done on
the host side with device ops: dg_t = sum_{i >= t in doc(t)} (q_i . dq_i - k_i . dk_i)
+ [t in the last document] <S_final, dfinal>, and 0 at interior starts.

Numerics: dot operands are rounded to the input dtype with fp32 accumulation (the states too, as FLA
does); fp32 inputs use IEEE fp32 dots (no tf32). Under TRITON_INTERPRET=1 the operands are upcast to
fp32 after that rounding, because the interpreter's bf16 ``tl.dot`` is wrong (triton issue 11584).
No host syncs: value checks of decay/g/cu_seqlens run only on CPU tensors or in anomaly mode.
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
_OP = "lightning_attn[triton]"


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
def _gates(GC, SEG, i_bh, i_n, T_PAD, BT: tl.constexpr):
    """Per-chunk gate vectors: G [BT] (cumulative log gate), seg [BT], seg_before (scalar), G_last."""
    t = tl.arange(0, BT)
    start = i_n * BT
    gc = tl.load(GC + i_bh.to(tl.int64) * T_PAD + start + t)
    seg = tl.load(SEG + start + t)
    seg_before = tl.load(SEG + tl.maximum(start - 1, 0))
    seg_before = tl.where(start == 0, 0, seg_before)
    last = tl.load(GC + i_bh.to(tl.int64) * T_PAD + start + BT - 1)
    seg_last = tl.load(SEG + start + BT - 1)
    return gc, seg, seg_before, last, seg_last


@triton.jit
def _chunk_contrib(A, X, GC, SEG, OUT, mul, T, T_PAD, NT, H: tl.constexpr, DK: tl.constexpr,
                   DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   Q_SIDE: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """OUT[bh, n, :, v-block] = mul * (A_n ⊙ w)^T X_n  [Dk, BV] fp32, with w the key weights of K~
    (Q_SIDE=False: A = K, X = V) or the query weights of Q~ (Q_SIDE=True: A = Q, X = dO)."""
    i_v, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    t = tl.arange(0, BT)
    ok = tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    rows = (i_n * BT + t).to(tl.int64)
    mt = rows < T
    a = tl.load(A + (i_b * T + rows)[:, None] * (H * DK) + i_h * DK + ok[None, :],
                mask=mt[:, None] & (ok[None, :] < DK), other=0.0)
    x = tl.load(X + (i_b * T + rows)[:, None] * (H * DV) + i_h * DV + ov[None, :],
                mask=mt[:, None] & (ov[None, :] < DV), other=0.0)
    gc, seg, seg_before, last, seg_last = _gates(GC, SEG, i_bh, i_n, T_PAD, BT)
    if Q_SIDE:
        w = tl.where(seg == seg_before, tl.exp(gc), 0.0)
    else:
        w = tl.where(seg == seg_last, tl.exp(tl.minimum(last - gc, 0.0)), 0.0)
    w = tl.where(mt, w, 0.0)
    u = _dot(tl.trans((a * w[:, None]).to(A.dtype.element_ty)), x, DOT_FP32, IEEE)
    off = ((i_bh.to(tl.int64) * NT + i_n) * DK + ok[:, None]) * DV + ov[None, :]
    tl.store(OUT + off, mul * u, mask=(ok[:, None] < DK) & (ov[None, :] < DV))


@triton.jit
def _state_scan(X, GC, SEG, S0, ST, T_PAD, NT, DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr,
                BKS: tl.constexpr, BVS: tl.constexpr, HAS_INIT: tl.constexpr, REVERSE: tl.constexpr):
    """s <- A_n s + X_n over the chunks (forward order, or reverse for the gradient), storing the
    running s into X_n before each update: the state entering chunk n (forward) or the gradient of
    the state leaving chunk n (reverse). The last s goes to ST (final state, or dinitial_state)."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ok = i_k * BKS + tl.arange(0, BKS)
    ov = i_v * BVS + tl.arange(0, BVS)
    m = (ok[:, None] < DK) & (ov[None, :] < DV)
    loc = ok[:, None] * DV + ov[None, :]
    if HAS_INIT:
        s = tl.load(S0 + i_bh.to(tl.int64) * DK * DV + loc, mask=m, other=0.0).to(tl.float32)
    else:
        s = tl.zeros([BKS, BVS], dtype=tl.float32)
    for it in range(0, NT):
        if REVERSE:
            n = NT - 1 - it
        else:
            n = it
        start = n * BT
        last = tl.load(GC + i_bh.to(tl.int64) * T_PAD + start + BT - 1)
        seg_last = tl.load(SEG + start + BT - 1)
        seg_before = tl.where(start == 0, 0, tl.load(SEG + tl.maximum(start - 1, 0)))
        carry = tl.where(seg_last == seg_before, tl.exp(last), 0.0)  # A_n
        off = (i_bh.to(tl.int64) * NT + n) * DK * DV + loc
        x = tl.load(X + off, mask=m, other=0.0)
        tl.store(X + off, s, mask=m)
        s = carry * s + x
    tl.store(ST + i_bh.to(tl.int64) * DK * DV + loc, s, mask=m)


@triton.jit
def _chunk_out(Q, K, V, GC, SEG, SN, O, scale, T, T_PAD, NT, H: tl.constexpr, DK: tl.constexpr,
               DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """O_n[:, v-block] = scale * [ (Q K^T ⊙ D) V + Q~ S_n ], all chunks in parallel."""
    i_v, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    dt = Q.dtype.element_ty
    t = tl.arange(0, BT)
    ok = tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    rows = (i_n * BT + t).to(tl.int64)
    mt = rows < T
    mqk = mt[:, None] & (ok[None, :] < DK)
    mv = mt[:, None] & (ov[None, :] < DV)
    qk_off = (i_b * T + rows)[:, None] * (H * DK) + i_h * DK + ok[None, :]
    v_off = (i_b * T + rows)[:, None] * (H * DV) + i_h * DV + ov[None, :]
    q = tl.load(Q + qk_off, mask=mqk, other=0.0)
    k = tl.load(K + qk_off, mask=mqk, other=0.0)
    v = tl.load(V + v_off, mask=mv, other=0.0)
    gc, seg, seg_before, last, seg_last = _gates(GC, SEG, i_bh, i_n, T_PAD, BT)
    visible = (t[:, None] >= t[None, :]) & (seg[:, None] == seg[None, :])
    d = tl.where(visible, tl.exp(tl.minimum(gc[:, None] - gc[None, :], 0.0)), 0.0)
    wq = tl.where(seg == seg_before, tl.exp(gc), 0.0)
    s_off = ((i_bh.to(tl.int64) * NT + i_n) * DK + ok[:, None]) * DV + ov[None, :]
    s = tl.load(SN + s_off, mask=(ok[:, None] < DK) & (ov[None, :] < DV), other=0.0)
    scores = _dot(q, tl.trans(k), DOT_FP32, IEEE) * d
    o = _dot(scores.to(dt), v, DOT_FP32, IEEE) + _dot((q * wq[:, None]).to(dt), s.to(dt), DOT_FP32, IEEE)
    tl.store(O + v_off, (scale * o).to(O.dtype.element_ty), mask=mv)


@triton.jit
def _chunk_bwd(Q, K, V, DO, GC, SEG, SN, RN, DQ, DK_, DV_, scale, T, T_PAD, NT, H: tl.constexpr,
               DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """dQ, dK (fp32) and dV of one chunk, all chunks in parallel; loops over the Dv-blocks."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    dt = Q.dtype.element_ty
    t = tl.arange(0, BT)
    ok = tl.arange(0, BK)
    rows = (i_n * BT + t).to(tl.int64)
    mt = rows < T
    mqk = mt[:, None] & (ok[None, :] < DK)
    qk_off = (i_b * T + rows)[:, None] * (H * DK) + i_h * DK + ok[None, :]
    q = tl.load(Q + qk_off, mask=mqk, other=0.0)
    k = tl.load(K + qk_off, mask=mqk, other=0.0)
    gc, seg, seg_before, last, seg_last = _gates(GC, SEG, i_bh, i_n, T_PAD, BT)
    visible = (t[:, None] >= t[None, :]) & (seg[:, None] == seg[None, :])
    d = tl.where(visible, tl.exp(tl.minimum(gc[:, None] - gc[None, :], 0.0)), 0.0)  # D[i, j]
    wq = tl.where(seg == seg_before, tl.exp(gc), 0.0)
    wk = tl.where((seg == seg_last) & mt, tl.exp(tl.minimum(last - gc, 0.0)), 0.0)
    scores_t = tl.trans(_dot(q, tl.trans(k), DOT_FP32, IEEE) * d).to(dt)  # (Q K^T ⊙ D)^T [j, i]
    kt = (k * wk[:, None]).to(dt)  # K~
    d_scores = tl.zeros([BT, BT], dtype=tl.float32)  # dO V^T
    dq_inter = tl.zeros([BT, BK], dtype=tl.float32)  # dO S_n^T
    dk_inter = tl.zeros([BT, BK], dtype=tl.float32)  # V R_n^T
    base = (i_bh.to(tl.int64) * NT + i_n) * DK * DV
    for v0 in range(0, DV, BV):
        ov = v0 + tl.arange(0, BV)
        mv = mt[:, None] & (ov[None, :] < DV)
        v_off = (i_b * T + rows)[:, None] * (H * DV) + i_h * DV + ov[None, :]
        v = tl.load(V + v_off, mask=mv, other=0.0)
        do = tl.load(DO + v_off, mask=mv, other=0.0)
        ms = (ok[:, None] < DK) & (ov[None, :] < DV)
        s = tl.load(SN + base + ok[:, None] * DV + ov[None, :], mask=ms, other=0.0).to(dt)
        r = tl.load(RN + base + ok[:, None] * DV + ov[None, :], mask=ms, other=0.0).to(dt)
        dv = scale * _dot(scores_t, do, DOT_FP32, IEEE) + _dot(kt, r, DOT_FP32, IEEE)
        tl.store(DV_ + v_off, dv.to(DV_.dtype.element_ty), mask=mv)
        d_scores += _dot(do, tl.trans(v), DOT_FP32, IEEE)
        dq_inter += _dot(do, tl.trans(s), DOT_FP32, IEEE)
        dk_inter += _dot(v, tl.trans(r), DOT_FP32, IEEE)
    ds = d_scores * d
    dq = scale * (_dot(ds.to(dt), k, DOT_FP32, IEEE) + wq[:, None] * dq_inter)
    dk = scale * _dot(tl.trans(ds).to(dt), q, DOT_FP32, IEEE) + wk[:, None] * dk_inter
    tl.store(DQ + qk_off, dq, mask=mqk)
    tl.store(DK_ + qk_off, dk, mask=mqk)


# --- host side -----------------------------------------------------------------------------------
def _documents(cu_seqlens, s, device):
    """(interior start flags [S] int32, document id [S] int32) from local offsets, without a host sync."""
    starts = torch.zeros(s + 1, dtype=torch.int32, device=device)
    if cu_seqlens is not None:
        idx = cu_seqlens.to(device=device, dtype=torch.long, non_blocking=True).clamp(0, s)
        starts.index_fill_(0, idx, 1)
    starts = starts[:s].clone()
    starts[:1] = 0  # position 0 starts the call, not a reset
    return starts, torch.cumsum(starts, 0, dtype=torch.int32)


def _host_gates(q, decay, g, cu_seqlens):
    """Cumulative log gate inside each chunk [B*H, N*C] fp32 and the document id [N*C] int32 of every
    token (padding: gate 0, the last document), plus the start flags [S]."""
    b, s, h, _ = q.shape
    nt = triton.cdiv(s, BT)
    a = torch.zeros(b, h, nt * BT, device=q.device, dtype=torch.float32)
    if decay is not None:
        a[:, :, :s] += decay.detach().float()[None, :, None]
    if g is not None:
        a[:, :, :s] += g.detach().float().permute(0, 2, 1)
    gc = a.view(b, h, nt, BT).cumsum(-1).view(b * h, nt * BT).contiguous()
    starts, seg_real = _documents(cu_seqlens, s, q.device)
    seg = torch.empty(nt * BT, dtype=torch.int32, device=q.device)
    seg[:s] = seg_real
    seg[s:] = seg_real[-1:]
    return gc, seg, starts, seg_real, nt


def _meta(q, v):
    dk, dv = q.shape[-1], v.shape[-1]
    if max(dk, dv) > MAX_HEAD_DIM:
        raise ValueError(f"{_OP}: head dims expected <= {MAX_HEAD_DIM}, got Dk={dk}, Dv={dv}. "
                         f"Fix: split the heads, or use backend='torch'.")
    bk = max(16, triton.next_power_of_2(dk))
    bv = max(16, min(64, triton.next_power_of_2(dv)))
    dot = dict(DOT_FP32=triton_interpreting(), IEEE=q.dtype == torch.float32)
    return dict(H=q.shape[2], DK=dk, DV=dv, BT=BT, BK=bk, BV=bv, **dot)


def gpu_config(kind: str, block_k: int) -> dict:
    """Launch options per kernel (warps, stages); chosen for zero register spills on sm_90a
    (``benchmarks/kernels_aot.py``)."""
    if triton_interpreting():
        return {}
    if kind == "bwd":
        return dict(num_warps=8 if block_k > 64 else 4, num_stages=1)
    if kind == "out":
        return dict(num_warps=8 if block_k > 64 else 4, num_stages=2)
    return dict(num_warps=4, num_stages=2)


def _scan(x, gc, seg, s0, out, nt, dk, dv, reverse):
    bks, bvs = min(16, triton.next_power_of_2(dk)), min(64, triton.next_power_of_2(dv))
    grid = (triton.cdiv(dk, bks), triton.cdiv(dv, bvs), out.shape[0] * out.shape[1])
    _state_scan[grid](x, gc, seg, out if s0 is None else s0, out, gc.shape[1], nt, DK=dk, DV=dv, BT=BT,
                      BKS=bks, BVS=bvs, HAS_INIT=s0 is not None, REVERSE=reverse, num_warps=4)


def _states(q, k, v, gc, seg, nt, meta, initial_state):
    """Entering state S_n of every chunk [B*H, N, Dk, Dv] and the final state [B, H, Dk, Dv], fp32."""
    b, s, h, dk = q.shape
    dv = v.shape[-1]
    states = torch.empty(b * h, nt, dk, dv, device=q.device, dtype=torch.float32)
    _chunk_contrib[(triton.cdiv(dv, meta["BV"]), nt, b * h)](k, v, gc, seg, states, 1.0, s, gc.shape[1], nt,
                                                              Q_SIDE=False, **meta, **gpu_config("contrib", meta["BK"]))
    final = torch.empty(b, h, dk, dv, device=q.device, dtype=torch.float32)
    s0 = None if initial_state is None else initial_state.detach().float().contiguous()
    _scan(states, gc, seg, s0, final, nt, dk, dv, reverse=False)
    return states, final


def lightning_fwd(q, k, v, *, decay=None, initial_state=None, scale=None, g=None, cu_seqlens=None):
    """Forward. Returns ``(out [B,S,H,Dv] in v.dtype, final_state fp32 [B,H,Dk,Dv])``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    check_inputs(q, k, v, decay, initial_state, scale, dtypes=_DTYPES, op=_OP, check_values=True, g=g,
                 cu_seqlens=cu_seqlens)
    meta = _meta(q, v)
    b, s, h, dk = q.shape
    dv = v.shape[-1]
    if s == 0:
        final = (torch.zeros(b, h, dk, dv, device=q.device, dtype=torch.float32) if initial_state is None
                 else initial_state.detach().float().clone())
        return torch.empty_like(v), final
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    gc, seg, _, _, nt = _host_gates(q, decay, g, cu_seqlens)
    states, final = _states(q, k, v, gc, seg, nt, meta, initial_state)
    out = torch.empty_like(v)
    _chunk_out[(triton.cdiv(dv, meta["BV"]), nt, b * h)](q, k, v, gc, seg, states, out, float(scale), s,
                                                         gc.shape[1], nt, **meta, **gpu_config("out", meta["BK"]))
    return out, final


def _doc_reverse_cumsum(x, starts, seg):
    """y_t = sum_{i >= t, i in doc(t)} x_i over dim 1 of x [B, S, H], in fp64, no host sync."""
    s = x.shape[1]
    suffix = x.double().flip(1).cumsum(1).flip(1)  # sum_{i >= t}
    suffix = torch.cat([suffix, torch.zeros_like(suffix[:, :1])], 1)  # suffix[S] = 0
    pos = torch.arange(s, device=x.device)
    nxt = torch.where(starts.bool(), pos, torch.full_like(pos, s))  # u if a document starts at u
    nxt = torch.cat([nxt[1:], nxt.new_full((1,), s)])  # first start strictly after t ...
    nxt = nxt.flip(0).cummin(0).values.flip(0)  # ... as a suffix minimum
    return suffix[:, :s] - suffix.index_select(1, nxt)


def lightning_bwd(dout, dfinal_state, q, k, v, *, decay=None, initial_state=None, scale=None, g=None,
                  cu_seqlens=None):
    """Backward. Returns ``(dq, dk, dv, dinitial_state, dg)``; ``dinitial_state`` is None without an
    ``initial_state`` (else in its dtype), ``dg`` None without ``g``. ``dfinal_state`` may be None."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    check_inputs(q, k, v, decay, initial_state, scale, dtypes=_DTYPES, op=_OP, check_values=False, g=g,
                 cu_seqlens=cu_seqlens)
    assert dout.shape == v.shape, f"dout {tuple(dout.shape)} != v {tuple(v.shape)}"
    meta = _meta(q, v)
    b, s, h, dk = q.shape
    dv = v.shape[-1]
    has_init = initial_state is not None
    if s == 0:
        dinit = (dfinal_state.to(initial_state.dtype).clone() if dfinal_state is not None
                 else torch.zeros_like(initial_state)) if has_init else None
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dinit,
                None if g is None else torch.zeros_like(g))
    q, k, v, dout = q.contiguous(), k.contiguous(), v.contiguous(), dout.to(v.dtype).contiguous()
    gc, seg, starts, seg_real, nt = _host_gates(q, decay, g, cu_seqlens)
    states, final = _states(q, k, v, gc, seg, nt, meta, initial_state)
    # reverse scan: R_{n-1} = A_n R_n + scale * Q~_n^T dO_n; rstates[n] = R_n, dinit = what is left
    rstates = torch.empty_like(states)
    _chunk_contrib[(triton.cdiv(dv, meta["BV"]), nt, b * h)](q, dout, gc, seg, rstates, float(scale), s,
                                                              gc.shape[1], nt, Q_SIDE=True, **meta,
                                                              **gpu_config("contrib", meta["BK"]))
    dinit = torch.empty(b, h, dk, dv, device=q.device, dtype=torch.float32)
    dfinal = None if dfinal_state is None else dfinal_state.detach().float().contiguous()
    _scan(rstates, gc, seg, dfinal, dinit, nt, dk, dv, reverse=True)
    dq = torch.empty(b, s, h, dk, device=q.device, dtype=torch.float32)
    dk_ = torch.empty_like(dq)
    dv_ = torch.empty_like(v)
    _chunk_bwd[(nt, b * h)](q, k, v, dout, gc, seg, states, rstates, dq, dk_, dv_, float(scale), s, gc.shape[1],
                            nt, **meta, **gpu_config("bwd", meta["BK"]))
    dg = None
    if g is not None:
        # dg_t = sum_{i >= t in doc(t)} (q_i . dq_i - k_i . dk_i) + [t in the last doc] <S_final, dfinal>
        x = (q.float() * dq).sum(-1) - (k.float() * dk_).sum(-1)  # [B, S, H]
        dg = _doc_reverse_cumsum(x, starts, seg_real)
        if dfinal is not None:
            fin = (final * dfinal).sum((-1, -2))  # [B, H]
            in_last = (seg_real == seg_real[-1:]).to(dg.dtype)  # [S]
            dg = dg + in_last[None, :, None] * fin.double()[:, None, :]
        dg = torch.where(starts.bool()[None, :, None], 0.0, dg).to(g.dtype)
    return (dq.to(q.dtype), dk_.to(k.dtype), dv_, (dinit.to(initial_state.dtype) if has_init else None), dg)
