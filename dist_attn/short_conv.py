"""Short causal depthwise convolution under context parallelism (the conv of Gated DeltaNet / Mamba).

Shapes (P = CP size, c = chunks per rank, L = S/(c·P) tokens per chunk, K = kernel size, C channels)::

    x, y  [B, S/P, C]      weight  [C, K]      bias  [C] or None      halo  [c, B, K-1, C]

Math, per channel, token at global position p with document start d(p) (0 without documents)::

    y_p = act( bias + sum_{j=0}^{K-1} w[j] · x_{p-K+1+j} · [p-K+1+j >= d(p)] )

(``F.conv1d`` with K-1 zeros of left padding, restarted at every document start; w[K-1] multiplies
the current token.) A chunk needs the last K-1 tokens of the chunk before it in global order: the halo.
Chunk j's halo is chunk j-1's tail (zeros for chunk 0):

* contiguous: rank r receives from rank r-1 and sends its tail to rank r+1;
* zigzag (rank r holds chunks r and 2P-1-r): chunk r needs chunk r-1 (rank r-1's first chunk), chunk
  2P-1-r needs chunk 2P-2-r = 2P-1-(r+1) (rank r+1's second chunk); rank P-1's second chunk P needs its
  own first chunk P-1 (no message). So rank r sends its first chunk's tail to r+1 (r < P-1) and its
  second chunk's tail to r-1 (r > 0).

Tokens of the halo that belong to an earlier document are masked by the same [.. >= d(p)] rule, so no
output sees across a document boundary. Backward sends each halo's gradient back to the owner of the
tail, which adds it to its dx (the reverse messages). Needs L >= K-1.

Cost per rank: forward sends (number of tails needed elsewhere) · B·(K-1)·C elements (at most 2 in zigzag,
1 in contiguous), P2P in one ``batch_isend_irecv``; backward the same amount back.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_attn import comm
from dist_attn.checks import check_group, fail
from dist_attn.documents import check_documents
from dist_attn.layout import check_layout, check_seq_len, num_chunks, rank_chunks

_WHERE = "short_conv"
ACTIVATIONS = (None, "silu")


def _owner(chunk: int, p: int, layout: str) -> tuple[int, int]:
    """(rank, local index) holding global ``chunk``."""
    for r in range(p):
        ids = rank_chunks(r, p, layout)
        if chunk in ids:
            return r, ids.index(chunk)
    raise AssertionError(chunk)


def _halo_plan(rank: int, p: int, layout: str):
    """sends: [(local idx of the tail, dst rank, tag)]; recvs: [(local idx needing it, src rank, tag)];
    local: [(local idx needing it, local idx of the tail)]. Tag = the receiving chunk's global id."""
    sends, recvs, local = [], [], []
    for r in range(p):
        for i, j in enumerate(rank_chunks(r, p, layout)):
            if j == 0:
                continue
            src_rank, src_idx = _owner(j - 1, p, layout)
            if r == rank and src_rank == rank:
                local.append((i, src_idx))
            elif r == rank:
                recvs.append((i, src_rank, j))
            elif src_rank == rank:
                sends.append((src_idx, r, j))
    return sends, recvs, local


def _exchange(send_list, recv_shapes, group):
    """Post every send and receive in one batch; returns the received tensors (in recv order)."""
    ops, outs = [], []
    for t, peer, tag in send_list:
        t = t.contiguous()
        ops.append(dist.P2POp(dist.isend, t, _global(group, peer), group, tag))
        comm._record("p2p", comm.nbytes(t), 0)
    for (shape, dtype, device), peer, tag in recv_shapes:
        out = torch.empty(shape, dtype=dtype, device=device)
        ops.append(dist.P2POp(dist.irecv, out, _global(group, peer), group, tag))
        comm._record("p2p", 0, comm.nbytes(out))
        outs.append(out)
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return outs


def _global(group, r: int) -> int:
    return dist.get_global_rank(group, r) if group is not None else r


class _HaloFn(torch.autograd.Function):
    """x [B, c·L, C] -> halos [c, B, K-1, C] (the K-1 tokens before each local chunk, zeros for chunk 0)."""

    @staticmethod
    def forward(ctx, x, group, layout, halo):
        p, rank = dist.get_world_size(group), dist.get_rank(group)
        c = len(rank_chunks(rank, p, layout))
        b, s, ch = x.shape
        cl = s // c
        tails = [x[:, (i + 1) * cl - halo:(i + 1) * cl] for i in range(c)]
        sends, recvs, local = _halo_plan(rank, p, layout)
        got = _exchange([(tails[i], dst, tag) for i, dst, tag in sends],
                        [(((b, halo, ch), x.dtype, x.device), src, tag) for _, src, tag in recvs], group)
        out = x.new_zeros(c, b, halo, ch)
        for (i, _, _), t in zip(recvs, got):
            out[i] = t
        for i, src in local:
            out[i] = tails[src]
        ctx.args = (group, layout, halo, c, cl, (sends, recvs, local))
        return out

    @staticmethod
    def backward(ctx, dhalo):
        group, layout, halo, c, cl, (sends, recvs, local) = ctx.args
        _, b, _, ch = dhalo.shape
        dtails = torch.zeros(c, b, halo, ch, dtype=dhalo.dtype, device=dhalo.device)
        # reverse messages: each received halo's gradient goes back to the owner of the tail
        got = _exchange([(dhalo[i], src, tag) for i, src, tag in recvs],
                        [(((b, halo, ch), dhalo.dtype, dhalo.device), dst, tag) for _, dst, tag in sends], group)
        for (i, _, _), t in zip(sends, got):
            dtails[i] += t
        for i, src in local:
            dtails[src] += dhalo[i]
        dx = F.pad(dtails, (0, 0, cl - halo, 0))  # (c, B, L, C): gradient on each chunk's last K-1 tokens
        return dx.transpose(0, 1).reshape(b, c * cl, ch), None, None, None


def _visible(k: int, positions: torch.Tensor, cu_seqlens, device) -> torch.Tensor:
    """[K, N] float: tap j of the token at global position p reads p-K+1+j, visible iff >= d(p)."""
    src = positions[None, :] - (k - 1) + torch.arange(k, device=device)[:, None]  # (K, N)
    if cu_seqlens is None:
        start = torch.zeros_like(positions)
    else:
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        start = cu[(torch.searchsorted(cu, positions, right=True) - 1).clamp(min=0)]
    return src >= start[None, :]


def _validate(x, weight, bias, group, layout, cu_seqlens, activation):
    p = check_group(_WHERE, group)
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
        fail(_WHERE, "x a floating tensor [B, S/P, C]", f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}",
             "pass the projected q/k/v activations as [batch, seq/cp, channels]")
    ch = x.shape[-1]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] != ch or weight.shape[1] < 1:
        fail(_WHERE, f"weight [C, K] = [{ch}, K] (one depthwise filter per channel)",
             f"{tuple(getattr(weight, 'shape', ()))}", "pass conv.weight.squeeze(1) of a depthwise Conv1d")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (ch,)):
        fail(_WHERE, f"bias None or [C] = [{ch}]", f"{tuple(getattr(bias, 'shape', ()))}", "pass one bias per channel")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.device != x.device or not t.is_floating_point()):
            fail(_WHERE, f"{name} a floating tensor on {x.device}", f"{t.dtype} on {t.device}", f"move/cast {name}")
    if activation not in ACTIVATIONS:
        fail(_WHERE, f"activation one of {ACTIVATIONS}", repr(activation), "pass 'silu' or None")
    check_layout(layout, f"{_WHERE}: layout")
    check_seq_len(p * x.shape[1], p, layout, f"{_WHERE}: global sequence P·S_local = {p}·{x.shape[1]}")
    cl = x.shape[1] // len(rank_chunks(0, p, layout))
    if p * len(rank_chunks(0, p, layout)) > 1 and cl < weight.shape[1] - 1:
        fail(_WHERE, f"chunks of at least K-1 = {weight.shape[1] - 1} tokens (the halo comes from one chunk)",
             f"{cl} tokens per chunk", "use fewer ranks or a longer sequence")
    check_documents(_WHERE, cu_seqlens, None, True, p * x.shape[1], x.device)
    return p


def short_conv(x: torch.Tensor, weight: torch.Tensor, *, group, layout: str = "zigzag",
               cu_seqlens: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
               activation: Optional[str] = "silu") -> torch.Tensor:
    """Causal depthwise conv of ``x [B, S/P, C]`` with ``weight [C, K]`` over a CP group (module docstring).

    ``cu_seqlens`` GLOBAL document offsets (same on every rank; CPU or x's device, no host sync);
    ``activation`` "silu" or None. Returns ``[B, S/P, C]`` in x's dtype, differentiable in x, weight, bias.
    """
    p = _validate(x, weight, bias, group, layout, cu_seqlens, activation)
    rank = dist.get_rank(group)
    k = weight.shape[1]
    ids = rank_chunks(rank, p, layout)
    c, (b, s_loc, ch) = len(ids), x.shape
    cl = s_loc // c
    halo = k - 1
    if halo > 0 and num_chunks(p, layout) > 1:
        halos = _HaloFn.apply(x, group, layout, halo)  # (c, B, K-1, C)
    else:
        halos = x.new_zeros(c, b, halo, ch)
    xc = x.reshape(b, c, cl, ch).transpose(0, 1)  # (c, B, L, C)
    ext = torch.cat([halos, xc], 2)  # (c, B, L+K-1, C)
    pos = torch.cat([torch.arange(j * cl, (j + 1) * cl, device=x.device) for j in ids])  # (c·L,)
    acc = torch.promote_types(x.dtype, torch.float32)  # bf16 inputs accumulate in fp32
    vis = _visible(k, pos, cu_seqlens, x.device).view(k, c, 1, cl, 1).to(acc)
    ext, w = ext.to(acc), weight.to(acc)
    y = sum(w[:, j] * ext[:, :, j:j + cl] * vis[j] for j in range(k))  # (c, B, L, C)
    if bias is not None:
        y = y + bias.to(acc)
    if activation == "silu":
        y = F.silu(y)
    return y.transpose(0, 1).reshape(b, s_loc, ch).to(x.dtype)
