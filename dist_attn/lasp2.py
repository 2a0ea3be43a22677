"""LASP-2: sequence-parallel causal linear attention with one all-gather of chunk maps.

Shardings (scaling-book notation; P = CP size, c = chunks per rank, L = S/(c·P) tokens per chunk)::

    q, k  [B, S_cp, H, Dk]      v, out  [B, S_cp, H, Dv]      g  [B, S_cp, H]      (S_cp = S/P = c·L)
    M     [c, B, H, Dk, Dv]     AllGather_cp(M) -> [P, c, B, H, Dk, Dv]   (fp32; fp64 for fp64 inputs)
    with g: [A; M] [c, B, H, 1 + Dk·Dv] gathered instead (A travels with M)

Layouts: ``contiguous`` cuts the sequence into n = P chunks (c = 1, rank r holds chunk r);
``zigzag`` into n = 2P chunks (c = 2, rank r holds chunks r and 2P-1-r, in that local order).

Math. Per head, token t has log gate a_t = decay_h + g_t (<= 0) and the recurrence is
S_t = exp(a_t) S_{t-1} + k_t^T v_t, o_t = scale · q_t S_t; ``cu_seqlens`` (GLOBAL document offsets)
resets the state to 0 before every interior document start. Chunk m (tokens i = 0..L-1, cumulative
gate G_i = sum_{t<=i} a_t inside the chunk, f_i = [no document starts at chunk positions 0..i],
l_i = [no document starts at positions i+1..L-1]) maps its entering state to its leaving state by

    S_in(m+1) = A_m S_in(m) + M_m,    A_m = exp(G_{L-1}) f_{L-1}  (0 if a document starts in the chunk,
                                                                  its first token included),
                                      M_m = sum_j exp(G_{L-1} - G_j) l_j k_j^T v_j   (from a zero state)
    o_i = scale · [intra_i + exp(G_i) f_i q_i S_in(m)]      (intra: the local kernel, no state in)
    S_in(d) = sum_{j<d} W[d, j] M_j,   W[d, j] = prod_{j<m<d} A_m          (composition of the maps)

A document that starts exactly at a chunk's first token cuts that chunk's inter part (f = 0) and its
A, not the previous chunk's. Without g, A_m = exp(decay_h L)·[no start in chunk m] is known to every
rank (cu_seqlens is global), so only M travels; with g, A is a per-(batch, head) scalar and travels.
The local kernel sees the rank's chunks with LOCAL document offsets (each chunk's offsets clamped to
[0, L], zigzag chunks concatenated with a forced start between them; duplicates are empty documents).

Forward: A, M of the local chunks (einsums), one async all-gather, the intra part from the local kernel
while the gather is in flight, then W (n cumprods over the [n, B, H] A's), S_in and the inter part.

Backward (o = intra + inter), with D_d = dS_in(d) = scale · sum_i exp(G_i) f_i q_i^T do_i:

    dM_j = sum_{d>j} W[d, j] D_d   (= the total gradient of S_in(j+1))     one all-gather of the D's
    dq_i += scale · exp(G_i) f_i do_i S_in^T      dk_j += exp(G_{L-1} - G_j) l_j v_j dM^T      dv_j likewise
    dg_t  = dg_t(kernel, intra)
          + sum_{i>=t} q_i . dq_i(inter)          (inter exponent G_i contains a_t iff t <= i)
          + sum_{j<t}  k_j . dk_j(M)              (M exponent G_{L-1} - G_j contains a_t iff j < t)
          + A_m <S_in(m), dM_m>                   (dA_m = <S_in(m), dS_in(m+1)>, dA/da_t = A for t in m)

so the gate gradient needs no extra communication: every term is local to the chunk once dM is known.
Document starts make each term vanish where the gate multiplies a reset state (f, l, A = 0).

Cost per rank per layer: forward sends (P-1)·c·B·H·Dk·Dv·b bytes, (P-1)·c·B·H·(1 + Dk·Dv)·b with g
(b = 4, 8 for fp64 inputs); backward (P-1)·c·B·H·Dk·Dv·b; independent of S. Extra FLOPs over the
local kernel: 2·c·L·Dk·Dv per head and batch for M, the same for the inter part, 2·n·c·Dk·Dv for S_in.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from dist_attn import comm
from dist_attn.checks import check_group, check_qkv, fail
from dist_attn.documents import check_documents
from dist_attn.layout import check_layout, check_seq_len, rank_chunks
from dist_attn.kernels.interface import (LinearKernel, SoftmaxKernel, call_linear_bwd,
                                        linear_kernel_from_autograd)

_WHERE = "lasp2_attention"


def _to_chunks(x: torch.Tensor, c: int) -> torch.Tensor:
    """[B, c·L, ...] -> [c·B, L, ...], chunk-major, so the local chunks run as one kernel batch."""
    if c == 1:
        return x.contiguous()
    b, s = x.shape[:2]
    return x.reshape(b, c, s // c, *x.shape[2:]).transpose(0, 1).reshape(c * b, s // c, *x.shape[2:])


def _from_chunks(x: torch.Tensor, c: int) -> torch.Tensor:
    """Inverse of :func:`_to_chunks`: [c·B, L, ...] -> [B, c·L, ...]."""
    if c == 1:
        return x
    cb, cl = x.shape[:2]
    return x.reshape(c, cb // c, cl, *x.shape[2:]).transpose(0, 1).reshape(cb // c, c * cl, *x.shape[2:])


def _gather_async(x: torch.Tensor, group, p: int):
    """Start AllGather_cp(x [c, ...]) -> [P, c, ...]; returns (buffer, handle or None)."""
    if p == 1:  # nothing to exchange
        return x.unsqueeze(0), None
    return comm.all_gather(x, group, async_op=True)


def _finish_gather(buf: torch.Tensor, work, order: torch.Tensor) -> torch.Tensor:
    """[P, c, ...] gathered in rank order -> [n, ...] in global chunk order."""
    if work is not None:
        work.wait()
    return buf.flatten(0, 1)[order]


class _Plan:
    """Geometry, gates and documents of one call on this rank (all on q's device, no host sync)."""

    def __init__(self, q, decay, g, cu, group, layout, acc):
        p = dist.get_world_size(group)
        self.p, self.b, s_loc, h = p, q.shape[0], q.shape[1], q.shape[2]
        self.ids = list(rank_chunks(dist.get_rank(group), p, layout))
        slots = [cid for r in range(p) for cid in rank_chunks(r, p, layout)]  # chunk id of slot r·c+i
        self.n, self.c, self.cl = len(slots), len(self.ids), s_loc // len(self.ids)
        self.order = torch.tensor(sorted(range(self.n), key=slots.__getitem__), device=q.device)
        self.gated = g is not None
        # gates in fp64: over a chunk of L tokens the cumulative sum reaches ~L·|a|, and fp32 would put
        # ~L·|a|·eps of error into each exponent difference G_{L-1} - G_j
        f64 = torch.float64
        dec = torch.zeros(h, dtype=f64, device=q.device) if decay is None else decay.detach().to(f64)
        a = dec.expand(self.c * self.b, self.cl, h)  # per-token log gate a_t, (c·B, L, H)
        if g is not None:
            a = a + _to_chunks(g.detach(), self.c).to(f64)
        G = torch.cumsum(a, 1)
        self.qw, self.kw, self.A = (torch.exp(x).to(acc) for x in (G, G[:, -1:] - G, G[:, -1]))
        self.local_cu, self.chunk_open = None, None
        if cu is not None:
            n_tok = self.n * self.cl
            marks = torch.zeros(n_tok + 1, dtype=torch.bool, device=q.device)
            marks.index_fill_(0, cu.to(device=q.device, dtype=torch.long), True)
            starts = marks[:n_tok].clone()
            starts[0] = False  # interior document starts, global positions
            st = starts.view(self.n, self.cl)[self.ids]  # (c, L)
            opened = torch.cumsum(st.long(), 1)  # starts at chunk positions 0..i
            f = (opened == 0).repeat_interleave(self.b, 0)[..., None]  # (c·B, L, 1)
            l_ = (opened == opened[:, -1:]).repeat_interleave(self.b, 0)[..., None]
            self.qw, self.kw, self.A = self.qw * f, self.kw * l_, self.A * f[:, -1]
            self.chunk_open = ~starts.view(self.n, self.cl).any(1)  # (n,) no start in chunk m
            cu64 = cu.to(torch.long)
            self.local_cu = torch.cat([(cu64 - cid * self.cl).clamp(0, self.cl) + i * self.cl
                                       for i, cid in enumerate(self.ids)])
        if not self.gated:  # A_m of every chunk is known locally
            a_all = torch.exp(dec * self.cl).to(acc).expand(self.n, 1, h)
            self.a_all = a_all if cu is None else a_all * self.chunk_open.to(acc)[:, None, None]

    def transfer(self, a_all: torch.Tensor) -> torch.Tensor:
        """W[d, j] = prod_{j<m<d} A_m for j < d, else 0: [n, n, B, H] from A [n, B|1, H]."""
        a_all = a_all.expand(self.n, self.b, a_all.shape[-1])
        w = a_all.new_zeros(self.n, *a_all.shape)
        for d in range(1, self.n):
            tail = torch.cumprod(a_all[1:d].flip(0), 0)  # A_{d-1}, A_{d-1} A_{d-2}, ...
            w[d, :d] = torch.cat([torch.ones_like(a_all[:1]), tail]).flip(0)
        return w

    def kernel_args(self, *xs, g=None):
        """Inputs for the local kernel's intra part: batched chunks, or (documents) the local sequence
        with local offsets; the keywords hold only what is set (kernels without gates keep working)."""
        extra = {} if g is None else dict(g=g if self.local_cu is not None else _to_chunks(g, self.c))
        if self.local_cu is None:
            return tuple(_to_chunks(t, self.c) for t in xs), extra
        return xs, dict(extra, cu_seqlens=self.local_cu)

    def kernel_result(self, x):
        return x if self.local_cu is None else _to_chunks(x, self.c)


def _lasp2_forward(q, k, v, g, decay, cu, group, layout, scale, kernel):
    """Returns out [B, S/P, H, Dv], the local entering states S_in [c·B, H, Dk, Dv], W [n, n, B, H]."""
    acc = torch.promote_types(q.dtype, torch.float32)
    pl = _Plan(q, decay, g, cu, group, layout, acc)
    c, b, h = pl.c, pl.b, q.shape[2]
    qc, kc, vc = (_to_chunks(t, c) for t in (q, k, v))  # (c·B, L, H, D)

    # M_m = sum_j exp(G_{L-1} - G_j) l_j k_j^T v_j; send it (with A under g) before the local kernel
    m = torch.einsum("blhk,blhv->bhkv", kc.to(acc) * pl.kw[..., None], vc.to(acc))  # (c·B, H, Dk, Dv)
    dk_, dv_ = m.shape[-2:]
    if pl.gated:
        send = torch.cat([pl.A.view(c, b, h, 1), m.view(c, b, h, dk_ * dv_)], -1)
    else:
        send = m.view(c, b, h, dk_, dv_)
    buf, work = _gather_async(send, group, pl.p)
    args, extra = pl.kernel_args(q, k, v, g=g)
    out_intra, _ = kernel.fwd(*args, decay=decay, initial_state=None, scale=scale, **extra)
    got = _finish_gather(buf, work, pl.order)
    if pl.gated:
        a_all, m_all = got[..., 0], got[..., 1:].reshape(pl.n, b, h, dk_, dv_)
    else:
        a_all, m_all = pl.a_all, got

    # S_in(d) = sum_j W[d, j] M_j, then o_i += scale exp(G_i) f_i q_i S_in
    w = pl.transfer(a_all)  # (n, n, B, H)
    s_in = torch.einsum("djbh,jbhkv->dbhkv", w[pl.ids], m_all).flatten(0, 1)  # (c·B, H, Dk, Dv)
    out = pl.kernel_result(out_intra).to(acc) + \
        scale * torch.einsum("blhk,bhkv->blhv", qc.to(acc) * pl.qw[..., None], s_in)
    return _from_chunks(out.to(v.dtype), c), s_in, w


def _lasp2_backward(dout, q, k, v, g, decay, cu, s_in, w, group, layout, scale, kernel):
    """Returns dq, dk, dv (local shards, dtypes of q, k, v) and dg (g's dtype, or None)."""
    acc = s_in.dtype
    pl = _Plan(q, decay, g, cu, group, layout, acc)
    c, b = pl.c, pl.b
    qc, kc, vc, doc = (_to_chunks(t, c).to(acc) for t in (q, k, v, dout))

    # D = dS_in = scale sum_i exp(G_i) f_i q_i^T do_i; send it before the kernel's backward
    ds_in = scale * torch.einsum("blhk,blhv->bhkv", qc * pl.qw[..., None], doc)  # (c·B, H, Dk, Dv)
    buf, work = _gather_async(ds_in.view(c, b, *ds_in.shape[1:]), group, pl.p)
    # the kernel's final state was discarded in forward (M is computed above): no gradient reaches it
    (dout_k, *args), extra = pl.kernel_args(dout, q, k, v, g=g)
    dq, dk, dv, _, dg = call_linear_bwd(kernel, dout_k, None, *args, decay=decay, initial_state=None,
                                    scale=scale, **extra)
    ds_all = _finish_gather(buf, work, pl.order)  # (n, B, H, Dk, Dv)

    # inter part: dq_i += scale exp(G_i) f_i do_i S_in^T
    dq_inter = scale * pl.qw[..., None] * torch.einsum("blhv,bhkv->blhk", doc, s_in)
    # dM_j = sum_d W[d, j] D_d, then through M_j = sum_t exp(G_{L-1} - G_t) l_t k_t^T v_t
    dm = torch.einsum("djbh,dbhkv->jbhkv", w[:, pl.ids], ds_all).flatten(0, 1)  # (c·B, H, Dk, Dv)
    dk_m = pl.kw[..., None] * torch.einsum("blhv,bhkv->blhk", vc, dm)
    dv_m = pl.kw[..., None] * torch.einsum("blhk,bhkv->blhv", kc, dm)
    dq = pl.kernel_result(dq).to(acc) + dq_inter
    dk = pl.kernel_result(dk).to(acc) + dk_m
    dv = pl.kernel_result(dv).to(acc) + dv_m
    grads = tuple(_from_chunks(t.to(x.dtype), c) for t, x in ((dq, q), (dk, k), (dv, v)))
    if g is None:
        return grads + (None,)
    x_inter = (qc * dq_inter).sum(-1)  # (c·B, L, H): q_i . dq_i(inter), summed over i >= t
    y_m = (kc * dk_m).sum(-1)  # k_j . dk_j(M), summed over j < t
    dg_map = x_inter.flip(1).cumsum(1).flip(1) + (y_m.cumsum(1) - y_m) + \
        (pl.A * (s_in * dm).sum((-1, -2)))[:, None, :]  # A_m <S_in(m), dM_m> for every token of m
    dg = pl.kernel_result(dg).to(acc) + dg_map
    return grads + (_from_chunks(dg, c).to(g.dtype),)


class _LASP2Fn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, decay, cu_seqlens, group, layout, scale, kernel):
        out, s_in, w = _lasp2_forward(q, k, v, g, decay, cu_seqlens, group, layout, scale, kernel)
        ctx.save_for_backward(q, k, v, g, decay, s_in, w)
        ctx.args = (cu_seqlens, group, layout, scale, kernel)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, g, decay, s_in, w = ctx.saved_tensors
        cu, group, layout, scale, kernel = ctx.args
        dq, dk, dv, dg = _lasp2_backward(dout.contiguous(), q, k, v, g, decay, cu, s_in, w, group, layout,
                                         scale, kernel)
        return dq, dk, dv, dg, None, None, None, None, None, None


def _values_checkable(t: torch.Tensor) -> bool:
    """Value checks read device data: only for CPU tensors or under anomaly mode (no host sync on GPU)."""
    return t.device.type == "cpu" or torch.is_anomaly_enabled()


def _check_log_values(name: str, t: torch.Tensor, q: torch.Tensor, expected: str, fix: str) -> None:
    """A log-decay / log-gate tensor: on q's device, and (when its values can be read without a host
    sync) every value <= 0, which also rejects NaN."""
    if t.device != q.device:
        fail(_WHERE, f"{name} on {q.device} like q", str(t.device), f"move {name} to the device of q")
    if _values_checkable(t) and not bool((t <= 0).all()):
        fail(_WHERE, expected, f"max {t.max().item():.4g}", fix)


def _validate(q, k, v, group, decay, g, cu_seqlens, layout, scale, local_linear) -> LinearKernel:
    """Every check is local, so a bad input raises ValueError on every rank before any collective."""
    p = check_group(_WHERE, group)
    if isinstance(local_linear, SoftmaxKernel) or not (local_linear is None or callable(local_linear)):
        fail(_WHERE, "local_linear to be a LinearKernel or a callable (q,k,v,*,decay,initial_state,scale)"
             "->(out,state)", type(local_linear).__name__,
             "pass dist_attn.kernels.lightning_attn.linear_kernel(backend) or leave local_linear=None")
    b, s_loc, hq, hkv = check_qkv(_WHERE, q, k, v, same_v_dim=False)
    if hq != hkv:
        fail(_WHERE, "q, k, v with the same number of heads (linear attention has no GQA)",
             f"q {hq}, k/v {hkv}", "repeat the k/v heads to match q before calling")
    if decay is not None:
        if not isinstance(decay, torch.Tensor) or decay.shape != (hq,) or not decay.is_floating_point():
            fail(_WHERE, f"decay a floating tensor of shape [H] = [{hq}] or None",
                 f"{type(decay).__name__} {tuple(getattr(decay, 'shape', ()))}",
                 "pass one log-decay per head, e.g. -torch.rand(H)")
        _check_log_values("decay", decay, q, "log-decay values <= 0 (lambda = exp(decay) <= 1)",
                          "pass log(lambda), e.g. -F.softplus(param)")
    if g is not None:
        if not isinstance(g, torch.Tensor) or tuple(g.shape) != (b, s_loc, hq) or not g.is_floating_point():
            fail(_WHERE, f"g a floating tensor [B, S/P, H] = [{b}, {s_loc}, {hq}] sharded like q, or None",
                 f"{type(g).__name__} {tuple(getattr(g, 'shape', ()))} {getattr(g, 'dtype', '')}",
                 "pass one log gate per local token and head, e.g. F.logsigmoid(x)")
        _check_log_values("g", g, q, "log-gate values g <= 0",
                          "pass the log of the gate, e.g. F.logsigmoid(x), not the gate itself")
    if scale is not None and not isinstance(scale, (int, float)):
        fail(_WHERE, "scale a Python number or None", type(scale).__name__, "pass float(scale)")
    check_layout(layout, f"{_WHERE}: layout")
    check_seq_len(p * s_loc, p, layout, f"{_WHERE}: global sequence P·S_local = {p}·{s_loc}")
    if cu_seqlens is not None:
        check_documents(_WHERE, cu_seqlens, None, True, p * s_loc, q.device)  # values checked if on the CPU
    if local_linear is None:
        from dist_attn.kernels.lightning_attn import linear_kernel
        return linear_kernel("auto")
    if isinstance(local_linear, LinearKernel):
        return local_linear
    return linear_kernel_from_autograd(getattr(local_linear, "__name__", "user_linear"), local_linear)


def lasp2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group,
                    layout: str = "zigzag", decay: Optional[torch.Tensor] = None, g: Optional[torch.Tensor] = None,
                    scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None,
                    local_linear: Optional[LinearKernel | Callable] = None) -> torch.Tensor:
    """Causal linear attention over a CP group with LASP-2 (see the module docstring for the math).

    q, k ``[B, S/P, H, Dk]``, v ``[B, S/P, H, Dv]`` sharded in ``layout`` over ``group`` (global
    ``[B, S, H, D]``); ``decay`` a per-head log-decay ``[H]`` (<= 0, not differentiated) or None;
    ``g`` a per-token log gate ``[B, S/P, H]`` (<= 0, sharded like q, differentiated) or None;
    ``cu_seqlens`` GLOBAL document offsets ``[0, ..., S]`` (the same on every rank; state reset at each
    start) or None; ``scale`` defaults to Dk^-0.5; ``local_linear`` a
    :class:`~dist_attn.kernels.interface.LinearKernel` (default ``linear_kernel("auto")``) or a
    differentiable ``(q,k,v,*,decay,initial_state,scale[,g,cu_seqlens]) -> (out, state)``. Returns out
    ``[B, S/P, H, Dv]`` in v's dtype, differentiable w.r.t. q, k, v and g.
    """
    kernel = _validate(q, k, v, group, decay, g, cu_seqlens, layout, scale, local_linear)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _LASP2Fn.apply(q, k, v, g, decay, cu_seqlens, group, layout, scale, kernel)
