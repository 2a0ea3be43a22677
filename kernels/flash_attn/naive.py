"""Plain-torch softmax attention reference (materialises the score matrix).

Tests run it in fp64 as the ground truth for the Triton and torch kernels and for every
context-parallel strategy. Layout ``[B, S, H, D]``; returns ``(out [B,Sq,Hq,D], lse fp32-or-wider [B,Hq,Sq])``.

Causal masking uses global positions: query ``q_offset + i`` sees key ``k_offset + j`` iff
``k_offset + j <= q_offset + i``. A query row that sees no key gives ``out = 0`` and ``lse = -inf``,
and its gradients are 0 (never NaN).

Packed documents and windows (``cu_seqlens``, ``window_size``) are applied as a dense boolean mask built
straight from the definition (same document by index lookup, t <= p, p - W <= t), independently of the
interval form the kernels use (:mod:`.masks`); any other ``[Sq, Sk]`` mask can be passed as ``mask``.
"""
from __future__ import annotations

import torch


def causal_mask(sq: int, sk: int, q_offset: int, k_offset: int, device=None) -> torch.Tensor:
    """``[Sq, Sk]`` bool, True where the key is visible to the query."""
    qpos = q_offset + torch.arange(sq, device=device)
    kpos = k_offset + torch.arange(sk, device=device)
    return kpos[None, :] <= qpos[:, None]


def document_mask(sq: int, sk: int, q_offset: int, k_offset: int, causal: bool, cu_seqlens=None,
                  window_size=None, device=None) -> torch.Tensor:
    """``[Sq, Sk]`` bool from the definition: doc(p) == doc(t), t <= p if causal, t >= p - W if windowed."""
    qpos = q_offset + torch.arange(sq, device=device)
    kpos = k_offset + torch.arange(sk, device=device)
    vis = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if causal:
        vis &= kpos[None, :] <= qpos[:, None]
    if window_size is not None:
        vis &= kpos[None, :] >= qpos[:, None] - window_size
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        n = int(cu[-1])
        doc_of = torch.zeros(n, dtype=torch.int64, device=device)
        for d in range(cu.numel() - 1):  # document index of every position, by direct assignment
            doc_of[int(cu[d]):int(cu[d + 1])] = d
        vis &= doc_of[qpos][:, None] == doc_of[kpos][None, :]
    return vis


def attention_ref(q, k, v, *, causal=False, softmax_scale=None, q_offset=0, k_offset=0, cu_seqlens=None,
                  window_size=None, mask=None):
    """Softmax attention with LSE, differentiable through both outputs (GQA by head repetition).
    ``mask`` ``[Sq, Sk]`` bool (True = visible) is combined with causal / documents / window."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    assert hq % hkv == 0, "Hq must be a multiple of Hkv"
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    k = k.repeat_interleave(hq // hkv, dim=2)
    v = v.repeat_interleave(hq // hkv, dim=2)
    acc = torch.promote_types(q.dtype, torch.float32)
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), k.to(acc)) * scale  # (B, Hq, Sq, Sk)
    if causal:
        s = s.masked_fill(~causal_mask(sq, sk, q_offset, k_offset, q.device), float("-inf"))
    if cu_seqlens is not None or window_size is not None:
        s = s.masked_fill(~document_mask(sq, sk, q_offset, k_offset, causal, cu_seqlens, window_size,
                                         q.device), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask.to(q.device), float("-inf"))
    # lse = m + log(sum exp(s - m)); m is detached (lse does not depend on it) and empty rows
    # are routed through torch.where so that neither branch can produce a NaN gradient.
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    sumexp = torch.exp(s - m).sum(dim=-1)  # (B, Hq, Sq)
    empty = sumexp == 0
    lse = torch.where(empty, torch.full_like(sumexp, float("-inf")),
                      m.squeeze(-1) + torch.log(torch.where(empty, torch.ones_like(sumexp), sumexp)))
    lse_safe = torch.where(empty, torch.zeros_like(lse), lse)
    p = torch.exp(s - lse_safe.unsqueeze(-1))  # rows with no key are all zeros
    out = torch.einsum("bhqk,bkhd->bqhd", p, v.to(acc))
    return out.to(q.dtype), lse
