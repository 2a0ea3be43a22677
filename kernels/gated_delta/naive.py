"""Plain-torch references for the gated delta rule: a step-by-step recurrence and a chunked (UT) form.

Layout: q, k ``[B, S, H, Dk]``, v ``[B, S, H, Dv]``, beta, g ``[B, S, H]``; state ``[B, H, Dk, Dv]``.
Per head, token t (positions local to the call)::

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,     o_t = scale * q_t^T S_t

``S_{-1}`` = ``initial_state`` (or 0); ``scale`` defaults to Dk^-0.5. ``cu_seqlens`` (LOCAL document
offsets ``[0, ..., S]``, same for every batch row) resets the state: at every interior start t,
S_{t-1} is replaced by 0. Both functions compute in fp64 (they are the references; autograd gives their
gradients) and return ``(out fp64 [B,S,H,Dv], final_state fp64 [B,H,Dk,Dv])``.

Chunked form (used by :func:`gated_delta_chunked`, one document at a time, chunk of C tokens entering
with state S, gamma_i = g_0 + ... + g_i, Gam_i = exp(gamma_i)): write the update as
S_i = exp(g_i) S_{i-1} + k_i u_i^T with the "new values" u_i = beta_i (v_i - exp(g_i) S_{i-1}^T k_i).
Unrolling S_{i-1} inside the chunk gives a unit lower-triangular system for U = [u_0; ...; u_{C-1}]::

    (I + A) U = diag(beta) V - diag(beta Gam) K S,    A_ij = beta_i (Gam_i / Gam_j) (k_i . k_j), j < i
    o_i = scale [ Gam_i q_i^T S + sum_{j<=i} (Gam_i / Gam_j) (q_i . k_j) u_j ]
    S'  = Gam_{C-1} S + sum_j (Gam_{C-1} / Gam_j) k_j u_j^T

Here (I + A)^-1 is built row by row (forward substitution, the "UT transform"); the torch kernel solves
the same system with ``solve_triangular`` and handles documents by masks instead of splitting.
"""
from __future__ import annotations

import torch


def _doc_bounds(cu_seqlens, s: int) -> list[tuple[int, int]]:
    if cu_seqlens is None:
        return [(0, s)]
    cu = [int(x) for x in torch.as_tensor(cu_seqlens).tolist()]
    return [(a, b) for a, b in zip(cu[:-1], cu[1:]) if b > a]


def _prep(q, k, v, beta, g, initial_state, scale):
    f = torch.float64
    b, s, h, dk = q.shape
    scale = dk ** -0.5 if scale is None else scale
    state = (torch.zeros(b, h, dk, v.shape[-1], dtype=f, device=q.device) if initial_state is None
             else initial_state.to(f))
    return [t.to(f) for t in (q, k, v, beta, g)], state, scale


def gated_delta_recurrent(q, k, v, beta, g, *, initial_state=None, scale=None, cu_seqlens=None):
    """Token-by-token recurrence (the definition). Differentiable in every input."""
    (q, k, v, beta, g), state, scale = _prep(q, k, v, beta, g, initial_state, scale)
    s = q.shape[1]
    starts = {a for a, _ in _doc_bounds(cu_seqlens, s)} - {0}
    outs = []
    for t in range(s):
        if t in starts:
            state = torch.zeros_like(state)
        kt, vt = k[:, t], v[:, t]  # (B, H, D)
        decayed = torch.exp(g[:, t])[..., None, None] * state
        # (I - beta k k^T) S: subtract beta k (k^T S)
        decayed = decayed - beta[:, t, :, None, None] * kt.unsqueeze(-1) * \
            torch.einsum("bhk,bhkv->bhv", kt, decayed).unsqueeze(-2)
        state = decayed + beta[:, t, :, None, None] * kt.unsqueeze(-1) * vt.unsqueeze(-2)
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    out = torch.stack(outs, 1) if outs else v.new_zeros(v.shape)
    return out, state


def _chunk_step(q, k, v, beta, g, state, scale):
    """One chunk [B, C, H, *] entering with ``state``; returns (out [B,C,H,Dv], state')."""
    c = q.shape[1]
    gam = torch.cumsum(g, 1)  # (B, C, H)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, C, D)
    bh, gh = beta.transpose(1, 2), gam.transpose(1, 2)  # (B, H, C)
    ratio = torch.exp((gh[..., :, None] - gh[..., None, :]).tril())  # Gam_i / Gam_j for j <= i
    kk = (kh @ kh.transpose(-1, -2)) * ratio
    rhs_v = bh[..., None] * vh
    rhs_s = (bh * torch.exp(gh))[..., None] * (kh @ state)  # diag(beta Gam) K S
    rows = []
    for i in range(c):  # forward substitution: u_i = rhs_i - beta_i sum_{j<i} (Gam_i/Gam_j)(k_i.k_j) u_j
        u = rhs_v[..., i, :] - rhs_s[..., i, :]
        if i:
            u = u - bh[..., i, None] * torch.einsum("bhj,bhjv->bhv", kk[..., i, :i], torch.stack(rows, -2))
        rows.append(u)
    uu = torch.stack(rows, -2)  # (B, H, C, Dv)
    qk = ((qh @ kh.transpose(-1, -2)) * ratio).tril()
    out = scale * (torch.exp(gh)[..., None] * (qh @ state) + qk @ uu)
    last = gh[..., -1:]
    new = torch.exp(last)[..., None] * state + (torch.exp(last - gh)[..., None] * kh).transpose(-1, -2) @ uu
    return out.transpose(1, 2), new


def gated_delta_chunked(q, k, v, beta, g, *, initial_state=None, scale=None, cu_seqlens=None,
                        chunk_size=16):
    """The chunked UT form, one document after another (resets by construction)."""
    (q, k, v, beta, g), state, scale = _prep(q, k, v, beta, g, initial_state, scale)
    outs = []
    for a, b in _doc_bounds(cu_seqlens, q.shape[1]):
        if a > 0:
            state = torch.zeros_like(state)
        for c0 in range(a, b, chunk_size):
            sl = slice(c0, min(c0 + chunk_size, b))
            o, state = _chunk_step(q[:, sl], k[:, sl], v[:, sl], beta[:, sl], g[:, sl], state, scale)
            outs.append(o)
    out = torch.cat(outs, 1) if outs else v.new_zeros(v.shape)
    return out, state
