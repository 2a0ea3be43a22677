"""Ulysses (DeepSpeed-Ulysses) context parallelism: trade the sequence shard for a head shard.

Sharding, in the notation of :mod:`dist_attn.layout` (P ranks in ``group``)::

    q[B, S_cp, Hq, D] --AllToAll_cp--> q[B, S, Hq_cp, D]     (likewise k, v with Hkv heads)
    out[B, S, Hq_cp, D] = local_attn(q, k, v)                 (any local op: every rank sees all tokens)
    out[B, S, Hq_cp, D] --AllToAll_cp--> out[B, S_cp, Hq, D]

Local shapes on each rank: inputs ``[B, S/P, H, D]``, the local op sees ``[B, S, H/P, D]``. Rank r gets
heads ``[r·H/P, (r+1)·H/P)``. The all-to-all delivers the tokens in *rank order*; for the zigzag layout
that is chunks (0, 2P-1, 1, 2P-2, ...), so they are permuted to global order before the local op (causal
masking and the linear-attention recurrence need it) and permuted back before the return trip.

GQA/MQA: Hq must be divisible by P. KV heads are split the same way when Hkv >= P (then Hkv % P == 0).
When Hkv < P (needs P % Hkv == 0) each KV head is replicated P/Hkv times before the all-to-all, so every
rank receives exactly the KV head its query heads use (query head h uses KV head h·Hkv/Hq); autograd
sums the replicas' gradients back into the one KV head.

Local op: a :class:`~dist_attn.kernels.interface.SoftmaxKernel` (softmax attention, ``causal`` as given) or a
:class:`~dist_attn.kernels.interface.LinearKernel` (causal linear attention; ``decay [H]`` is sliced to this
rank's heads and ``softmax_scale`` is passed as the linear ``scale``).

Cost per rank per layer (b bytes per element, N = S global tokens, Dv = D for softmax):

    forward bytes sent  = (P-1)/P² · B·N·b · (Hq·D + Hkv·D + Hkv·Dv + Hq·Dv)
                        = (P-1)/P² · B·N·D·b · (2Hq + 2Hkv)                    when Dv = D
    backward bytes sent = the same (dout in; dq, dk, dv out),
    with Hkv replaced by P when Hkv < P (the replicas travel). Received bytes equal sent bytes.
    FLOPs: those of the local op on [B, S, H/P, D], i.e. exactly 1/P of the single-device work.

q, k and v travel in one packed all-to-all (one collective instead of three, same bytes).

Packed documents and windows: after the all-to-all every rank holds the whole sequence in global order
(for its heads), so ``cu_seqlens`` (global offsets) and ``window_size`` go straight to the local op:
softmax with offsets 0 (the kernel skips invisible key blocks), linear attention with ``cu_seqlens`` as
its LOCAL offsets (identical to the global ones here: the state resets at every document start). A
per-token log gate ``g [B, S/P, H]`` (linear only) travels with q/k/v (same all-to-all when it has
their dtype, else its own: + (P-1)/P²·B·N·H·4 bytes for an fp32 gate) and is sliced to this rank's heads.
"""
from __future__ import annotations

import numbers
from functools import lru_cache
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from dist_attn import comm
from dist_attn.checks import check_group, check_qkv, fail
from dist_attn.documents import check_documents, check_same_on_ranks
from dist_attn.layout import check_layout, check_seq_len, gathered_to_global_index
from dist_attn.kernels.interface import LinearKernel, SoftmaxKernel

# Shape legend: B batch, S global tokens, Sl = S/P local tokens, H heads, h = H/P heads per rank,
# D head dim, P group size. "gathered" order = rank order of the shards, "target" = what the op needs.

Order = Optional[tuple]  # (idx, inv): target = gathered[:, idx], gathered = target[:, inv]; None = same


@lru_cache(maxsize=64)
def global_order(seq_len: int, world_size: int, layout: str, device=None) -> Order:
    """Permutation from the all-to-all's rank order to global token order (None when the identity)."""
    idx = gathered_to_global_index(seq_len, world_size, layout)
    if torch.equal(idx, torch.arange(seq_len)):
        return None  # contiguous: rank order is already global order
    return idx.to(device), torch.argsort(idx).to(device)


def _seq_to_head(xs: Sequence[torch.Tensor], group, order: Order) -> list:
    """[B, Sl, H_i, D_i] each -> [B, S, H_i/P, D_i] each in target order, with one all-to-all."""
    p = dist.get_world_size(group)
    bufs = []
    for x in xs:
        b, sl, h, d = x.shape
        # head block j is destined to rank j: [B, Sl, P, h, D] -> [P, B, Sl, h, D]
        bufs.append(x.reshape(b, sl, p, h // p, d).permute(2, 0, 1, 3, 4).reshape(p, -1))
    recv = comm.all_to_all(torch.cat(bufs, dim=1), group)  # [P, sum_i B·Sl·h_i·D_i]; slice j from rank j
    outs, start = [], 0
    for x in xs:
        b, sl, h, d = x.shape
        n = b * sl * (h // p) * d
        piece = recv[:, start:start + n].reshape(p, b, sl, h // p, d)  # [P(source rank), B, Sl, h, D]
        start += n
        y = piece.transpose(0, 1).reshape(b, p * sl, h // p, d)  # [B, S, h, D], shards in rank order
        outs.append(y if order is None else y.index_select(1, order[0]))
    return outs


def _head_to_seq(xs: Sequence[torch.Tensor], group, order: Order) -> list:
    """Inverse of :func:`_seq_to_head`: [B, S, H_i/P, D_i] in target order -> [B, Sl, H_i, D_i]."""
    p = dist.get_world_size(group)
    bufs = []
    for x in xs:
        if order is not None:
            x = x.index_select(1, order[1])  # back to rank order of the shards
        b, s, h, d = x.shape
        # sequence block j goes home to rank j: [B, P, Sl, h, D] -> [P, B, Sl, h, D]
        bufs.append(x.reshape(b, p, s // p, h, d).transpose(0, 1).reshape(p, -1))
    recv = comm.all_to_all(torch.cat(bufs, dim=1), group)  # slice j holds head block j of my tokens
    outs, start = [], 0
    for x in xs:
        b, s, h, d = x.shape
        n = b * (s // p) * h * d
        piece = recv[:, start:start + n].reshape(p, b, s // p, h, d)  # [P(head block), B, Sl, h, D]
        start += n
        outs.append(piece.permute(1, 2, 0, 3, 4).reshape(b, s // p, p * h, d))  # [B, Sl, H, D]
    return outs


def _dense(grads, outs_meta) -> list:
    """Autograd hands None for an output that got no gradient; the all-to-all needs a tensor."""
    return [torch.zeros(shape, dtype=dtype, device=device) if g is None else g.contiguous()
            for g, (shape, dtype, device) in zip(grads, outs_meta)]


class _SeqToHead(torch.autograd.Function):
    """Sequence-sharded -> head-sharded. Its backward is the inverse all-to-all."""

    @staticmethod
    def forward(ctx, group, order, *xs):
        outs = tuple(_seq_to_head(xs, group, order))
        ctx.group, ctx.order = group, order
        ctx.meta = [(y.shape, y.dtype, y.device) for y in outs]
        return outs

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *_head_to_seq(_dense(grads, ctx.meta), ctx.group, ctx.order))


class _HeadToSeq(torch.autograd.Function):
    """Head-sharded -> sequence-sharded. Its backward is the inverse all-to-all."""

    @staticmethod
    def forward(ctx, group, order, *xs):
        outs = tuple(_head_to_seq(xs, group, order))
        ctx.group, ctx.order = group, order
        ctx.meta = [(y.shape, y.dtype, y.device) for y in outs]
        return outs

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *_seq_to_head(_dense(grads, ctx.meta), ctx.group, ctx.order))


def seq_to_head(xs: Sequence[torch.Tensor], group, order: Order) -> tuple:
    """Differentiable ``AllToAll(x[B, S_P, H, D]) -> x[B, S, H_P, D]`` for several tensors at once."""
    if dist.get_world_size(group) == 1:
        assert order is None, "a group of one rank cannot reorder tokens"
        return tuple(xs)
    return _SeqToHead.apply(group, order, *xs)


def head_to_seq(xs: Sequence[torch.Tensor], group, order: Order) -> tuple:
    """Differentiable ``AllToAll(x[B, S, H_P, D]) -> x[B, S_P, H, D]`` for several tensors at once."""
    if dist.get_world_size(group) == 1:
        assert order is None, "a group of one rank cannot reorder tokens"
        return tuple(xs)
    return _HeadToSeq.apply(group, order, *xs)


def check_head_split(where: str, hq: int, hkv: int, degree: int, name: str = "Ulysses degree (P)") -> int:
    """Raise unless the heads can be split over ``degree`` ranks; return the KV replication factor
    (the one rule, :func:`dist_attn.plan.check_head_split`)."""
    from dist_attn.plan import check_head_split as rule
    return rule(where, hq, hkv, degree, name)


def _check_gate(where: str, g, b: int, sl: int, heads: int, device) -> None:
    if not isinstance(g, torch.Tensor) or tuple(g.shape) != (b, sl, heads) or not g.is_floating_point():
        got = f"{tuple(g.shape)} {g.dtype}" if isinstance(g, torch.Tensor) else type(g).__name__
        fail(where, f"g as a float tensor [B, S/P, H]=[{b}, {sl}, {heads}] sharded like q", got,
             "pass one log gate per token and head, or g=None")
    if g.device != device:
        fail(where, f"g on q's device {device}", str(g.device), "move g to q's device")
    if g.device.type == "cpu" and bool((g > 0).any()):  # value check only where it costs no sync
        fail(where, "g <= 0 (a log gate)", f"max {g.max().item():.4g}", "pass logsigmoid(...) or -softplus(...)")


def _check_decay(where: str, decay, heads: int) -> None:
    if not isinstance(decay, torch.Tensor) or decay.shape != (heads,) or not decay.is_floating_point():
        got = f"{tuple(decay.shape)} {decay.dtype}" if isinstance(decay, torch.Tensor) else type(decay).__name__
        fail(where, f"decay as a float tensor of shape [H]=[{heads}] (per-head log decay)", got,
             "pass one log-decay per head, or decay=None")
    # value check only where it costs no device sync (CPU tensors) or when debugging (anomaly mode)
    if (decay.device.type == "cpu" or torch.is_anomaly_enabled()) and \
            (bool((decay > 0).any()) or bool(torch.isnan(decay).any())):
        fail(where, "decay <= 0 (a log decay: lambda = exp(decay) <= 1)", f"max {decay.max().item():.4g}",
             "pass log(lambda), e.g. -torch.rand(H), not lambda itself")


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None, causal: bool = True,
                      layout: str = "zigzag", softmax_scale: Optional[float] = None, local_attn=None,
                      decay: Optional[torch.Tensor] = None, cu_seqlens=None, window_size=None,
                      g: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention over a context-parallel group by two all-to-alls (see the module docstring).

    Args:
        q: ``[B, S/P, Hq, D]`` this rank's shard in ``layout``; k ``[B, S/P, Hkv, D]``; v ``[B, S/P, Hkv, Dv]``.
        group: the CP process group (None: the default group).
        causal: causal mask on global positions (softmax only; linear attention is always causal).
        layout: ``"zigzag"`` or ``"contiguous"``, the layout the shards are in.
        softmax_scale: softmax scale (default D^-0.5); for a linear op, its ``scale``.
        local_attn: a SoftmaxKernel (default ``softmax_kernel("auto")``) or a LinearKernel.
        decay: linear only, per-head log decay ``[Hq]`` (<= 0); None means no decay.
        cu_seqlens: global document offsets ``[0, ..., S]`` (1-D int tensor, CPU or q's device), or None.
        window_size: softmax only, left window (causal only), or None.
        g: linear only, per-token log gate ``[B, S/P, H]`` (<= 0) sharded like q, or None.

    Returns ``out [B, S/P, Hq, Dv]`` in the same layout. Every check runs before any collective.
    """
    where = "ulysses_attention"
    if local_attn is None:
        from dist_attn.kernels.flash_attn import softmax_kernel
        local_attn = softmax_kernel("auto")
    linear = isinstance(local_attn, LinearKernel)
    if not linear and not isinstance(local_attn, SoftmaxKernel):
        fail(where, "local_attn as a dist_attn.kernels.interface.SoftmaxKernel or LinearKernel", type(local_attn).__name__,
             "pass dist_attn.kernels.flash_attn.softmax_kernel(...) or dist_attn.kernels.lightning_attn.linear_kernel(...)")
    p = check_group(where, group)
    check_layout(layout, f"{where}: layout")
    if not isinstance(causal, bool):
        fail(where, "causal to be a bool", repr(causal), "pass causal=True or causal=False")
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real)
                                      or not softmax_scale > 0):
        fail(where, "softmax_scale to be a positive number or None", repr(softmax_scale),
             "leave it None for 1/sqrt(head_dim)")
    b, sl, hq, hkv = check_qkv(where, q, k, v, same_v_dim=not linear)
    check_seq_len(sl * p, p, layout, f"{where}: global sequence (local {sl} x P={p})")
    if linear:
        if hkv != hq:
            fail(where, "as many key/value heads as query heads for linear attention", f"Hq={hq}, Hkv={hkv}",
                 "project k and v to Hq heads")
        if not causal:
            fail(where, "causal=True with a LinearKernel (linear attention is causal)", "causal=False",
                 "pass causal=True, or a SoftmaxKernel for bidirectional attention")
        if decay is not None:
            _check_decay(where, decay, hq)
        if window_size is not None:
            fail(where, "window_size=None with a LinearKernel", repr(window_size),
                 "use decay/g to forget, or a SoftmaxKernel for a sliding window")
        if g is not None:
            _check_gate(where, g, b, sl, hq, q.device)
    elif decay is not None:
        fail(where, "decay=None with a SoftmaxKernel", "a decay tensor", "pass a LinearKernel to use decay")
    elif g is not None:
        fail(where, "g=None with a SoftmaxKernel", "a gate tensor", "pass a LinearKernel to use a gate")
    check_documents(where, cu_seqlens, window_size, causal, sl * p, q.device)
    rep = check_head_split(where, hq, hkv, p)
    if (cu_seqlens is not None and cu_seqlens.device.type == "cpu") or window_size is not None:
        check_same_on_ranks(where, None if cu_seqlens is None else tuple(cu_seqlens.tolist()), window_size,
                            group)  # debug-mode cross-rank check (free otherwise)

    if rep > 1:  # [B, Sl, Hkv, D] -> [B, Sl, P, D]; autograd sums the replicas' gradients
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    order = global_order(sl * p, p, layout, q.device) if p > 1 else None
    g_h = None
    if g is not None and g.dtype == q.dtype:  # the gate rides in the same all-to-all as a D=1 tensor
        q_h, k_h, v_h, g_h = seq_to_head((q, k, v, g.unsqueeze(-1)), group, order)
    else:
        q_h, k_h, v_h = seq_to_head((q, k, v), group, order)  # [B, S, H/P, D] in global token order
        if g is not None:
            (g_h,) = seq_to_head((g.unsqueeze(-1),), group, order)
    if linear:
        r, hl = dist.get_rank(group), hq // p
        dec = None if decay is None else decay.detach()[r * hl:(r + 1) * hl]
        extra = {key: val for key, val in (("g", None if g_h is None else g_h.squeeze(-1)),
                                           ("cu_seqlens", cu_seqlens)) if val is not None}
        out_h, _ = local_attn(q_h, k_h, v_h, decay=dec, scale=softmax_scale, **extra)
    else:
        out_h, _ = local_attn(q_h, k_h, v_h, causal=causal, softmax_scale=softmax_scale, cu_seqlens=cu_seqlens,
                              window_size=window_size)
    (out,) = head_to_seq((out_h,), group, order)  # [B, S/P, Hq, Dv]
    return out
