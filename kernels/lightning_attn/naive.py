"""Plain-torch causal linear attention references: a step-by-step recurrence and a chunked form.

Layout: q, k ``[B, S, H, Dk]``, v ``[B, S, H, Dv]``; state ``[B, H, Dk, Dv]``.
``decay`` is a per-head log-decay g ``[H]`` (<= 0), lambda = exp(g); ``None`` means lambda = 1.

Recurrence (one token at a time)::

    S_t = lambda * S_{t-1} + k_t^T v_t,      o_t = scale * q_t S_t

Chunked (Lightning Attention-2), for a chunk of L tokens entering with state S::

    o_i = scale * [ sum_{j<=i} lambda^(i-j) (q_i . k_j) v_j  +  lambda^(i+1) q_i S ]
    S'  = lambda^L S + sum_j lambda^(L-1-j) k_j^T v_j

Both return ``(out [B,S,H,Dv] in v.dtype, final_state [B,H,Dk,Dv] in fp32 or wider)``.
"""
from __future__ import annotations

import torch


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _log_decay(decay, h, device, dtype):
    if decay is None:
        return torch.zeros(h, device=device, dtype=dtype)
    return decay.to(device=device, dtype=dtype)


def linear_attn_recurrent(q, k, v, *, decay=None, initial_state=None, scale=None):
    b, s, h, dk = q.shape
    dv = v.shape[-1]
    acc = _acc_dtype(q)
    scale = dk ** -0.5 if scale is None else scale
    lam = torch.exp(_log_decay(decay, h, q.device, acc))[None, :, None, None]  # (1, H, 1, 1)
    state = (torch.zeros(b, h, dk, dv, device=q.device, dtype=acc) if initial_state is None
             else initial_state.to(acc))
    outs = []
    for t in range(s):
        kt, vt, qt = k[:, t].to(acc), v[:, t].to(acc), q[:, t].to(acc)  # (B, H, D)
        state = lam * state + kt.unsqueeze(-1) * vt.unsqueeze(-2)  # (B, H, Dk, Dv)
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", qt, state))
    out = torch.stack(outs, dim=1) if outs else torch.zeros(b, 0, h, dv, device=q.device, dtype=acc)
    return out.to(v.dtype), state


def linear_attn_chunked(q, k, v, *, decay=None, initial_state=None, scale=None, chunk_size=64):
    b, s, h, dk = q.shape
    dv = v.shape[-1]
    acc = _acc_dtype(q)
    scale = dk ** -0.5 if scale is None else scale
    g = _log_decay(decay, h, q.device, acc)  # (H,)
    state = (torch.zeros(b, h, dk, dv, device=q.device, dtype=acc) if initial_state is None
             else initial_state.to(acc))
    outs = []
    for start in range(0, s, chunk_size):
        qc, kc, vc = (t[:, start:start + chunk_size].to(acc) for t in (q, k, v))  # (B, L, H, D)
        L = qc.shape[1]
        i = torch.arange(L, device=q.device, dtype=acc)
        # decay mask M[h, i, j] = lambda_h^(i-j) for i >= j, else 0
        diff = i[:, None] - i[None, :]
        mask = torch.where(diff >= 0, torch.exp(g[:, None, None] * diff.clamp(min=0)),
                           torch.zeros((), device=q.device, dtype=acc))  # (H, L, L)
        scores = torch.einsum("bihd,bjhd->bhij", qc, kc) * mask  # (B, H, L, L)
        o_intra = torch.einsum("bhij,bjhv->bihv", scores, vc)
        q_decay = torch.exp(g[None, None, :, None] * (i[None, :, None, None] + 1))  # (1, L, H, 1)
        o_inter = torch.einsum("bihk,bhkv->bihv", qc * q_decay, state)
        outs.append(scale * (o_intra + o_inter))
        k_decay = torch.exp(g[None, None, :, None] * (L - 1 - i)[None, :, None, None])  # (1, L, H, 1)
        state = torch.exp(g * L)[None, :, None, None] * state + \
            torch.einsum("bjhk,bjhv->bhkv", kc * k_decay, vc)
    out = torch.cat(outs, dim=1) if outs else torch.zeros(b, 0, h, dv, device=q.device, dtype=acc)
    return out.to(v.dtype), state
