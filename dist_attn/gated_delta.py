"""Gated DeltaNet under context parallelism: one all-gather of per-chunk affine state maps.

Shardings (P = CP size, c = chunks per rank, L = S/(c·P) tokens per chunk, n = c·P chunks)::

    q, k  [B, S/P, H, Dk]     v, out  [B, S/P, H, Dv]     beta, g  [B, S/P, H]
    M     [c, B, H, Dk, Dv+Dk]   AllGather_cp(M) -> [P, c, B, H, Dk, Dv+Dk]    (fp32; fp64 for fp64 inputs)

Layouts: ``contiguous`` (n = P, rank r holds chunk r) and ``zigzag`` (n = 2P, rank r holds chunks r
and 2P-1-r in that local order).

Math, per head. The recurrence S_t = exp(g_t)(I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,
o_t = scale · q_t^T S_t is affine in the pair (S_{-1}, V) and acts on the columns of S independently:
column j of S_t depends only on column j of S_{-1} and of v. Hence for chunk j entering with S_in(j)::

    S_out(j) = A_j S_in(j) + b_j,      A_j = prod_t exp(g_t)(I - beta_t k_t k_t^T)  [Dk, Dk]
    o_i      = o_i(v, S_in=0) + o_i(v=0, S_in=I) · S_in(j)                           ([Dk] x [Dk, Dv])

and ONE local kernel call with the widened value v' = [v | 0_Dk] and initial state S' = [0 | I_Dk]
(width Dv + Dk) returns both: its output is [o(v, 0) | o(0, I)] and its final state is [b_j | A_j]
(b_j: final state from zero; A_j: the image of the identity with v = 0). A document start inside the
chunk makes the kernel reset there, so A_j = 0 and o(0, I) = 0 from that start on: the map holds from
the last interior start. A document starting exactly at a chunk boundary j·L sets m_j = 0 below.

Forward: the kernel call above on the local chunks (both zigzag chunks batched along B when there are no
documents, one call per chunk otherwise), one all-gather of the maps [b | A], then every rank scans the
chunks in global order (n - 1 small matmuls, redundantly on every rank)::

    S_in(0) = 0,     S_in(j+1) = m_{j+1} (A_j S_in(j) + b_j),     m_j = 0 iff j·L is a document start
    out     = o(v, 0) + o(0, I) · S_in(j)          (per token, for each local chunk j)

Backward, with G_j = dL/dS_in(j) from the local outputs, G_j = sum_i o_i(0, I)^T do_i (one all-gather of
G for all chunks), R_j = dL/d(A_{j-1} S_in(j-1) + b_{j-1}) by a reverse scan::

    R_n = 0,     R_j = m_j (G_j + A_j^T R_{j+1}),     db_j = R_{j+1},     dA_j = R_{j+1} S_in(j)^T

then the kernel's backward of the widened call with dout' = [do | do · S_in^T] and dfinal' = [db | dA]
gives dq, dk, dv (first Dv columns), dbeta, dg. P = 1 contiguous is the plain kernel call.

Cost per rank per layer: forward (P-1)·c·B·H·Dk·(Dv+Dk)·4 bytes (one all-gather; ·8 for fp64 inputs),
backward (P-1)·c·B·H·Dk·Dv·4; independent of S. The local kernel runs at width Dv + Dk instead of Dv
(for Dk = Dv about 1.5-2x the plain layer's value-side work) and no second pass is needed.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from dist_attn import comm
from dist_attn.checks import check_group, check_qkv, fail
from dist_attn.documents import check_documents, host_offsets
from dist_attn.layout import check_layout, check_seq_len, num_chunks, rank_chunks
from dist_attn.kernels.gated_delta.interface import DeltaKernel, delta_kernel_from_autograd

_WHERE = "gated_delta_attention"


def _to_chunks(x: torch.Tensor, c: int) -> torch.Tensor:
    """[B, c·L, ...] -> [c·B, L, ...], chunk-major."""
    b, s = x.shape[:2]
    return x.reshape(b, c, s // c, *x.shape[2:]).transpose(0, 1).reshape(c * b, s // c, *x.shape[2:])


def _from_chunks(x: torch.Tensor, c: int) -> torch.Tensor:
    cb, cl = x.shape[:2]
    return x.reshape(c, cb // c, cl, *x.shape[2:]).transpose(0, 1).reshape(cb // c, c * cl, *x.shape[2:])


class _Plan:
    """Host-side geometry: P, local chunk ids, chunk length, per-chunk local cu_seqlens, boundary masks."""

    def __init__(self, group, layout: str, s_loc: int, cu: Optional[list[int]]):
        self.p = dist.get_world_size(group)
        self.ids = list(rank_chunks(dist.get_rank(group), self.p, layout))
        self.n = num_chunks(self.p, layout)
        self.c = len(self.ids)
        self.cl = s_loc // self.c
        self.slots = [j for r in range(self.p) for j in rank_chunks(r, self.p, layout)]  # gathered order
        starts = set(cu or [])
        # m_j = 0 where chunk j begins a document (its entering state is discarded)
        self.keep = [j > 0 and (j * self.cl) not in starts for j in range(self.n)]
        self.local_cu = []
        for j in self.ids:
            a = j * self.cl
            inner = sorted({x - a for x in starts if a < x < a + self.cl})
            self.local_cu.append(torch.tensor([0] + inner + [self.cl], dtype=torch.long) if inner else None)


def _run_fwd(kernel, plan, q, k, v, beta, g, init, scale):
    """Kernel forward over the chunk-major batch: one call without documents, one per chunk with."""
    if all(cu is None for cu in plan.local_cu):
        return kernel.fwd(q, k, v, beta, g, initial_state=init, scale=scale)
    b = q.shape[0] // plan.c
    parts = [kernel.fwd(*(t[i * b:(i + 1) * b] for t in (q, k, v, beta, g)), initial_state=init[i * b:(i + 1) * b],
                        scale=scale, cu_seqlens=plan.local_cu[i]) for i in range(plan.c)]
    return torch.cat([o for o, _ in parts]), torch.cat([s for _, s in parts])


def _run_bwd(kernel, plan, dout, dfinal, q, k, v, beta, g, init, scale):
    if all(cu is None for cu in plan.local_cu):
        return kernel.bwd(dout, dfinal, q, k, v, beta, g, initial_state=init, scale=scale)[:5]
    b = q.shape[0] // plan.c
    parts = [kernel.bwd(*(t[i * b:(i + 1) * b] for t in (dout, dfinal, q, k, v, beta, g)),
                        initial_state=init[i * b:(i + 1) * b], scale=scale, cu_seqlens=plan.local_cu[i])[:5]
             for i in range(plan.c)]
    return tuple(torch.cat(x) for x in zip(*parts))


def _gather(x: torch.Tensor, plan, group) -> torch.Tensor:
    """[c, ...] local -> [n, ...] in global chunk order."""
    full = x.unsqueeze(0) if plan.p == 1 else comm.all_gather(x, group)
    full = full.flatten(0, 1)  # gathered slot order
    order = torch.tensor([plan.slots.index(j) for j in range(plan.n)], device=x.device)
    return full.index_select(0, order)


def _widened(q, v, acc, c):
    """v' = [v | 0] and S' = [0 | I] for the chunk-major batch."""
    cb, _, h, dk = q.shape
    dv = v.shape[-1]
    v_aug = torch.cat([v, v.new_zeros(*v.shape[:-1], dk)], -1)
    init = torch.cat([torch.zeros(dk, dv, dtype=acc, device=q.device),
                      torch.eye(dk, dtype=acc, device=q.device)], -1).expand(cb, h, dk, dv + dk).contiguous()
    return v_aug, init


class _GatedDeltaFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, g, group, plan, scale, kernel):
        acc = torch.promote_types(q.dtype, torch.float32)
        c, dv, b = plan.c, v.shape[-1], q.shape[0]
        qc, kc, vc, bc, gc = (_to_chunks(t, c) for t in (q, k, v, beta, g))
        v_aug, init = _widened(qc, vc, acc, c)
        out_aug, maps = _run_fwd(kernel, plan, qc, kc, v_aug, bc, gc, init, scale)
        maps_all = _gather(maps.to(acc).reshape(c, b, *maps.shape[1:]), plan, group)  # (n, B, H, Dk, Dv+Dk)
        bmap, amap = maps_all[..., :dv], maps_all[..., dv:]
        s_in = [torch.zeros_like(bmap[0])]
        for j in range(plan.n - 1):  # S_in(j+1) = m_{j+1} (A_j S_in(j) + b_j)
            nxt = amap[j] @ s_in[j] + bmap[j]
            s_in.append(nxt if plan.keep[j + 1] else torch.zeros_like(nxt))
        s_in = torch.stack(s_in)  # (n, B, H, Dk, Dv)
        s_loc = s_in[plan.ids].flatten(0, 1)  # (c·B, H, Dk, Dv)
        out_i = out_aug[..., dv:]
        out = out_aug[..., :dv].to(acc) + torch.einsum("blhk,bhkv->blhv", out_i.to(acc), s_loc)
        ctx.save_for_backward(q, k, v, beta, g, out_i, amap, s_in)
        ctx.args = (group, plan, scale, kernel)
        return _from_chunks(out.to(v.dtype), c)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, beta, g, out_i, amap, s_in = ctx.saved_tensors
        group, plan, scale, kernel = ctx.args
        acc = s_in.dtype
        c, dv, b = plan.c, v.shape[-1], q.shape[0]
        qc, kc, vc, bc, gc, doc = (_to_chunks(t, c) for t in (q, k, v, beta, g, dout.contiguous()))
        s_loc = s_in[plan.ids].flatten(0, 1)
        # G_j = sum_i o_i(0, I)^T do_i for the local chunks, gathered for every chunk
        grad_in = torch.einsum("blhk,blhv->bhkv", out_i.to(acc), doc.to(acc))
        grad_all = _gather(grad_in.view(c, b, *grad_in.shape[1:]), plan, group)  # (n, B, H, Dk, Dv)
        # reverse scan R_j = m_j (G_j + A_j^T R_{j+1}); chunk j's map gets db_j = R_{j+1}, dA_j = R_{j+1} S_in(j)^T
        r_next = torch.zeros_like(grad_all[0])
        dmap = [None] * plan.n
        for j in range(plan.n - 1, -1, -1):
            dmap[j] = torch.cat([r_next, r_next @ s_in[j].transpose(-1, -2)], -1)
            if j == min(plan.ids):
                break
            r_j = grad_all[j] + amap[j].transpose(-1, -2) @ r_next
            r_next = r_j if plan.keep[j] else torch.zeros_like(r_j)
        dfinal = torch.cat([dmap[j] for j in plan.ids])  # (c·B, H, Dk, Dv+Dk)
        dout_aug = torch.cat([doc, torch.einsum("blhv,bhkv->blhk", doc.to(acc), s_loc).to(doc.dtype)], -1)
        v_aug, init = _widened(qc, vc, acc, c)
        dq, dk, dva, dbeta, dg = _run_bwd(kernel, plan, dout_aug, dfinal, qc, kc, v_aug, bc, gc, init, scale)
        grads = [_from_chunks(t.to(x.dtype), c) for t, x in ((dq, q), (dk, k), (dva[..., :dv], v),
                                                              (dbeta, beta), (dg, g))]
        return (*grads, None, None, None, None)


class _PlainFn(torch.autograd.Function):
    """P = 1 contiguous: the kernel itself (no state exchange, no widening)."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, cu, scale, kernel):
        out, _ = kernel.fwd(q, k, v, beta, g, initial_state=None, scale=scale, cu_seqlens=cu)
        ctx.save_for_backward(q, k, v, beta, g)
        ctx.args = (cu, scale, kernel)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, beta, g = ctx.saved_tensors
        cu, scale, kernel = ctx.args
        grads = kernel.bwd(dout.contiguous(), None, q, k, v, beta, g, initial_state=None, scale=scale,
                           cu_seqlens=cu)[:5]
        return (*grads, None, None, None)


def _check_gate(name, t, q, lo_ok, hi_ok, expected, fix):
    b, s, h = q.shape[:3]
    if not isinstance(t, torch.Tensor) or t.shape != (b, s, h) or not t.is_floating_point():
        fail(_WHERE, f"{name} a floating tensor of shape [B, S/P, H] = {[b, s, h]}",
             f"{type(t).__name__} {tuple(getattr(t, 'shape', ()))}", f"pass one {name} per token and head")
    if t.device != q.device:
        fail(_WHERE, f"{name} on {q.device} like q", str(t.device), f"move {name} to the device of q")
    if t.device.type == "cpu" or torch.is_anomaly_enabled():  # value check without a GPU host sync
        ok = lo_ok(t) & hi_ok(t)  # NaN fails both
        if not bool(ok.all()):
            fail(_WHERE, expected, f"{int((~ok).sum())} values outside", fix)


def _validate(q, k, v, beta, g, group, layout, scale, cu_seqlens, local_kernel):
    """Every check is local, so a bad input raises on every rank holding it, before any collective."""
    p = check_group(_WHERE, group)
    if not (local_kernel is None or isinstance(local_kernel, DeltaKernel) or callable(local_kernel)):
        fail(_WHERE, "local_kernel a DeltaKernel or a callable (q,k,v,beta,g,*,initial_state,scale,cu_seqlens)"
             "->(out,state)", type(local_kernel).__name__,
             "pass dist_attn.kernels.gated_delta.delta_kernel(backend) or leave local_kernel=None")
    _, s_loc, hq, hkv = check_qkv(_WHERE, q, k, v, same_v_dim=False)
    if hq != hkv:
        fail(_WHERE, "q, k, v with the same number of heads", f"q {hq}, k/v {hkv}",
             "repeat the k/v heads to match q before calling")
    _check_gate("beta", beta, q, lambda t: t >= 0, lambda t: t <= 1, "beta in [0, 1]",
                "pass beta = sigmoid(projection)")
    _check_gate("g", g, q, lambda t: t <= 0, lambda t: t == t, "log gates g <= 0",
                "pass g = -softplus(...) or logsigmoid(...)")
    if scale is not None and not isinstance(scale, (int, float)):
        fail(_WHERE, "scale a Python number or None", type(scale).__name__, "pass float(scale)")
    check_layout(layout, f"{_WHERE}: layout")
    check_seq_len(p * s_loc, p, layout, f"{_WHERE}: global sequence P·S_local = {p}·{s_loc}")
    check_documents(_WHERE, cu_seqlens, None, True, p * s_loc, q.device)
    cu = host_offsets(_WHERE, cu_seqlens, p * s_loc)  # a CUDA cu_seqlens costs one copy to the host
    if local_kernel is None:
        from dist_attn.kernels.gated_delta import delta_kernel
        local_kernel = delta_kernel("auto")
    elif not isinstance(local_kernel, DeltaKernel):
        local_kernel = delta_kernel_from_autograd(getattr(local_kernel, "__name__", "user_delta"), local_kernel)
    return local_kernel, cu


def gated_delta_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                          g: torch.Tensor, *, group, layout: str = "zigzag", scale: Optional[float] = None,
                          cu_seqlens: Optional[torch.Tensor] = None,
                          local_kernel: Optional[DeltaKernel | Callable] = None) -> torch.Tensor:
    """Gated delta rule over a CP group (module docstring: math and bytes).

    q, k ``[B, S/P, H, Dk]`` (taken as given; the layer L2-normalises them), v ``[B, S/P, H, Dv]``,
    beta ``[B, S/P, H]`` in [0, 1], g ``[B, S/P, H]`` <= 0, all sharded in ``layout`` over ``group``;
    ``scale`` defaults to Dk^-0.5; ``cu_seqlens`` GLOBAL document offsets ``[0, ..., S]`` (same on every
    rank; the state resets at each document start, across ranks); ``local_kernel`` a
    :class:`~dist_attn.kernels.gated_delta.interface.DeltaKernel` (default ``delta_kernel("auto")``) or a
    differentiable callable. Returns out ``[B, S/P, H, Dv]`` in v's dtype, differentiable in q, k, v,
    beta and g. Value checks on beta and g run for CPU tensors or under ``torch.autograd.detect_anomaly``.
    """
    kernel, cu = _validate(q, k, v, beta, g, group, layout, scale, cu_seqlens, local_kernel)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    plan = _Plan(group, layout, q.shape[1], cu)
    if plan.n == 1:
        local = None if cu is None else torch.tensor(cu, dtype=torch.long)
        return _PlainFn.apply(q, k, v, beta, g, local, scale, kernel)
    return _GatedDeltaFn.apply(q, k, v, beta, g, group, plan, scale, kernel)
