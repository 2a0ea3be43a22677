"""All-gather attention (the softmax side of LASP-2H): one all-gather of K/V, then local attention.

Shapes. Global ``q [B, S, Hq, D]``, ``k, v [B, S, Hkv, D]``; on rank r of P: ``q [B, S/P, Hq, D]``,
``k, v [B, S/P, Hkv, D]`` in the ``zigzag`` or ``contiguous`` layout (:mod:`dist_attn.layout`);
output ``[B, S/P, Hq, D]`` in the same layout.

Collectives (scaling-book notation)::

    forward:   AllGather_cp(KV[2, B, S_cp, Hkv, D]) -> KV[2, B, S, Hkv, D]        (async)
    backward:  AllGather_cp(KV) again, ReduceScatter_cp(dKV[2, B, S, Hkv, D] fp32) -> dKV[S_cp]

Math. The local queries attend to all keys at once; the work is split into blocks whose partial
results merge through the log-sum-exp in fp32 (:mod:`dist_attn.merge`):

* the *local* block (local q vs local k/v, causal on the local concatenation, which is exact in
  both layouts) runs while the all-gather is in flight;
* after it lands, the gathered K/V are put in global token order
  (:func:`dist_attn.layout.gathered_to_global_index`) and the local queries attend, without a mask,
  to the key ranges that precede them and are not local. Zigzag, C = S/(2P), q = [q_r, q_{2P-1-r}]::

      all q           vs keys [0, r·C)                     (chunks before chunk r)
      q_{2P-1-r}      vs keys [(r+1)·C, (2P-1-r)·C)        (chunks between the two local ones)

  2P·C² unmasked work per rank in total: balanced. Contiguous causal: q vs keys [0, r·S/P).
  Non-causal: q vs every key but the local ones (rank order, no reordering needed).

Backward re-gathers K/V instead of saving the gathered copy, so activations stay O(S/P) per rank as
in ring attention; the dK/dV of every key are accumulated in fp32 and reduce-scattered to their owners.

Packed documents and windows (``cu_seqlens``, ``window_size``): the mask is applied after the
gather. Each local query chunk (two in zigzag) is one kernel call against the whole gathered sequence
in global order, with its global ``q_offset``; the kernel skips the key blocks outside its documents and
window. No host planning, so a CUDA ``cu_seqlens`` costs no sync; the gather is not overlapped in this
path, and the bytes are those below (the all-gather moves every block).

Cost per rank per layer (N = S global tokens, b bytes per input element)::

    forward bytes sent   2(P-1)/P · B·N·Hkv·D·b          (one all-gather of K and V)
    backward bytes sent  2(P-1)/P · B·N·Hkv·D·(b + 4)    (all-gather K/V + reduce-scatter fp32 dK/dV)
    memory               one gathered K/V copy 2·B·N·Hkv·D·b (+ fp32 dK/dV in backward), transient
    FLOPs                as ring attention: 4·B·Hq·(N/P)·N·D, x0.5 causal; backward 2.5x
"""
from __future__ import annotations

import functools

import torch

from dist_attn.comm import all_gather, reduce_scatter
from dist_attn.documents import check_same_on_ranks
from dist_attn.layout import gathered_to_global_index, rank_ranges
from dist_attn.merge import BlockwiseAttention, empty_accumulators, merge_into
from dist_attn.ring import _ALL, _rows, check_softmax_cp_inputs


def _remote_blocks(rank: int, world: int, layout: str, causal: bool, s_local: int):
    """Blocks left after the local one: ``[(q_rows, (start, end))]``, each an unmasked attention of
    the local query rows ``q_rows`` to the gathered keys ``[start, end)`` (global order if causal,
    rank order otherwise); empty ranges dropped."""
    if not causal:
        blocks = [(_ALL, (0, rank * s_local)), (_ALL, ((rank + 1) * s_local, world * s_local))]
    elif layout == "contiguous":
        blocks = [(_ALL, (0, rank * s_local))]
    else:
        c = s_local // 2
        blocks = [(_ALL, (0, rank * c)), (slice(c, None), ((rank + 1) * c, (2 * world - 1 - rank) * c))]
    return [(qs, (a, b)) for qs, (a, b) in blocks if b > a]


@functools.lru_cache(maxsize=64)
def _gathered_index(world: int, s_local: int, layout: str, causal: bool, device) -> torch.Tensor:
    """Index into the rank-order concatenation giving the key order the remote blocks use (cached;
    never modified in place)."""
    n = world * s_local
    if causal and layout == "zigzag":
        return gathered_to_global_index(n, world, layout, device=device)
    return torch.arange(n, device=device)  # rank order is already global order (or order is moot)


def _to_sequence(gathered: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``[P, 2, B, S/P, H, D]`` (rank order) -> ``[2, B, S, H, D]`` with token t = rank-order token idx[t]."""
    s_local = gathered.shape[3]
    g = gathered.permute(1, 2, 0, 3, 4, 5)                         # (2, B, P, S/P, H, D), a view
    return g[:, :, torch.div(idx, s_local, rounding_mode="floor"), idx % s_local]  # one copy


def _from_sequence(x: torch.Tensor, idx: torch.Tensor, world: int) -> torch.Tensor:
    """Inverse of :func:`_to_sequence`: ``[2, B, S, H, D]`` -> ``[P, 2, B, S/P, H, D]`` rank order."""
    two, b, s, h, d = x.shape
    inv = torch.argsort(idx)                                       # rank-order token j sits at inv[j]
    return x[:, :, inv].view(two, b, world, s // world, h, d).permute(2, 0, 1, 3, 4, 5).contiguous()


def _allgather_forward(q, k, v, group, causal, layout, scale, kernel, world, rank):
    """q ``[B, S/P, Hq, D]``, k/v ``[B, S/P, Hkv, D]`` -> (out in q's dtype, lse fp32 ``[B, Hq, S/P]``)."""
    if world > 1:  # [P, 2, B, S/P, Hkv, D]; the local block below overlaps with it
        gathered, work = all_gather(torch.stack([k, v]), group, async_op=True)
    out, lse = empty_accumulators(q)
    block_out, block_lse = kernel.fwd(q, k, v, causal=causal, softmax_scale=scale, q_offset=0, k_offset=0)
    merge_into(out, lse, block_out, block_lse)
    if world > 1:
        work.wait()
        kv = _to_sequence(gathered, _gathered_index(world, q.shape[1], layout, causal, q.device))
        del gathered
        for qs, (a, b) in _remote_blocks(rank, world, layout, causal, q.shape[1]):
            kb, vb = _rows(kv[0], slice(a, b)), _rows(kv[1], slice(a, b))
            block_out, block_lse = kernel.fwd(_rows(q, qs), kb, vb, causal=False, softmax_scale=scale,
                                              q_offset=0, k_offset=0)
            merge_into(out, lse, block_out, block_lse, qs)
    return out.to(q.dtype), lse


def _allgather_backward(dout, q, k, v, out, lse, group, causal, layout, scale, kernel, world, rank):
    """Gradients of the local q, k, v (fp32), given the merged forward ``out``/``lse``."""
    if world > 1:  # re-gather K/V (activations stay O(S/P)), overlapped with the local block
        gathered, work = all_gather(torch.stack([k, v]), group, async_op=True)
    dq, dk, dv = kernel.bwd(dout, q, k, v, out, lse, causal=causal, softmax_scale=scale, q_offset=0, k_offset=0)
    dq, dk, dv = dq.float(), dk.float(), dv.float()
    if world == 1:
        return dq, dk, dv
    work.wait()
    idx = _gathered_index(world, q.shape[1], layout, causal, q.device)
    kv = _to_sequence(gathered, idx)
    del gathered
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)  # dK/dV of every key
    for qs, (a, b) in _remote_blocks(rank, world, layout, causal, q.shape[1]):
        kb, vb = _rows(kv[0], slice(a, b)), _rows(kv[1], slice(a, b))
        dq_b, dk_b, dv_b = kernel.bwd(_rows(dout, qs), _rows(q, qs), kb, vb,
                                      _rows(out, qs), _rows(lse, qs, dim=2), causal=False,
                                      softmax_scale=scale, q_offset=0, k_offset=0)
        dq[:, qs] += dq_b
        dkv[0, :, a:b] += dk_b
        dkv[1, :, a:b] += dv_b
    # rank j receives sum over ranks of the gradients of its own keys
    dkv_local = reduce_scatter(_from_sequence(dkv, idx, world), group)   # [2, B, S/P, Hkv, D]
    return dq, dk + dkv_local[0], dv + dkv_local[1]


def _gather_global(k, v, group, world, s_local, layout, q_device):
    """All-gathered K/V ``[2, B, S, Hkv, D]`` in global token order, and the order index used."""
    idx = _gathered_index(world, s_local, layout, True, q_device)
    if world == 1:
        return torch.stack([k, v]), idx
    return _to_sequence(all_gather(torch.stack([k, v]), group), idx), idx


def _local_chunks(q, world, rank, layout):
    """``[(rows, q_offset)]``: each local chunk's rows and global start."""
    ranges = rank_ranges(world * q.shape[1], rank, world, layout)
    c = q.shape[1] // len(ranges)
    return [(slice(i * c, (i + 1) * c), start) for i, (start, _) in enumerate(ranges)]


def _masked_forward(q, k, v, group, causal, layout, scale, kernel, world, rank, mask_kw):
    kv, _ = _gather_global(k, v, group, world, q.shape[1], layout, q.device)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.promote_types(q.dtype, torch.float32),
                      device=q.device)
    for qs, qo in _local_chunks(q, world, rank, layout):
        o_c, l_c = kernel.fwd(_rows(q, qs), kv[0], kv[1], causal=causal, softmax_scale=scale, q_offset=qo,
                              k_offset=0, **mask_kw)
        out[:, qs], lse[:, :, qs] = o_c, l_c
    return out, lse


def _masked_backward(dout, q, k, v, out, lse, group, causal, layout, scale, kernel, world, rank, mask_kw):
    kv, idx = _gather_global(k, v, group, world, q.shape[1], layout, q.device)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)  # dK/dV of every key, global order
    for qs, qo in _local_chunks(q, world, rank, layout):
        dq_c, dk_c, dv_c = kernel.bwd(_rows(dout, qs), _rows(q, qs), kv[0], kv[1], _rows(out, qs),
                                      _rows(lse, qs, dim=2), causal=causal, softmax_scale=scale, q_offset=qo,
                                      k_offset=0, **mask_kw)
        dq[:, qs] += dq_c
        dkv[0] += dk_c
        dkv[1] += dv_c
    if world == 1:
        return dq, dkv[0], dkv[1]
    dkv_local = reduce_scatter(_from_sequence(dkv, idx, world), group)   # [2, B, S/P, Hkv, D]
    return dq, dkv_local[0], dkv_local[1]


def allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group, causal: bool = True,
                        layout: str = "zigzag", softmax_scale=None, local_attn=None, cu_seqlens=None,
                        window_size=None) -> torch.Tensor:
    """Softmax attention of the local queries over the all-gathered keys of ``group``.

    q ``[B, S/P, Hq, D]``, k/v ``[B, S/P, Hkv, D]`` (this rank's shard in ``layout``) ->
    out ``[B, S/P, Hq, D]``, differentiable in q, k, v. ``local_attn`` as in
    :func:`dist_attn.ring.ring_attention`; ``cu_seqlens`` (global offsets, CPU or q's device) and
    ``window_size`` (causal only) mask the gathered keys. Raises ``ValueError`` on every rank, before any
    communication, for an invalid input.
    """
    import torch.distributed as dist

    world, scale, kernel = check_softmax_cp_inputs("allgather_attention", q, k, v, group, causal, layout,
                                                   softmax_scale, local_attn, cu_seqlens, window_size)
    rank = dist.get_rank(group)
    if cu_seqlens is None and window_size is None:
        return BlockwiseAttention.apply(q, k, v, _allgather_forward, _allgather_backward,
                                        (group, causal, layout, scale, kernel, world, rank))
    if cu_seqlens is None or cu_seqlens.device.type == "cpu":  # debug-mode cross-rank check (free otherwise)
        check_same_on_ranks("allgather_attention", None if cu_seqlens is None else tuple(cu_seqlens.tolist()),
                            window_size, group)
    mask_kw = dict(cu_seqlens=cu_seqlens, window_size=window_size)
    return BlockwiseAttention.apply(q, k, v, _masked_forward, _masked_backward,
                                    (group, causal, layout, scale, kernel, world, rank, mask_kw))
