"""Chunked causal linear attention in plain torch, with a hand-written backward (the CPU backend).

Layout: q, k ``[B, S, H, Dk]``, v ``[B, S, H, Dv]``; state fp32 (fp64 for fp64 inputs) ``[B, H, Dk, Dv]``;
``decay`` is the per-head log-decay g ``[H]`` (<= 0), lambda = exp(g).

The sequence is cut into N chunks of C = 64 tokens (the last one has L_N <= C tokens, zero padded).
Everything inside a chunk is one batched matmul over all chunks at once; only the (Dk x Dv) state
recurrence between chunks is a Python loop of N axpys. With S_n the state *entering* chunk n, local
token index i, j in [0, L_n), M[i, j] = lambda^(i-j) for i >= j (else 0), Q~_i = lambda^(i+1) q_i and
K~_j = lambda^(L_n-1-j) k_j::

    O_n     = scale * [ (Q K^T ⊙ M) V + Q~ S_n ]
    S_{n+1} = lambda^(L_n) S_n + K~^T V

Backward, with G_n = dLoss/dS_{n+1} (the gradient of the state *leaving* chunk n; G_{N-1} = dfinal)::

    G_{n-1} = lambda^(L_n) G_n + scale * Q~^T dO          (dinitial = the same expression for n = 0)
    dQ      = scale * [ (dO V^T ⊙ M) K + lambda^(i+1) ⊙ (dO S_n^T) ]
    dK      = scale * (V dO^T ⊙ M^T) Q + lambda^(L_n-1-j) ⊙ (V G_n^T)
    dV      = scale * (K Q^T ⊙ M^T) dO + K~ G_n

The per-chunk entering states are materialised ([B, H, N, Dk, Dv], about Dk/C times the size of q in
fp32), which is what makes the intra-chunk work a handful of large matmuls.
"""
from __future__ import annotations

import numbers

import torch

CHUNK = 64


def check_inputs(q, k, v, decay, initial_state, scale, *, dtypes, op, check_values=True):
    """Raise ``ValueError`` (expected / got / fix) for user mistakes shared by both backends.

    ``check_values`` also checks that ``decay`` is finite and <= 0 (a device sync on GPU)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = f"{t.dim()}-D shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{op}: {name} expected a 4-D tensor [B, S, H, D], got {got}. "
                             f"Fix: reshape to [batch, seq, heads, head_dim].")
    if not (q.shape[:3] == k.shape[:3] == v.shape[:3]):
        raise ValueError(f"{op}: q, k, v expected the same [B, S, H], got {tuple(q.shape[:3])}, "
                         f"{tuple(k.shape[:3])}, {tuple(v.shape[:3])}. Fix: repeat KV heads (GQA) "
                         f"before calling, and pass the same batch and sequence.")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"{op}: q and k expected the same head dim Dk, got {q.shape[3]} and "
                         f"{k.shape[3]}. Fix: project q and k to the same Dk.")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{op}: q, k, v expected one dtype among ({names}), got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}. Fix: cast all three to one supported dtype.")
    b, _, h, dk = q.shape
    dv = v.shape[3]
    others = [t for t in (k, v, decay, initial_state) if isinstance(t, torch.Tensor)]
    if any(t.device != q.device for t in others):
        raise ValueError(f"{op}: q, k, v, decay, initial_state expected on one device, got "
                         f"{[str(t.device) for t in [q] + others]}. Fix: move them with .to(q.device).")
    if decay is not None:
        if not isinstance(decay, torch.Tensor) or tuple(decay.shape) != (h,) or \
                not decay.is_floating_point():
            got = f"shape {tuple(decay.shape)}" if isinstance(decay, torch.Tensor) else type(decay).__name__
            raise ValueError(f"{op}: decay expected a float tensor of shape [H] = [{h}] (per-head "
                             f"log-decay), got {got}. Fix: pass torch.full((H,), g) or None for no decay.")
        if check_values and not bool(torch.all(torch.isfinite(decay) & (decay <= 0))):
            raise ValueError(f"{op}: decay expected finite log-decays g <= 0 (lambda = exp(g) in (0, 1]), "
                             f"got max {decay.max().item():.4g}, min {decay.min().item():.4g}. Fix: pass "
                             f"log(lambda), e.g. -F.softplus(x), not lambda itself.")
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor) or \
                tuple(initial_state.shape) != (b, h, dk, dv) or not initial_state.is_floating_point():
            got = (f"shape {tuple(initial_state.shape)}" if isinstance(initial_state, torch.Tensor)
                   else type(initial_state).__name__)
            raise ValueError(f"{op}: initial_state expected a float tensor [B, H, Dk, Dv] = "
                             f"[{b}, {h}, {dk}, {dv}], got {got}. Fix: pass the final_state of the "
                             f"previous segment, or None.")
    if not isinstance(scale, numbers.Real):
        raise ValueError(f"{op}: scale expected a Python number, got {type(scale).__name__}. "
                         f"Fix: pass a float such as Dk ** -0.5.")


def _chunked(x, n, acc):
    """[B, S, H, D] -> [B, H, N, C, D] in ``acc``, zero padded to N * C tokens."""
    b, s, h, d = x.shape
    x = x.to(acc).permute(0, 2, 1, 3)  # (B, H, S, D)
    x = torch.nn.functional.pad(x, (0, 0, 0, n * CHUNK - s))
    return x.reshape(b, h, n, CHUNK, d)


def _unchunked(x, s, dtype):
    """[B, H, N, C, D] -> [B, S, H, D] in ``dtype``, padding dropped."""
    b, h, n, c, d = x.shape
    return x.reshape(b, h, n * c, d)[:, :, :s].permute(0, 2, 1, 3).to(dtype).contiguous()


def _decay_factors(decay, h, s, n, device, acc):
    """The decay powers of one call: M [H, C, C], lambda^(i+1) [H, C], lambda^(L_n-1-j) [H, N, C]
    (zero on padded tokens) and lambda^(L_n) [H, N]."""
    g = torch.zeros(h, device=device, dtype=acc) if decay is None else decay.detach().to(acc)
    i = torch.arange(CHUNK, device=device, dtype=acc)
    diff = i[:, None] - i[None, :]
    # exp of the clamped exponent: lambda^(i-j) for j > i would overflow before being masked
    m = torch.where(diff >= 0, torch.exp(g[:, None, None] * diff.clamp(min=0)), 0.0)
    q_dec = torch.exp(g[:, None] * (i + 1))
    lengths = torch.full((n,), CHUNK, device=device, dtype=acc)
    lengths[-1] = s - (n - 1) * CHUNK
    expo = lengths[:, None] - 1 - i  # (N, C); negative on padded tokens
    k_dec = torch.where(expo >= 0, torch.exp(g[:, None, None] * expo.clamp(min=0)), 0.0)
    chunk_dec = torch.exp(g[:, None] * lengths)
    return m, q_dec, k_dec, chunk_dec


def _entering_states(kc, vc, k_dec, chunk_dec, s0):
    """S_n for every chunk [B, H, N, Dk, Dv] and the final state, by the chunk-level recurrence."""
    delta = torch.matmul((kc * k_dec[..., None]).transpose(-1, -2), vc)  # K~^T V, (B, H, N, Dk, Dv)
    states = torch.empty_like(delta)
    s = s0
    for n in range(delta.shape[2]):
        states[:, :, n] = s
        s = chunk_dec[None, :, n, None, None] * s + delta[:, :, n]
    return states, s


def _setup(q, k, v, decay, initial_state):
    b, s, h, dk = q.shape
    dv = v.shape[-1]
    acc = torch.promote_types(q.dtype, torch.float32)
    n = max(1, -(-s // CHUNK))
    qc, kc, vc = (_chunked(t, n, acc) for t in (q, k, v))
    facs = _decay_factors(decay, h, s, n, q.device, acc)
    s0 = (torch.zeros(b, h, dk, dv, device=q.device, dtype=acc) if initial_state is None
          else initial_state.detach().to(acc))
    return acc, n, qc, kc, vc, facs, s0


_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def lightning_fwd(q, k, v, *, decay=None, initial_state=None, scale=None):
    """Forward. Returns ``(out [B,S,H,Dv] in v.dtype, final_state [B,H,Dk,Dv] fp32, fp64 for fp64)``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    check_inputs(q, k, v, decay, initial_state, scale, dtypes=_DTYPES, op="lightning_attn[torch]")
    acc, n, qc, kc, vc, (m, q_dec, k_dec, chunk_dec), s0 = _setup(q, k, v, decay, initial_state)
    states, final = _entering_states(kc, vc, k_dec, chunk_dec, s0)
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * m[:, None]  # (B, H, N, C, C)
    out = torch.matmul(scores, vc) + torch.matmul(qc * q_dec[:, None, :, None], states)
    return _unchunked(scale * out, q.shape[1], v.dtype), final


def lightning_bwd(dout, dfinal_state, q, k, v, *, decay=None, initial_state=None, scale=None):
    """Backward. Returns ``(dq, dk, dv, dinitial_state)``; ``dinitial_state`` is None without an
    ``initial_state`` and is in its dtype otherwise. ``dfinal_state`` may be None (no gradient)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    check_inputs(q, k, v, decay, initial_state, scale, dtypes=_DTYPES, op="lightning_attn[torch]",
                 check_values=False)
    assert dout.shape == v.shape, f"dout {tuple(dout.shape)} != v {tuple(v.shape)}"
    acc, n, qc, kc, vc, (m, q_dec, k_dec, chunk_dec), s0 = _setup(q, k, v, decay, initial_state)
    doc = _chunked(dout, n, acc)
    states, _ = _entering_states(kc, vc, k_dec, chunk_dec, s0)
    qt = qc * q_dec[:, None, :, None]  # Q~ (B, H, N, C, Dk)
    kt = kc * k_dec[..., None]  # K~
    # reverse chunk recurrence: G_{n-1} = lambda^(L_n) G_n + scale * Q~_n^T dO_n
    u = scale * torch.matmul(qt.transpose(-1, -2), doc)  # (B, H, N, Dk, Dv)
    grads = torch.empty_like(u)
    gs = (torch.zeros_like(s0) if dfinal_state is None else dfinal_state.to(acc))
    for c in range(n - 1, -1, -1):
        grads[:, :, c] = gs
        gs = chunk_dec[None, :, c, None, None] * gs + u[:, :, c]
    m = m[:, None]  # (H, 1, C, C) broadcasts over (B, H, N, C, C)
    d_scores = torch.matmul(doc, vc.transpose(-1, -2)) * m  # (dO V^T ⊙ M)[i, j]
    dq = scale * (torch.matmul(d_scores, kc) +
                  q_dec[:, None, :, None] * torch.matmul(doc, states.transpose(-1, -2)))
    dk = scale * torch.matmul(d_scores.transpose(-1, -2), qc) + \
        k_dec[..., None] * torch.matmul(vc, grads.transpose(-1, -2))
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * m
    dv = scale * torch.matmul(scores.transpose(-1, -2), doc) + torch.matmul(kt, grads)
    s = q.shape[1]
    dinit = None if initial_state is None else gs.to(initial_state.dtype)
    return _unchunked(dq, s, q.dtype), _unchunked(dk, s, k.dtype), _unchunked(dv, s, v.dtype), dinit
