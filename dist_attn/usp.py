"""USP / 2D attention: Ulysses over U ranks inside a node, ring attention over R ranks across nodes.

The CP group of P = U x R ranks is split by :func:`dist_attn.groups.make_usp_groups`: CP rank
c = j·U + u is rank u of its Ulysses group (consecutive ranks) and rank j of its ring group (strided).
In the notation of :mod:`dist_attn.layout`::

    q[B, S_P, Hq, D] --AllToAll_U--> q[B, S_R, Hq_U, D]     (k, v likewise: sequence gathered over U,
                                                             heads split over U)
    out[B, S_R, Hq_U, D] = RingAttention_R(q, k, v)          (K/V of Hkv/U heads circulate over R)
    out[B, S_R, Hq_U, D] --AllToAll_U--> out[B, S_P, Hq, D]

Local shapes: inputs ``[B, S/P, H, D]``; the ring sees ``[B, S/R, H/U, D]``.

Why the ring sees a valid layout. Ulysses group j gathers the shards of CP ranks jU .. jU+U-1.

* zigzag over P (2P chunks of C = S/2P): those ranks hold chunks jU..jU+U-1 (first halves) and
  2P-1-jU .. 2P-U-jU (second halves, descending). Taking the first halves in rank order, then the second
  halves in reverse rank order, gives the contiguous runs [jU·C, (j+1)U·C) and [(2R-1-j)U·C, (2R-j)U·C),
  i.e. chunks j and 2R-1-j of the 2R chunks of U·C = S/2R tokens: exactly rank j of a zigzag layout over R.
* contiguous over P: the shards of ranks jU .. jU+U-1 are already block j of the contiguous layout over R.

So one local permutation after the all-to-all (and its inverse before the return trip) is all the glue;
the causal zigzag schedule of the ring stays balanced. :func:`ring_local_order` builds it from the layouts
and asserts it is a permutation, and the tests check the explicit construction above.

Packed documents and windows: the ring shards are shards of the SAME global sequence (positions in
[0, S)), so ``cu_seqlens`` (global offsets) and ``window_size`` pass unchanged to the ring over R, which
skips invisible blocks and their exchanges (:mod:`dist_attn.ring`), or to the kernel when R = 1.

Cost per rank per layer (b bytes per element, N = S, Dv = D; Hkv' = max(Hkv, U) after KV replication)::

    Ulysses, over U:  (U-1)/(U·P) · B·N·D·b·(2Hq + 2Hkv')      forward, and the same backward
    ring, over R:     2(R-1)/R · B·N·(Hkv'/U)·D·b              forward; backward 2(R-1)/R·B·N·(Hkv'/U)·D·(b+4)

The ring carries 1/U of the heads, so its bytes fall by U compared with a ring over P (for U = P, R = 1
the ring vanishes and this is Ulysses; for U = 1 it is the ring). FLOPs: 1/P of the single-device work,
balanced in the zigzag layout.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from dist_attn.documents import check_documents
from dist_attn.groups import check_usp_groups
from dist_attn.layout import check_seq_len, position_ids
from dist_attn.ring import check_softmax_cp_inputs, ring_attention
from dist_attn.ulysses import check_head_split, head_to_seq, seq_to_head


@lru_cache(maxsize=64)
def ring_local_order(seq_len: int, ulysses_degree: int, ring_size: int, ring_index: int, layout: str,
                     device=None):
    """``(idx, inv)`` with ``ring_shard = gathered[:, idx]`` and ``gathered = ring_shard[:, inv]``, where
    ``gathered`` is the all-to-all output of Ulysses group ``ring_index`` (None when the identity)."""
    u_deg, p = ulysses_degree, ulysses_degree * ring_size
    # global positions of the gathered tokens: the shards of CP ranks jU .. jU+U-1, in rank order
    gathered = torch.cat([position_ids(seq_len, ring_index * u_deg + u, p, layout) for u in range(u_deg)])
    target = position_ids(seq_len, ring_index, ring_size, layout)  # what rank j of the ring must hold
    where_is = torch.full((seq_len,), -1, dtype=torch.long)
    where_is[gathered] = torch.arange(gathered.numel())
    idx = where_is[target]
    assert (idx >= 0).all() and torch.equal(gathered[idx], target), "Ulysses shards do not form a ring shard"
    if torch.equal(idx, torch.arange(idx.numel())):
        return None
    return idx.to(device), torch.argsort(idx).to(device)


def usp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ulysses_group, ring_group,
                  causal: bool = True, layout: str = "zigzag", softmax_scale: Optional[float] = None,
                  local_attn=None, cu_seqlens=None, window_size=None) -> torch.Tensor:
    """Softmax attention over a CP group of P = U x R ranks (see the module docstring).

    Args:
        q: ``[B, S/P, Hq, D]`` this rank's shard in ``layout`` over the P CP ranks, CP rank = j·U + u;
            k, v ``[B, S/P, Hkv, D]``.
        ulysses_group, ring_group: this rank's groups from :func:`dist_attn.groups.make_usp_groups`.
        causal, layout, softmax_scale: as in :func:`dist_attn.ring.ring_attention`.
        local_attn: a SoftmaxKernel (default ``softmax_kernel("auto")``) or what ring attention accepts.
        cu_seqlens, window_size: global document offsets and left window, as in ring attention.

    Returns ``out [B, S/P, Hq, D]`` in the same layout. Every check runs before any collective.
    """
    where = "usp_attention"
    u_deg, r_deg, _, j = check_usp_groups(where, ulysses_group, ring_group)
    p = u_deg * r_deg
    # the ring's own checks, on shapes it will see after the all-to-all (same per-token validity)
    _, scale, kernel = check_softmax_cp_inputs(where, q, k, v, ring_group, causal, layout, softmax_scale,
                                               local_attn)
    b, sl, hq, hkv = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    check_seq_len(sl * p, p, layout, f"{where}: global sequence (local {sl} x P={p} = U {u_deg} x R {r_deg})")
    rep = check_head_split(where, hq, hkv, u_deg, "Ulysses degree (U)")
    check_documents(where, cu_seqlens, window_size, causal, sl * p, q.device)

    n = sl * p
    if rep > 1:  # [B, S/P, Hkv, D] -> [B, S/P, U, D]; autograd sums the replicas' gradients
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    order = ring_local_order(n, u_deg, r_deg, j, layout, q.device)
    q_r, k_r, v_r = seq_to_head((q, k, v), ulysses_group, order)  # [B, S/R, H/U, D], ring layout over R
    if r_deg == 1:  # the ring is a single rank: plain local attention on the full sequence
        out_r, _ = kernel(q_r, k_r, v_r, causal=causal, softmax_scale=scale, cu_seqlens=cu_seqlens,
                          window_size=window_size)
    else:
        out_r = ring_attention(q_r, k_r, v_r, group=ring_group, causal=causal, layout=layout,
                               softmax_scale=scale, local_attn=kernel, cu_seqlens=cu_seqlens,
                               window_size=window_size)
    (out,) = head_to_seq((out_r,), ulysses_group, order)  # [B, S/P, Hq, D]
    assert out.shape == (b, sl, hq, q.shape[3])
    return out
