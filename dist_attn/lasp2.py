"""LASP-2: sequence-parallel causal linear attention with one all-gather of memory states.

Shardings (scaling-book notation; P = CP size, c = chunks per rank, L = S/(c·P) tokens per chunk)::

    q, k  [B, S_cp, H, Dk]      v, out  [B, S_cp, H, Dv]      (S_cp = S/P = c·L local tokens)
    M     [c, B, H, Dk, Dv]     AllGather_cp(M) -> [P, c, B, H, Dk, Dv]   (fp32; fp64 for fp64 inputs)

Layouts: ``contiguous`` cuts the sequence into n = P chunks (c = 1, rank r holds chunk r);
``zigzag`` into n = 2P chunks (c = 2, rank r holds chunks r and 2P-1-r, in that local order).

Math, per head with lambda = exp(g) (g = ``decay[h]`` <= 0; ``decay=None`` means lambda = 1).
Causal linear attention is the recurrence S_t = lambda S_{t-1} + k_t^T v_t, o_t = scale · q_t S_t.
Unrolled over chunk c entering with state S_in(c), token i = 0..L-1 of the chunk:

    o_i = scale · [ sum_{j<=i, same chunk} lambda^(i-j) (q_i . k_j) v_j ]   (intra: local kernel)
        + scale · lambda^(i+1) q_i S_in(c)                                  (inter)
    M_c = sum_t lambda^(L-1-t) k_t^T v_t                       (chunk memory state, Dk x Dv)
    S_in(c) = sum_{j<c} lambda^(L·(c-1-j)) M_j   = W[c, j] M_j  (decay-weighted prefix)

Forward: M_c of the local chunks (one einsum), one async all-gather of the c states, the intra part
from the local kernel (both zigzag chunks batched along the batch dim) while the gather is in
flight, then the prefix combine (the local rows of the [n, n, H] weights W) and the inter part (one
einsum). The inter part is added here rather than through the kernel's ``initial_state`` so that the
kernel need not wait for the all-gather (as in the LASP-2 paper); the kernel runs with no state in.

Backward (o = intra + inter, M and S_in as above):

    dS_in(c) = scale · sum_i lambda^(i+1) q_i^T do_i        dq_i += scale · lambda^(i+1) do_i S_in(c)^T
    dM_j     = sum_{c>j} lambda^(L·(c-1-j)) dS_in(c)  = sum_c W[c, j] dS_in(c)   (suffix combine)
    dk_t    += lambda^(L-1-t) v_t dM^T                      dv_t += lambda^(L-1-t) k_t dM

one async all-gather of the c incoming-state gradients, overlapped with the local kernel's backward
of the intra part. Everything runs in one autograd.Function with explicit forward/backward so both
all-gathers overlap with the expensive local kernel.

Cost per rank per layer: forward sends (P-1)·c·B·H·Dk·Dv·4 bytes (one all-gather; ·8 for fp64 inputs),
backward the same; independent of S. Extra FLOPs over the local kernel: 2·c·L·Dk·Dv per head and batch for M, the same
for the inter part, and 2·n·c·Dk·Dv for the combine.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from dist_attn import comm
from dist_attn.checks import check_group, check_qkv, fail
from dist_attn.layout import check_layout, check_seq_len, rank_chunks
from dist_attn.kernels.interface import LinearKernel, SoftmaxKernel, linear_kernel_from_autograd

_WHERE = "lasp2_attention"


def _to_chunks(x: torch.Tensor, c: int) -> torch.Tensor:
    """[B, c·L, H, D] -> [c·B, L, H, D], chunk-major, so the local chunks run as one kernel batch."""
    if c == 1:
        return x.contiguous()
    b, s, h, d = x.shape
    return x.reshape(b, c, s // c, h, d).transpose(0, 1).reshape(c * b, s // c, h, d)


def _from_chunks(x: torch.Tensor, c: int) -> torch.Tensor:
    """Inverse of :func:`_to_chunks`: [c·B, L, H, D] -> [B, c·L, H, D]."""
    if c == 1:
        return x
    cb, cl, h, d = x.shape
    return x.reshape(c, cb // c, cl, h, d).transpose(0, 1).reshape(cb // c, c * cl, h, d)


def _log_decay(decay, h: int, acc: torch.dtype, device) -> torch.Tensor:
    return torch.zeros(h, dtype=acc, device=device) if decay is None else decay.to(acc)


def _token_powers(g: torch.Tensor, cl: int):
    """lambda^(i+1) (query side, [L, H]) and lambda^(L-1-i) (key side, [L, H]) for a chunk of L = cl."""
    i = torch.arange(cl, dtype=g.dtype, device=g.device)[:, None]
    return torch.exp(g * (i + 1)), torch.exp(g * (cl - 1 - i))


def _combine_weights(g: torch.Tensor, cl: int, dst: list[int], src: list[int]) -> torch.Tensor:
    """W[a, b, h] = lambda_h^(L·(dst[a]-1-src[b])) if src[b] < dst[a] else 0, shape [len(dst), len(src), H]."""
    d = torch.tensor(dst, dtype=g.dtype, device=g.device)[:, None] - \
        torch.tensor(src, dtype=g.dtype, device=g.device)[None, :] - 1  # (dst, src)
    w = torch.exp(g * cl * d.clamp(min=0)[..., None])  # exponent <= 0, never overflows
    return torch.where((d >= 0)[..., None], w, torch.zeros((), dtype=g.dtype, device=g.device))


def _gather_async(x: torch.Tensor, group, p: int):
    """Start AllGather_cp(x [c, ...]) -> [P, c, ...]; returns (buffer, handle or None)."""
    if p == 1:  # nothing to exchange
        return x.unsqueeze(0), None
    return comm.all_gather(x, group, async_op=True)


def _finish_gather(buf: torch.Tensor, work) -> torch.Tensor:
    if work is not None:
        work.wait()
    return buf.flatten(0, 1)  # (P·c, B, H, Dk, Dv), slot r·c+i holds rank r's i-th chunk


def _chunk_ids(p: int, layout: str):
    """Global chunk index of every gathered slot r·c + i, in rank order."""
    return [cid for r in range(p) for cid in rank_chunks(r, p, layout)]


def _geometry(q, decay, group, layout, acc):
    """(P, this rank's global chunk ids, chunk length L, log-decay g [H], lambda^(i+1), lambda^(L-1-i))."""
    p = dist.get_world_size(group)
    local_ids = list(rank_chunks(dist.get_rank(group), p, layout))
    cl = q.shape[1] // len(local_ids)
    g = _log_decay(decay, q.shape[2], acc, q.device)
    return (p, local_ids, cl, g) + _token_powers(g, cl)


def _lasp2_forward(q, k, v, decay, group, layout, scale, kernel):
    """Returns out [B, S/P, H, Dv] and the local incoming states S_in [c·B, H, Dk, Dv] (for backward)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    p, local_ids, cl, g, q_pow, k_pow = _geometry(q, decay, group, layout, acc)
    c, b = len(local_ids), q.shape[0]
    qc, kc, vc = (_to_chunks(t, c) for t in (q, k, v))  # (c·B, L, H, D)

    # M_c = sum_t lambda^(L-1-t) k_t^T v_t; send it before the expensive intra-chunk kernel
    m = torch.einsum("blhk,blhv->bhkv", kc.to(acc) * k_pow[..., None], vc.to(acc))  # (c·B, H, Dk, Dv)
    buf, work = _gather_async(m.view(c, b, *m.shape[1:]), group, p)
    out_intra, _ = kernel.fwd(qc, kc, vc, decay=decay, initial_state=None, scale=scale)
    m_all = _finish_gather(buf, work)

    # S_in(c) = sum_j W[c, j] M_j over every gathered chunk, then o_i += scale lambda^(i+1) q_i S_in
    w = _combine_weights(g, cl, local_ids, _chunk_ids(p, layout))  # (c, P·c, H)
    s_in = torch.einsum("csh,sbhkv->cbhkv", w, m_all).flatten(0, 1)  # (c·B, H, Dk, Dv)
    out = out_intra.to(acc) + scale * torch.einsum("blhk,bhkv->blhv", qc.to(acc) * q_pow[..., None], s_in)
    return _from_chunks(out.to(v.dtype), c), s_in


def _lasp2_backward(dout, q, k, v, decay, s_in, group, layout, scale, kernel):
    """Returns dq, dk, dv (local shards, dtypes of q, k, v)."""
    acc = s_in.dtype
    p, local_ids, cl, g, q_pow, k_pow = _geometry(q, decay, group, layout, acc)
    c, b = len(local_ids), q.shape[0]
    qc, kc, vc, doc = (_to_chunks(t, c) for t in (q, k, v, dout))

    # dS_in(c) = scale sum_i lambda^(i+1) q_i^T do_i; send it before the kernel's backward
    q_dec = qc.to(acc) * q_pow[..., None]
    ds_in = scale * torch.einsum("blhk,blhv->bhkv", q_dec, doc.to(acc))  # (c·B, H, Dk, Dv)
    buf, work = _gather_async(ds_in.view(c, b, *ds_in.shape[1:]), group, p)
    # the kernel's final state was discarded in forward (M is computed above): no gradient reaches it
    dq, dk, dv, _ = kernel.bwd(doc, None, qc, kc, vc, decay=decay, initial_state=None, scale=scale)
    ds_all = _finish_gather(buf, work)

    # inter part: dq_i += scale lambda^(i+1) do_i S_in^T
    dq = dq.to(acc) + scale * q_pow[..., None] * torch.einsum("blhv,bhkv->blhk", doc.to(acc), s_in)
    # suffix combine dM_j = sum_c W[c, j] dS_in(c), then through M_j = sum_t lambda^(L-1-t) k_t^T v_t
    wt = _combine_weights(g, cl, _chunk_ids(p, layout), local_ids)  # (P·c, c, H)
    dm = torch.einsum("sch,sbhkv->cbhkv", wt, ds_all).flatten(0, 1)  # (c·B, H, Dk, Dv)
    dk = dk.to(acc) + k_pow[..., None] * torch.einsum("blhv,bhkv->blhk", vc.to(acc), dm)
    dv = dv.to(acc) + k_pow[..., None] * torch.einsum("blhk,bhkv->blhv", kc.to(acc), dm)
    return tuple(_from_chunks(t.to(x.dtype), c) for t, x in ((dq, q), (dk, k), (dv, v)))


class _LASP2Fn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, decay, group, layout, scale, kernel):
        out, s_in = _lasp2_forward(q, k, v, decay, group, layout, scale, kernel)
        ctx.save_for_backward(q, k, v, decay, s_in)
        ctx.args = (group, layout, scale, kernel)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, decay, s_in = ctx.saved_tensors
        dq, dk, dv = _lasp2_backward(dout.contiguous(), q, k, v, decay, s_in, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def _validate(q, k, v, group, decay, layout, scale, local_linear) -> LinearKernel:
    """Every check is local, so a bad input raises ValueError on every rank before any collective."""
    p = check_group(_WHERE, group)
    if isinstance(local_linear, SoftmaxKernel) or not (local_linear is None or callable(local_linear)):
        fail(_WHERE, "local_linear to be a LinearKernel or a callable (q,k,v,*,decay,initial_state,scale)"
             "->(out,state)", type(local_linear).__name__,
             "pass dist_attn.kernels.lightning_attn.linear_kernel(backend) or leave local_linear=None")
    _, s_loc, hq, hkv = check_qkv(_WHERE, q, k, v, same_v_dim=False)
    if hq != hkv:
        fail(_WHERE, "q, k, v with the same number of heads (linear attention has no GQA)",
             f"q {hq}, k/v {hkv}", "repeat the k/v heads to match q before calling")
    if decay is not None:
        if not isinstance(decay, torch.Tensor) or decay.shape != (hq,) or not decay.is_floating_point():
            fail(_WHERE, f"decay a floating tensor of shape [H] = [{hq}] or None",
                 f"{type(decay).__name__} {tuple(getattr(decay, 'shape', ()))}",
                 "pass one log-decay per head, e.g. -torch.rand(H)")
        if decay.device != q.device:
            fail(_WHERE, f"decay on {q.device} like q", str(decay.device), "move decay to the device of q")
        if not bool((decay <= 0).all()):  # also rejects NaN; one host sync on CUDA
            fail(_WHERE, "log-decay values <= 0 (lambda = exp(decay) <= 1)",
                 f"max {decay.max().item():.4g}", "pass log(lambda), e.g. -F.softplus(param)")
    if scale is not None and not isinstance(scale, (int, float)):
        fail(_WHERE, "scale a Python number or None", type(scale).__name__, "pass float(scale)")
    check_layout(layout, f"{_WHERE}: layout")
    check_seq_len(p * s_loc, p, layout, f"{_WHERE}: global sequence P·S_local = {p}·{s_loc}")
    if local_linear is None:
        from dist_attn.kernels.lightning_attn import linear_kernel
        return linear_kernel("auto")
    if isinstance(local_linear, LinearKernel):
        return local_linear
    return linear_kernel_from_autograd(getattr(local_linear, "__name__", "user_linear"), local_linear)


def lasp2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group,
                    decay: Optional[torch.Tensor] = None, layout: str = "zigzag", scale: Optional[float] = None,
                    local_linear: Optional[LinearKernel | Callable] = None) -> torch.Tensor:
    """Causal linear attention over a CP group with LASP-2 (see the module docstring for the math).

    q, k ``[B, S/P, H, Dk]``, v ``[B, S/P, H, Dv]`` sharded in ``layout`` over ``group`` (global
    ``[B, S, H, D]``); ``decay`` a per-head log-decay ``[H]`` (<= 0, not differentiated) or None;
    ``scale`` defaults to Dk^-0.5; ``local_linear`` a :class:`~dist_attn.kernels.interface.LinearKernel`
    (default ``linear_kernel("auto")``) or a differentiable ``(q,k,v,*,decay,initial_state,scale) ->
    (out, state)``. Returns out ``[B, S/P, H, Dv]`` in v's dtype, differentiable w.r.t. q, k, v.
    """
    kernel = _validate(q, k, v, group, decay, layout, scale, local_linear)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _LASP2Fn.apply(q, k, v, decay, group, layout, scale, kernel)
