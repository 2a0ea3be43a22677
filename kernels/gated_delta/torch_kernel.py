"""Chunked gated delta rule in plain torch (WY / UT representation): the CPU backend, also fp64.

Layout: q, k ``[B, S, H, Dk]``, v ``[B, S, H, Dv]``, beta, g ``[B, S, H]``; state ``[B, H, Dk, Dv]`` in
fp32 (fp64 for fp64 inputs). Recurrence and reset contract: see :mod:`dist_attn.kernels.gated_delta`.

Per chunk of C tokens (all chunks at once), with gamma the in-chunk cumulative sum of g, and per-token
segment ids seg_i = number of document starts at positions <= i inside the chunk::

    D_ij  = exp(gamma_i - gamma_j) if j <= i and seg_i == seg_j else 0      (decay between tokens)
    Gin_i = exp(gamma_i) if seg_i == 0 else 0                               (decay from the chunk's entry)
    L     = I + strict_lower(diag(beta) (K K^T ⊙ D))                       (unit lower triangular)
    W     = L^-1 diag(beta Gin) K      [C, Dk]       U0 = L^-1 diag(beta) V      [C, Dv]
    P     = (Q K^T) ⊙ D                [C, C]        Klast_j = D_{C-1, j} k_j

The chunk's new values are U = U0 - W S_in, so, with S_in the state entering the chunk::

    O     = scale [ P U0 + (diag(Gin) Q - P W) S_in ]
    S_out = A S_in + b,      A = Gin_{C-1} I - Klast^T W  [Dk, Dk],     b = Klast^T U0  [Dk, Dv]

A document start at chunk position t zeroes Gin (and so W and A) from t on, and D across it: the reset
S_{t-1} := 0. g at a document start is unused (its gradient is 0). Everything except the scan
S_{n+1} = A_n S_n + b_n (one small matmul per chunk) is batched over chunks. The sequence is padded to a
multiple of C with k = v = beta = g = 0 tokens, which leave the state unchanged.

Backward: autograd through this chunked form (the kernel object recomputes it, see
``delta_kernel_from_autograd``); a hand-written backward is future work. Cost per chunk and head: O(C^2 (Dk + Dv) + C Dk (Dk + Dv)) plus the triangular solve.
"""
from __future__ import annotations

import torch


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def reset_mask(cu_seqlens, s: int, device) -> torch.Tensor | None:
    """Bool ``[S]``: True at interior document starts of the LOCAL ``cu_seqlens`` (no host sync)."""
    if cu_seqlens is None:
        return None
    cu = torch.as_tensor(cu_seqlens).to(device=device, dtype=torch.long)
    mask = torch.zeros(s + 1, dtype=torch.bool, device=device)
    mask[cu[1:-1]] = True  # an empty document repeats an offset; an offset == S resets nothing
    mask[0] = False
    return mask[:s]


def chunk_gated_delta(q, k, v, beta, g, *, initial_state=None, scale=None, cu_seqlens=None,
                      chunk_size: int = 64):
    """Differentiable chunked form; returns ``(out [B,S,H,Dv] in acc dtype, final_state acc dtype)``."""
    b, s, h, dk = q.shape
    dv = v.shape[-1]
    acc = acc_dtype(q)
    scale = dk ** -0.5 if scale is None else scale
    c = chunk_size
    n = max(1, -(-s // c))
    pad = n * c - s
    resets = reset_mask(cu_seqlens, s, q.device)

    def chunks(t, width):  # [B, S, H, (D)] -> [B, H, N, C, (D)], zero-padded
        t = t.to(acc)
        if width is None:
            t = torch.nn.functional.pad(t, (0, 0, 0, pad)).reshape(b, n, c, h)
            return t.permute(0, 3, 1, 2)
        t = torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad)).reshape(b, n, c, h, width)
        return t.permute(0, 3, 1, 2, 4)

    qc, kc, vc = chunks(q, dk), chunks(k, dk), chunks(v, dv)
    bc, gc = chunks(beta, None), chunks(g, None)  # (B, H, N, C)
    if resets is None:
        seg = torch.zeros(n, c, dtype=torch.long, device=q.device)
    else:
        r = torch.nn.functional.pad(resets, (0, pad)).reshape(n, c)
        gc = gc.masked_fill(r, 0.0)  # g at a document start multiplies a zero state
        seg = torch.cumsum(r.long(), -1)  # (N, C)
    gam = torch.cumsum(gc, -1)  # (B, H, N, C)
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    visible = causal & (seg[:, :, None] == seg[:, None, :])  # (N, C, C)
    dmat = torch.exp((gam[..., :, None] - gam[..., None, :]).masked_fill(~visible, float("-inf")))
    g_in = torch.exp(gam) * (seg == 0)  # (B, H, N, C)

    kk = kc @ kc.transpose(-1, -2)
    lower = torch.eye(c, dtype=acc, device=q.device) + (bc[..., None] * kk * dmat).tril(-1)
    rhs = torch.cat([(bc * g_in)[..., None] * kc, bc[..., None] * vc], -1)
    wu = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True)
    w, u0 = wu[..., :dk], wu[..., dk:]  # (B, H, N, C, Dk), (B, H, N, C, Dv)
    pmat = (qc @ kc.transpose(-1, -2)) * dmat
    k_last = dmat[..., -1, :, None] * kc  # (B, H, N, C, Dk)
    amap = g_in[..., -1, None, None] * torch.eye(dk, dtype=acc, device=q.device) - k_last.transpose(-1, -2) @ w
    bmap = k_last.transpose(-1, -2) @ u0  # (B, H, N, Dk, Dv)

    state = (torch.zeros(b, h, dk, dv, dtype=acc, device=q.device) if initial_state is None
             else initial_state.to(acc))
    entering = []
    for i in range(n):  # S_{i+1} = A_i S_i + b_i
        entering.append(state)
        state = amap[:, :, i] @ state + bmap[:, :, i]
    s_in = torch.stack(entering, 2)  # (B, H, N, Dk, Dv)
    out = scale * (pmat @ u0 + (g_in[..., None] * qc - pmat @ w) @ s_in)
    out = out.permute(0, 2, 3, 1, 4).reshape(b, n * c, h, dv)[:, :s]
    return out, state

