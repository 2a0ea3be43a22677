"""Tiled softmax attention in plain torch: the CPU backend of :mod:`dist_attn.kernels.flash_attn`.

Same contract as the Triton kernel (see :mod:`dist_attn.kernels.interface`), without autograd inside::

    fwd(q, k, v, *, causal, softmax_scale, q_offset, k_offset, cu_seqlens=None, window_size=None)
        -> out [B,Sq,Hq,D], lse [B,Hq,Sq]
    bwd(dout, q, k, v, out, lse, *, ..., dlse=None, cu_seqlens=None, window_size=None) -> dq, dk, dv

Shapes inside: queries are viewed as ``[B, Hkv, G, Sq, D]`` (G = Hq / Hkv query heads per KV head)
and keys/values as ``[B, Hkv, 1, Sk, D]``, so grouped-query attention is a broadcast matmul and
dK/dV are sums over the G axis. The work is cut into ``block x block`` tiles (all heads at once),
as FlashAttention-2 does on a GPU: the largest temporary is one ``[B, Hq, block, block]`` tile,
small enough to stay in cache, so the element-wise softmax passes are not memory bound, and memory
is O(S * D + tile), not O(Sq * Sk). Element-wise updates are in place to avoid allocations.

Causal skipping: query ``q_offset + i`` sees key ``k_offset + j`` iff ``k_offset + j <= q_offset + i``;
a tile with ``k_offset + j0 > q_offset + i1 - 1`` is invisible and skipped, a tile with
``k_offset + j1 - 1 <= q_offset + i0`` is fully visible and needs no mask.

Documents and windows (``cu_seqlens``, ``window_size``; :mod:`.masks`): every query row i sees the
local keys [lo_i, hi_i). A row tile [i0, i1) visits only the key tiles meeting [lo_{i0}, hi_{i1-1})
(the others are skipped), and a tile inside [lo_{i1-1}, hi_{i0}) runs without a mask. The intervals
are computed where ``cu_seqlens`` lives: on the CPU the skipping is decided on the host for free; for
a CUDA ``cu_seqlens`` (this backend on a GPU: fp64 tests) every tile runs with a device mask instead,
so nothing syncs with the host.

Arithmetic runs in ``promote(dtype, float32)`` (fp32 for fp16/bf16, fp64 for fp64); ``lse`` has
that dtype too (the fp64 strategy tests rely on an fp64 lse). Queries are pre-multiplied by the
softmax scale once, so s = (scale q) k^T.

This file also holds :func:`check_inputs`, the shape/dtype validation shared with the Triton host
wrappers (kept here because it must not import triton).
"""
from __future__ import annotations

import torch

from dist_attn.kernels.flash_attn.masks import check_mask_args, has_mask, row_intervals

TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_TILE_ELEMS = 1 << 20  # cap on B * Hq * block * block for one score tile (4 MiB in fp32)


def check_inputs(op: str, q, k, v, dtypes=TORCH_DTYPES, max_head_dim: int | None = None) -> None:
    """Raise ``ValueError`` (expected / got / fix) unless q ``[B,Sq,Hq,D]``, k and v ``[B,Sk,Hkv,D]``
    form a valid attention call with Hq a multiple of Hkv, 1 <= D (<= ``max_head_dim``), one dtype from
    ``dtypes`` and one device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{op}: {name} expected a 4-D tensor [B, S, H, D], got {got}. "
                             f"Fix: reshape to [batch, seq, heads, head_dim].")
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v expected the same shape [B, Sk, Hkv, D], got k "
                         f"{tuple(k.shape)} and v {tuple(v.shape)}. Fix: project v to k's head count "
                         f"and head dim.")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{op}: q and k expected the same batch and head dim, got q {tuple(q.shape)} "
                         f"and k {tuple(k.shape)}. Fix: check the [B, S, H, D] layout of both.")
    hq, hkv = q.shape[2], k.shape[2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"{op}: query heads expected to be a multiple of KV heads, got Hq={hq}, "
                         f"Hkv={hkv}. Fix: choose Hkv dividing Hq (GQA/MQA).")
    if q.shape[3] < 1 or (max_head_dim is not None and q.shape[3] > max_head_dim):
        raise ValueError(f"{op}: head dim expected between 1 and {max_head_dim}, got {q.shape[3]}. "
                         f"Fix: use backend='torch' or split the head dim.")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in dtypes:
        raise ValueError(f"{op}: q, k, v expected one dtype from {[str(d) for d in dtypes]}, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}. Fix: cast all three, e.g. q.to(torch.bfloat16).")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k, v expected on one device, got {q.device}, {k.device}, "
                         f"{v.device}. Fix: move them with .to(q.device).")


def _block_size(b: int, hq: int) -> int:
    """Tile edge: the largest power of two in [64, 512] whose ``[B, Hq, block, block]`` score tile
    stays under :data:`_MAX_TILE_ELEMS` (bigger tiles mean fewer Python-level ops; smaller ones stay
    in cache)."""
    block = 512
    while block > 64 and b * hq * block * block > _MAX_TILE_ELEMS:
        block //= 2
    return block


def _prepare(q, k, v, softmax_scale):
    """Scaled q -> [B, Hkv, G, Sq, D]; k, v -> [B, Hkv, 1, Sk, D]; all in the accumulation dtype."""
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    qh = (q.to(acc) * scale).reshape(b, sq, hkv, hq // hkv, d).permute(0, 2, 3, 1, 4)
    kh = k.to(acc).permute(0, 2, 1, 3).unsqueeze(2)
    vh = v.to(acc).permute(0, 2, 1, 3).unsqueeze(2)
    return qh, kh, vh, scale, acc


def _tiles(sq: int, sk: int, block: int, causal: bool, q_offset: int, k_offset: int):
    """Yield ``(i0, i1, j0, j1, vis)`` for every tile with a visible pair; ``vis`` is the
    ``[i1-i0, j1-j0]`` bool visibility mask, or None when every pair of the tile is visible."""
    for i0 in range(0, sq, block):
        i1 = min(i0 + block, sq)
        for j0 in range(0, sk, block):
            j1 = min(j0 + block, sk)
            if not causal or k_offset + j1 - 1 <= q_offset + i0:
                yield i0, i1, j0, j1, None
            elif k_offset + j0 <= q_offset + i1 - 1:
                qpos = torch.arange(q_offset + i0, q_offset + i1)
                kpos = torch.arange(k_offset + j0, k_offset + j1)
                yield i0, i1, j0, j1, kpos[None, :] <= qpos[:, None]
            else:
                break  # this and every later key block is invisible to these rows


def _tiles_masked(sq: int, sk: int, block: int, lo: torch.Tensor, hi: torch.Tensor):
    """As :func:`_tiles` for per-row key intervals ``[lo_i, hi_i)`` (int32 ``[Sq]``). On the CPU only
    the key tiles meeting [lo(i0), hi(i1-1)) are visited; on another device every tile, masked."""
    host = lo.device.type == "cpu"
    lo_l, hi_l = (lo.tolist(), hi.tolist()) if host else (None, None)
    kidx = torch.arange(sk, device=lo.device)
    for i0 in range(0, sq, block):
        i1 = min(i0 + block, sq)
        j_start, j_end = ((lo_l[i0] // block) * block, hi_l[i1 - 1]) if host else (0, sk)
        for j0 in range(j_start, j_end, block):
            j1 = min(j0 + block, sk)
            if host and lo_l[i1 - 1] <= j0 and j1 <= hi_l[i0]:
                yield i0, i1, j0, j1, None
            else:
                k = kidx[j0:j1]
                yield i0, i1, j0, j1, (k[None, :] >= lo[i0:i1, None]) & (k[None, :] < hi[i0:i1, None])


def _tile_plan(q, sq, sk, block, causal, q_offset, k_offset, cu_seqlens, window_size):
    if not has_mask(cu_seqlens, window_size):
        return _tiles(sq, sk, block, causal, q_offset, k_offset)
    # on cu_seqlens' device (the CPU for a window alone: no device data is needed then)
    lo, hi = row_intervals(sq, sk, q_offset, k_offset, causal, cu_seqlens, window_size)
    return _tiles_masked(sq, sk, block, lo, hi)


def fwd(q, k, v, *, causal=False, softmax_scale=None, q_offset=0, k_offset=0, cu_seqlens=None, window_size=None):
    """Tiled online-softmax forward. Returns ``out [B,Sq,Hq,D]`` (q.dtype) and ``lse [B,Hq,Sq]``.

    Per tile with scores s, the running max m, sum l and unnormalised output o of its rows are
    updated as m' = max(m, rowmax s), l' = l e^(m-m') + rowsum e^(s-m'), o' = o e^(m-m') + e^(s-m') v.
    At the end out = o / l and lse = m + log l; a row with l = 0 saw no key and gets out 0,
    lse -inf. While m' = -inf the exponent base is taken as 0, so nothing becomes NaN.
    """
    check_inputs("flash_attn(torch).fwd", q, k, v)
    check_mask_args("flash_attn(torch).fwd", q, k.shape[1], causal, q_offset, k_offset, cu_seqlens, window_size)
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    qh, kh, vh, _, acc = _prepare(q, k, v, softmax_scale)
    g = hq // hkv
    m = torch.full((b, hkv, g, sq), float("-inf"), dtype=acc, device=q.device)
    l = torch.zeros((b, hkv, g, sq), dtype=acc, device=q.device)
    o = torch.zeros((b, hkv, g, sq, d), dtype=acc, device=q.device)
    for i0, i1, j0, j1, vis in _tile_plan(q, sq, sk, _block_size(b, hq), causal, q_offset, k_offset,
                                          cu_seqlens, window_size):
        s = torch.matmul(qh[:, :, :, i0:i1], kh[:, :, :, j0:j1].transpose(-1, -2))  # (B,Hkv,G,bq,bk)
        if vis is not None:
            s.masked_fill_(~vis.to(q.device), float("-inf"))
        m_old = m[..., i0:i1]
        m_new = torch.maximum(m_old, s.amax(dim=-1))
        m_base = m_new.masked_fill(torch.isinf(m_new), 0.0)
        alpha = (m_old - m_base).exp_()  # 0 while the row had no key (-inf - 0)
        p = s.sub_(m_base.unsqueeze(-1)).exp_()  # in place: s becomes p
        l[..., i0:i1].mul_(alpha).add_(p.sum(dim=-1))
        o_t = o[..., i0:i1, :]
        o_t.mul_(alpha.unsqueeze(-1)).add_(torch.matmul(p, vh[:, :, :, j0:j1]))
        m[..., i0:i1] = m_new
    empty = l == 0
    out = o / l.masked_fill(empty, 1.0).unsqueeze(-1)
    lse = torch.where(empty, torch.full_like(l, float("-inf")), m + torch.log(l))
    out = out.permute(0, 3, 1, 2, 4).reshape(b, sq, hq, d).to(q.dtype)  # (B, Sq, Hq, D)
    return out, lse.reshape(b, hq, sq)


def bwd(dout, q, k, v, out, lse, *, causal=False, softmax_scale=None, q_offset=0, k_offset=0, dlse=None,
        cu_seqlens=None, window_size=None):
    """Functional tiled backward from the saved ``lse`` (no autograd). Returns ``dq, dk, dv``.

    With P = exp(s - lse) (lse may be the merged LSE of several key blocks, which makes P this
    block's share of the merged softmax) and delta = rowsum(dout * out) - dlse:
    dV = P^T dout, dP = dout V^T, dS = P (dP - delta), dQ = scale dS K, dK = scale dS^T Q
    (= dS^T (scale Q), the pre-scaled queries). dK and dV sum over the G query heads of a KV head.
    Rows with lse = -inf saw no key of any block: lse is taken as +inf there, so P = 0.
    """
    check_inputs("flash_attn(torch).bwd", q, k, v)
    check_mask_args("flash_attn(torch).bwd", q, k.shape[1], causal, q_offset, k_offset, cu_seqlens, window_size)
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    qh, kh, vh, scale, acc = _prepare(q, k, v, softmax_scale)
    doh = dout.to(acc).reshape(b, sq, hkv, g, d).permute(0, 2, 3, 1, 4)  # (B, Hkv, G, Sq, D)
    delta = (dout.to(acc) * out.to(acc)).sum(-1).permute(0, 2, 1)  # (B, Hq, Sq)
    if dlse is not None:
        delta = delta - dlse.to(acc)
    lse = lse.to(acc).masked_fill(torch.isneginf(lse), float("inf"))
    lse, delta = lse.reshape(b, hkv, g, sq, 1), delta.reshape(b, hkv, g, sq, 1)
    dq = torch.zeros_like(qh)
    dk = torch.zeros((b, hkv, sk, d), dtype=acc, device=q.device)
    dv = torch.zeros_like(dk)
    for i0, i1, j0, j1, vis in _tile_plan(q, sq, sk, _block_size(b, hq), causal, q_offset, k_offset,
                                          cu_seqlens, window_size):
        kb, vb = kh[:, :, :, j0:j1], vh[:, :, :, j0:j1]  # (B, Hkv, 1, bk, D)
        qb, dob = qh[:, :, :, i0:i1], doh[:, :, :, i0:i1]  # (B, Hkv, G, bq, D)
        p = torch.matmul(qb, kb.transpose(-1, -2)).sub_(lse[..., i0:i1, :]).exp_()  # (B,Hkv,G,bq,bk)
        if vis is not None:
            p.masked_fill_(~vis.to(q.device), 0.0)
        dv[:, :, j0:j1] += torch.matmul(p.transpose(-1, -2), dob).sum(2)
        ds = torch.matmul(dob, vb.transpose(-1, -2)).sub_(delta[..., i0:i1, :]).mul_(p)  # P (dP - delta)
        dq[:, :, :, i0:i1] += torch.matmul(ds, kb)
        dk[:, :, j0:j1] += torch.matmul(ds.transpose(-1, -2), qb).sum(2)
    dq = (dq * scale).permute(0, 3, 1, 2, 4).reshape(b, sq, hq, d).to(q.dtype)
    return dq, dk.transpose(1, 2).to(k.dtype), dv.transpose(1, 2).to(v.dtype)
