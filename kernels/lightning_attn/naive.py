"""Plain-torch causal linear attention references: a step-by-step recurrence and a chunked form.

Layout: q, k ``[B, S, H, Dk]``, v ``[B, S, H, Dv]``; state ``[B, H, Dk, Dv]``. The per-token log
gate is a_t = decay_h + g_t (``decay`` ``[H]`` <= 0, ``g`` ``[B, S, H]`` <= 0; either may be None = 0).

Recurrence (one token at a time); ``cu_seqlens`` (local document offsets ``[0, ..., S]``) resets the
state to 0 before every interior document start t (0 < t < S)::

    S_t = exp(a_t) * S_{t-1} + k_t^T v_t,      o_t = scale * q_t S_t

Chunked (Lightning Attention-2 with per-token gates), run on each document separately (the first one
enters with ``initial_state``, the others with 0), for a chunk of L tokens entering with state S and
cumulative log gate G_i = sum_{t<=i} a_t inside the chunk::

    o_i = scale * [ sum_{j<=i} exp(G_i - G_j) (q_i . k_j) v_j  +  exp(G_i) q_i S ]
    S'  = exp(G_{L-1}) S + sum_j exp(G_{L-1} - G_j) k_j^T v_j

Both are differentiable by autograd (in q, k, v, g and initial_state) and return
``(out [B,S,H,Dv] in v.dtype, final_state [B,H,Dk,Dv] in fp32 or wider)``; the final state is the state
after the last token (empty documents change nothing).
"""
from __future__ import annotations

import torch


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _log_gate(decay, g, b, s, h, device, dtype):
    """a [B or 1, S, H]: decay (per head) + g (per token) in ``dtype``."""
    a = torch.zeros(1, s, h, device=device, dtype=dtype)
    if decay is not None:
        a = a + decay.to(device=device, dtype=dtype)
    if g is not None:
        a = a + g.to(device=device, dtype=dtype)
    return a


def _interior_starts(cu_seqlens, s) -> list[int]:
    """Sorted distinct document starts t with 0 < t < S (Python ints; a reference may sync)."""
    if cu_seqlens is None:
        return []
    return sorted({int(t) for t in cu_seqlens.tolist() if 0 < int(t) < s})


def linear_attn_recurrent(q, k, v, *, decay=None, initial_state=None, scale=None, g=None, cu_seqlens=None):
    b, s, h, dk = q.shape
    dv = v.shape[-1]
    acc = _acc_dtype(q)
    scale = dk ** -0.5 if scale is None else scale
    lam = torch.exp(_log_gate(decay, g, b, s, h, q.device, acc))  # (B|1, S, H)
    starts = set(_interior_starts(cu_seqlens, s))
    state = (torch.zeros(b, h, dk, dv, device=q.device, dtype=acc) if initial_state is None
             else initial_state.to(acc))
    outs = []
    for t in range(s):
        if t in starts:
            state = torch.zeros_like(state)
        kt, vt, qt = k[:, t].to(acc), v[:, t].to(acc), q[:, t].to(acc)  # (B, H, D)
        state = lam[:, t, :, None, None] * state + kt.unsqueeze(-1) * vt.unsqueeze(-2)  # (B, H, Dk, Dv)
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", qt, state))
    out = torch.stack(outs, dim=1) if outs else torch.zeros(b, 0, h, dv, device=q.device, dtype=acc)
    return out.to(v.dtype), state


def _chunked_one(qs, ks, vs, a, state, scale, chunk_size):
    """One document: q, k, v [B, T, H, D] in acc, a [B|1, T, H]; returns (out [B, T, H, Dv], state)."""
    outs = []
    for start in range(0, qs.shape[1], chunk_size):
        qc, kc, vc = (t[:, start:start + chunk_size] for t in (qs, ks, vs))  # (B, L, H, D)
        gc = torch.cumsum(a[:, start:start + chunk_size], dim=1)  # G_i, (B|1, L, H)
        n = qc.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=qc.device).tril()
        diff = (gc[:, :, None, :] - gc[:, None, :, :]).permute(0, 3, 1, 2)  # G_i - G_j, (B|1, H, L, L)
        mask = torch.exp(diff.masked_fill(~causal, float("-inf")))  # exp(G_i - G_j) for j <= i, else 0
        scores = torch.einsum("bihd,bjhd->bhij", qc, kc) * mask
        o_intra = torch.einsum("bhij,bjhv->bihv", scores, vc)
        o_inter = torch.einsum("bihk,bhkv->bihv", qc * torch.exp(gc)[..., None], state)
        outs.append(scale * (o_intra + o_inter))
        k_w = torch.exp(gc[:, -1:] - gc)[..., None]  # exp(G_{L-1} - G_j), (B|1, L, H, 1)
        state = torch.exp(gc[:, -1])[..., None, None] * state + torch.einsum("bjhk,bjhv->bhkv", kc * k_w, vc)
    return torch.cat(outs, dim=1), state


def linear_attn_chunked(q, k, v, *, decay=None, initial_state=None, scale=None, chunk_size=64, g=None,
                        cu_seqlens=None):
    b, s, h, dk = q.shape
    dv = v.shape[-1]
    acc = _acc_dtype(q)
    scale = dk ** -0.5 if scale is None else scale
    a = _log_gate(decay, g, b, s, h, q.device, acc)
    zero = torch.zeros(b, h, dk, dv, device=q.device, dtype=acc)
    state = zero if initial_state is None else initial_state.to(acc)
    bounds = [0] + _interior_starts(cu_seqlens, s) + [s]
    outs = []
    for doc, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        if hi == lo:  # S = 0
            continue
        o, state = _chunked_one(*(t[:, lo:hi].to(acc) for t in (q, k, v)), a[:, lo:hi],
                                state if doc == 0 else zero, scale, chunk_size)
        outs.append(o)
    out = torch.cat(outs, dim=1) if outs else torch.zeros(b, 0, h, dv, device=q.device, dtype=acc)
    return out.to(v.dtype), state
