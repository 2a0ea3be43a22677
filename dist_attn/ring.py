"""Ring attention: softmax attention over a context-parallel group, K/V passed around a ring.

Shapes. Global ``q [B, S, Hq, D]``, ``k, v [B, S, Hkv, D]`` (Hq a multiple of Hkv: MHA, GQA, MQA).
On rank r of the P ranks of ``group``: ``q [B, S/P, Hq, D]``, ``k, v [B, S/P, Hkv, D]`` in the
``zigzag`` (rank r holds chunks r and 2P-1-r of C = S/(2P) tokens) or ``contiguous`` layout; the
output ``[B, S/P, Hq, D]`` is in the same layout.

Math. Step t = 0..P-1, rank r holds the K/V block of rank src = (r - t) mod P and computes the
partial result of its queries over those keys, ``(o_t, lse_t) = attn(q, k_src, v_src)``. Partial
results over disjoint keys merge exactly through the log-sum-exp (:mod:`dist_attn.merge`, fp32)::

    lse = log(exp(lse_a) + exp(lse_b)),   o = exp(lse_a - lse)·o_a + exp(lse_b - lse)·o_b

While block t is computed, block t+1 is already in flight (comm/compute overlap). K/V travel with
Hkv heads, never expanded to Hq. Backward: K/V travel the ring again; with the *merged* (o, lse)
every block's share of the gradient is local (``P_ij = exp(s_ij - lse_i)``,
``dS = P ⊙ (dP - rowsum(dO ⊙ O))``), so dq accumulates in place and the fp32 dK/dV of block src
accumulate in a buffer that travels with the ring and arrives at its owner after P-1 hops.

Causal schedule (zigzag; q = [q_r, q_{2P-1-r}], k = [k_src, k_{2P-1-src}], halves of C tokens)::

    src == r  ->  local causal (q vs k with a causal mask on the local concatenation: exact)
    src <  r  ->  all q vs first half of k, no mask   (chunk src precedes both local chunks)
    src >  r  ->  second half of q vs all k, no mask  (both remote chunks precede chunk 2P-1-r)

so every rank does 2C·C (unmasked) work per step: balanced. ``contiguous`` + causal computes
src < r in full and skips src > r (correct but unbalanced: rank P-1 does 2P-1 times the work of rank 0);
non-causal computes every block in full in either layout.

Cost per rank per layer (N = S global tokens, b bytes per input element)::

    forward bytes sent   2(P-1)/P · B·N·Hkv·D·b         (K and V, P-1 hops of B·N/P·Hkv·D)
    backward bytes sent  2(P-1)/P · B·N·Hkv·D·(b + 4)   (K/V again + fp32 dK/dV, P-1 hops each)
    forward FLOPs        4·B·Hq·(N/P)·N·D, x0.5 causal (zigzag: equal on every rank); bwd 2.5x

Packed documents and windows (``cu_seqlens`` global offsets, ``window_size``; :mod:`dist_attn.documents`).
The local rows are chunks with their own global offsets (two in zigzag), so each (local query chunk,
key chunk) pair with a visible key is one kernel call with the right ``q_offset``/``k_offset`` (the
kernel skips the invisible key blocks inside it); pairs without one are not computed. Which rank
needs which rank's block is planned on the host from the offsets (the same table on every rank), and
the ring becomes direct exchanges at ring distance d = 1..P-1: rank src sends its K/V to src+d only
if src+d needs them, so a window much shorter than S/P moves only neighbouring blocks (contiguous:
d = 1; zigzag: d = 1 and d = P-1, one block each) and documents that do not cross a block boundary
move nothing. Backward: the K/V exchange again, and each computed block's fp32 dK/dV goes straight
back to its owner at the same distance. Bytes per rank = (blocks it sends) x the ring's per-block
bytes; with nothing to skip they equal the ring's closed form below.

Measured bf16 rms error vs P (``tests/test_ring.py::test_bf16_drift_vs_ring_size``: one global
problem B=1, S=256, Hq=4, Hkv=2, D=64, causal zigzag, default CPU kernel; rms(out - ref)/rms(ref)
with the reference in fp64 on the same bf16 inputs)::

    P       1        2        4        8
    out     1.6e-3   1.7e-3   1.6e-3   1.5e-3
    dq      1.9e-3   2.1e-3   2.1e-3   2.2e-3
    dk      1.8e-3   2.6e-3   2.7e-3   2.8e-3
    dv      1.7e-3   2.4e-3   2.4e-3   2.4e-3

Flat in P because blocks merge in fp32. dK/dV step up once from P=1 to 2: the kernel returns each
block's share rounded to bf16 before the fp32 sum (one extra rounding, not one per step).
"""
from __future__ import annotations

import numbers
import weakref

import torch
import torch.distributed as dist

from dist_attn.checks import check_group, check_qkv, fail
from dist_attn.comm import RingComm, _record, nbytes
from dist_attn.documents import check_documents, check_same_on_ranks, host_offsets, ranges_meet, ring_need
from dist_attn.layout import check_layout, check_seq_len, rank_ranges
from dist_attn.merge import BlockwiseAttention, empty_accumulators, merge_into
from dist_attn.kernels.interface import LinearKernel, SoftmaxKernel, softmax_kernel_from_autograd

_ALL = slice(None)


def resolve_local_attn(where: str, local_attn) -> SoftmaxKernel:
    """``None`` -> the default kernel; a :class:`SoftmaxKernel` as is; a plain differentiable
    ``fn(q, k, v, *, causal, softmax_scale, q_offset, k_offset) -> (out, lse)`` wrapped (its ``bwd``
    recomputes under autograd and rescales by the merge weights)."""
    if local_attn is None:
        from dist_attn.kernels.flash_attn import softmax_kernel
        return softmax_kernel("auto")
    if isinstance(local_attn, SoftmaxKernel):
        return local_attn
    if isinstance(local_attn, LinearKernel) or not callable(local_attn):
        fail(where, "local_attn to be a SoftmaxKernel, a callable (q, k, v, *, causal, softmax_scale, "
             "q_offset, k_offset) -> (out, lse), or None", type(local_attn).__name__,
             "pass dist_attn.kernels.flash_attn.softmax_kernel('auto') or leave local_attn=None")
    return softmax_kernel_from_autograd(getattr(local_attn, "__name__", "user_attn"), local_attn)


def check_softmax_cp_inputs(where: str, q, k, v, group, causal, layout, softmax_scale, local_attn,
                            cu_seqlens=None, window_size=None) -> tuple[int, float, SoftmaxKernel]:
    """Every check of a softmax CP strategy, all local (no collective), so a bad input raises
    ``ValueError`` on every rank before any communication. Returns ``(P, softmax_scale, kernel)``."""
    check_qkv(where, q, k, v)
    check_layout(layout, f"{where}: layout")
    if not isinstance(causal, bool):
        fail(where, "causal to be a bool", repr(causal), "pass causal=True or causal=False")
    if softmax_scale is not None and (not isinstance(softmax_scale, numbers.Real) or
                                      isinstance(softmax_scale, bool) or not softmax_scale > 0):
        fail(where, "softmax_scale to be a positive number or None", repr(softmax_scale),
             "leave it None for 1/sqrt(head_dim)")
    kernel = resolve_local_attn(where, local_attn)
    world = check_group(where, group)
    check_seq_len(world * q.shape[1], world, layout, f"{where}: global sequence P*S_local")
    check_documents(where, cu_seqlens, window_size, causal, world * q.shape[1], q.device)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return world, scale, kernel


def _rows(x: torch.Tensor, sl: slice, dim: int = 1) -> torch.Tensor:
    """``x`` restricted to sequence rows ``sl`` along ``dim``, contiguous for the kernel."""
    if sl == _ALL:
        return x
    return x[(slice(None),) * dim + (sl,)].contiguous()


def _block_plan(rank: int, src: int, world: int, layout: str, causal: bool, s_local: int):
    """What rank ``rank`` computes on the K/V block of rank ``src``: ``(q_rows, k_rows, causal)``
    (slices of the local sequence) or ``None`` when no local query sees any of those keys."""
    if src == rank:
        return _ALL, _ALL, causal
    if not causal:
        return _ALL, _ALL, False
    if layout == "contiguous":
        return (_ALL, _ALL, False) if src < rank else None
    half = s_local // 2
    if src < rank:
        return _ALL, slice(0, half), False
    return slice(half, None), _ALL, False


def _ring_forward(q, k, v, group, causal, layout, scale, kernel):
    """q ``[B, S/P, Hq, D]``, k/v ``[B, S/P, Hkv, D]`` -> (out ``[B, S/P, Hq, D]`` in q's dtype,
    lse fp32 ``[B, Hq, S/P]``) over all P blocks."""
    comm = RingComm(group)
    world, rank = comm.world_size, comm.rank
    out, lse = empty_accumulators(q)                    # fp32 accumulators: o = 0, lse = -inf
    for step in range(world):
        if step + 1 < world:                            # post the next block before computing
            next_k, next_v = comm.send_recv(k), comm.send_recv(v)
            comm.commit()
        plan = _block_plan(rank, (rank - step) % world, world, layout, causal, q.shape[1])
        if plan is not None:
            qs, ks, c = plan
            block_out, block_lse = kernel.fwd(_rows(q, qs), _rows(k, ks), _rows(v, ks), causal=c,
                                              softmax_scale=scale, q_offset=0, k_offset=0)
            merge_into(out, lse, block_out, block_lse, qs)
        if step + 1 < world:
            comm.wait()
            k, v = next_k, next_v
    return out.to(q.dtype), lse


def _ring_backward(dout, q, k, v, out, lse, group, causal, layout, scale, kernel):
    """Gradients of the local q, k, v (fp32). ``out``/``lse`` are the merged forward results.

    Two rings: K/V (posted before each block's compute, as in the forward) and the fp32 dK/dV
    accumulator of the block in hand. The accumulator for rank src's keys is created by rank
    src+1 at step 1, gains one block's share per hop, and after step P-1 (on rank src-1) is sent
    home, where the diagonal block's share (kept locally at step 0) is added: P-1 hops in all.
    """
    kv_comm, dkv_comm = RingComm(group), RingComm(group)
    world, rank = kv_comm.world_size, kv_comm.rank
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk_own = dv_own = next_dk = next_dv = None
    for step in range(world):
        if step + 1 < world:
            next_k, next_v = kv_comm.send_recv(k), kv_comm.send_recv(v)
            kv_comm.commit()
        plan = _block_plan(rank, (rank - step) % world, world, layout, causal, q.shape[1])
        if plan is not None:
            qs, ks, c = plan
            dq_b, dk_b, dv_b = kernel.bwd(_rows(dout, qs), _rows(q, qs), _rows(k, ks), _rows(v, ks),
                                          _rows(out, qs), _rows(lse, qs, dim=2), causal=c,
                                          softmax_scale=scale, q_offset=0, k_offset=0)
            dq[:, qs] += dq_b
        if step == 0:                                   # the diagonal block: always computed
            dk_own, dv_own = dk_b.float(), dv_b.float()
        else:
            if step == 1:
                dk_acc = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
                dv_acc = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
            else:
                dkv_comm.wait()
                dk_acc, dv_acc = next_dk, next_dv
            if plan is not None:
                dk_acc[:, ks] += dk_b
                dv_acc[:, ks] += dv_b
            next_dk, next_dv = dkv_comm.send_recv(dk_acc), dkv_comm.send_recv(dv_acc)
            dkv_comm.commit()
        if step + 1 < world:
            kv_comm.wait()
            k, v = next_k, next_v
    if world > 1:                                       # our keys' accumulator is back home
        dkv_comm.wait()
        dk_own += next_dk
        dv_own += next_dv
    return dq, dk_own, dv_own


# --- documents / windows: host-planned exchanges at ring distance d --------------------------------
class _Plan:
    """Host plan of one masked ring call (identical on every rank): for each ring distance d that
    moves or computes anything, whether this rank sends its block to rank+d, receives the block of
    rank-d, and which (local query chunk, key chunk) pairs of that block it computes."""

    def __init__(self, rank, world, layout, causal, cu, window_size, s_local):
        n = world * s_local
        need = ring_need(cu, causal, window_size, world, layout, n)
        ranges = [rank_ranges(n, r, world, layout) for r in range(world)]
        c = s_local // len(ranges[rank])  # tokens per local chunk
        self.steps = []  # (d, send, recv, [(q_rows, k_rows, q_offset, k_offset)])
        for d in range(world):
            src = (rank - d) % world
            send = d > 0 and need[(rank + d) % world][rank]
            recv = d > 0 and need[rank][src]
            pairs = [(slice(i * c, (i + 1) * c), slice(j * c, (j + 1) * c), qr[0], kr[0])
                     for i, qr in enumerate(ranges[rank]) for j, kr in enumerate(ranges[src])
                     if need[rank][src] and ranges_meet(qr, kr, cu, causal, window_size, n)]
            if d == 0 or any(need[(r + d) % world][r] for r in range(world)):  # same list on every rank
                self.steps.append((d, send, recv, pairs))


_WARM_GROUPS: "weakref.WeakSet" = weakref.WeakSet()  # groups whose first point-to-point call involved every rank


def warm_up_p2p(group, device) -> bool:
    """Once per process group: one tiny point-to-point exchange around the full ring (every rank sends
    one element to rank+1 and receives from rank-1) in a single ``batch_isend_irecv``. PyTorch requires
    the FIRST point-to-point call of a NCCL group to involve every rank of it; a planned ring with
    documents or a window may skip some ranks' calls, so it warms the group up first. Not counted by
    the :class:`~dist_attn.comm.CommRecorder` (4 bytes each way, once). Returns True if it ran now."""
    key = group if group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    if world == 1 or key is None or key in _WARM_GROUPS:  # None: no real group object (nothing to warm)
        return False
    rank = dist.get_rank(group)
    glob = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
    send, recv = torch.zeros(1, device=device), torch.empty(1, device=device)
    ops = [dist.P2POp(dist.isend, send, glob((rank + 1) % world), group),
           dist.P2POp(dist.irecv, recv, glob((rank - 1) % world), group)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    _WARM_GROUPS.add(key)
    return True


class _Shift:
    """Point-to-point exchange at ring distance d inside ``group``: send to rank+d and/or receive from
    rank-d (``back=True``: the reverse direction), asynchronously. Bytes go to the CommRecorder as p2p."""

    def __init__(self, group):
        self.group, self.rank, self.world = group, dist.get_rank(group), dist.get_world_size(group)

    def _global(self, r):
        return dist.get_global_rank(self.group, r) if self.group is not None else r

    def post(self, d, send, recv_like, back=False):
        to, frm = (self.rank + d) % self.world, (self.rank - d) % self.world
        if back:
            to, frm = frm, to
        ops, bufs = [], []
        for t in send:
            t = t.contiguous()
            ops.append(dist.P2POp(dist.isend, t, self._global(to), self.group))
            _record("p2p", nbytes(t), 0)
        for t in recv_like:
            bufs.append(torch.empty_like(t))
            ops.append(dist.P2POp(dist.irecv, bufs[-1], self._global(frm), self.group))
            _record("p2p", 0, nbytes(t))
        return bufs, (dist.batch_isend_irecv(ops) if ops else [])

    @staticmethod
    def wait(reqs):
        for r in reqs:
            r.wait()


def _planned_steps(plan, shift, k, v):
    """Yield ``(d, send, recv, pairs, kb, vb)`` per planned step, kb/vb being the K/V block of rank-d
    (None if not received); step i+1's exchange is posted before step i is yielded, so it is in flight
    during step i's compute."""
    def post(i):
        d, send, recv, _ = plan.steps[i]
        return shift.post(d, [k, v] if send else [], [k, v] if recv else [])

    pending = post(1) if len(plan.steps) > 1 else None
    for i, (d, send, recv, pairs) in enumerate(plan.steps):
        if d == 0:
            kb, vb = k, v
        else:
            bufs, reqs = pending
            shift.wait(reqs)
            kb, vb = bufs if recv else (None, None)
            pending = post(i + 1) if i + 1 < len(plan.steps) else None
        yield d, send, recv, pairs, kb, vb


def _masked_forward(q, k, v, group, causal, layout, scale, kernel, plan, cu_seqlens, window_size):
    """Forward over the planned steps; the next step's K/V are in flight during this step's compute."""
    out, lse = empty_accumulators(q)
    mask_kw = dict(cu_seqlens=cu_seqlens, window_size=window_size)
    for _, _, _, pairs, kb, vb in _planned_steps(plan, _Shift(group), k, v):
        for qs, ks, qo, ko in pairs:
            o_b, l_b = kernel.fwd(_rows(q, qs), _rows(kb, ks), _rows(vb, ks), causal=causal, softmax_scale=scale,
                                  q_offset=qo, k_offset=ko, **mask_kw)
            merge_into(out, lse, o_b, l_b, qs)
    return out.to(q.dtype), lse


def _masked_backward(dout, q, k, v, out, lse, group, causal, layout, scale, kernel, plan, cu_seqlens,
                     window_size):
    """Gradients (fp32): K/V exchanged again; the dK/dV of rank-d's block go straight back to it."""
    shift = _Shift(group)
    mask_kw = dict(cu_seqlens=cu_seqlens, window_size=window_size)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk_own = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv_own = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    f32 = [dk_own, dv_own]  # shape/dtype templates of the dK/dV messages

    def land(pending):  # wait for a posted dK/dV exchange; add what came back for my keys
        if pending is not None:
            bufs, reqs, got = pending
            shift.wait(reqs)
            if got:
                dk_own.add_(bufs[0])
                dv_own.add_(bufs[1])

    dkv_pending = None
    for d, send, recv, pairs, kb, vb in _planned_steps(plan, shift, k, v):
        dk_b = torch.zeros_like(dk_own) if pairs else None
        dv_b = torch.zeros_like(dv_own) if pairs else None
        for qs, ks, qo, ko in pairs:
            dq_p, dk_p, dv_p = kernel.bwd(_rows(dout, qs), _rows(q, qs), _rows(kb, ks), _rows(vb, ks),
                                          _rows(out, qs), _rows(lse, qs, dim=2), causal=causal,
                                          softmax_scale=scale, q_offset=qo, k_offset=ko, **mask_kw)
            dq[:, qs] += dq_p
            dk_b[:, ks] += dk_p
            dv_b[:, ks] += dv_p
        land(dkv_pending)  # the previous distance's dK/dV for my keys has arrived
        if d == 0:
            if pairs:
                dk_own += dk_b
                dv_own += dv_b
            dkv_pending = None
        else:  # back to rank-d (it needs them iff I received its block); mine from rank+d iff it got mine
            bufs, reqs = shift.post(d, [dk_b, dv_b] if recv else [], f32 if send else [], back=True)
            dkv_pending = (bufs, reqs, send)
    land(dkv_pending)
    return dq, dk_own, dv_own


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group, causal: bool = True,
                   layout: str = "zigzag", softmax_scale=None, local_attn=None, cu_seqlens=None,
                   window_size=None) -> torch.Tensor:
    """Softmax attention of the local queries over the keys of every rank of ``group``.

    q ``[B, S/P, Hq, D]``, k/v ``[B, S/P, Hkv, D]`` (this rank's shard in ``layout``) ->
    out ``[B, S/P, Hq, D]``, differentiable in q, k, v. ``local_attn``: a
    :class:`~dist_attn.kernels.interface.SoftmaxKernel` (default ``dist_attn.kernels.flash_attn.softmax_kernel("auto")``)
    or a differentiable ``fn(q, k, v, *, causal, softmax_scale, q_offset, k_offset) -> (out, lse)``.
    ``cu_seqlens`` (global document offsets ``[0, ..., S]``, int32/int64, CPU recommended: a CUDA one is
    copied to the host once per call) and ``window_size`` (left window, causal only) restrict the keys
    each query sees; invisible blocks are neither computed nor sent (module docstring).
    Raises ``ValueError`` on every rank, before any communication, for an invalid input.
    """
    where = "ring_attention"
    world, scale, kernel = check_softmax_cp_inputs(where, q, k, v, group, causal, layout, softmax_scale,
                                                   local_attn, cu_seqlens, window_size)
    if cu_seqlens is None and window_size is None:
        return BlockwiseAttention.apply(q, k, v, _ring_forward, _ring_backward,
                                        (group, causal, layout, scale, kernel))
    cu = host_offsets(where, cu_seqlens, world * q.shape[1])
    check_same_on_ranks(where, cu, window_size, group)
    plan = _Plan(dist.get_rank(group), world, layout, causal, cu, window_size, q.shape[1])
    warm_up_p2p(group, q.device)  # the plan may skip some ranks' calls: not as the group's first p2p
    return BlockwiseAttention.apply(q, k, v, _masked_forward, _masked_backward,
                                    (group, causal, layout, scale, kernel, plan, cu_seqlens, window_size))
