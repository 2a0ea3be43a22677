"""Time of each CP strategy's forward and backward phase, for :mod:`dist_attn.cost_model`.

The bytes, FLOPs and rounds per strategy are tabulated in :mod:`dist_attn.cost_model`'s docstring (its
public API: ``AttnShape``, ``strategy_cost``, ``choose_strategy``); this module turns them into
:class:`dist_attn.hardware.Phase` records (compute, bytes per link class, collective calls, time).

Links. CP ranks are numbered node by node (G GPUs per node). A P2P ring is as slow as its slowest
hop: once it spans nodes, the rank at the node boundary sends everything over its one NIC. NCCL ring
all-gather/reduce-scatter stripe over G channels, one NIC each, so a rank's share over IB is 1/m of
what it sends (m = group members in its node). An all-to-all sends (m-1)/(n-1) of its bytes over NVLink,
the rest over the rank's NIC. A collective takes max(intra/intra_bw, inter/inter_bw) + latency.

Time (worst rank; ``profile.overlap`` False on CPU turns every max into a sum):

* ring: sum over the P steps of max(block compute + merge, K/V hop) (+ the dK/dV hop in backward,
  which overlaps the next step; the last one is exposed). Overlapped, as implemented.
* allgather: max(local block, all-gather) + remote blocks; backward + the reduce-scatter, exposed.
  Partly overlapped: only the local block (1/P of the work) hides the gather.
* ulysses / linear_ulysses: all-to-all + local op + all-to-all, NOT overlapped.
* usp: Ulysses all-to-alls (exposed) around a ring over R (overlapped).
* lasp2: state einsum + max(local kernel, all-gather) + combine/inter einsums: the gather hides under
  the local kernel, as implemented.

Memory passes (merges, reorders, packing) are charged at ``profile.mem_bw`` with per-element byte counts
read off the torch code (approximate: +-30%). Model-only strategies for benchmarks/simulate.py:
``lasp1`` (LASP-1: states passed along a serial P2P chain) and ``linear_ring`` (Ring Attention applied
to linear attention: K/V blocks circulate, each contributes q·(k^T v)).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from dist_attn.hardware import PhaseBuilder

if TYPE_CHECKING:
    from dist_attn.cost_model import AttnShape

MERGE_BYTES = 56  # fp32 bytes per output element per merge_into (o1-o2, w·(), o1-(), zeros_like, where, copy_)
CHUNK = 64        # chunk of the local linear kernel


def strategy_phase(ph: PhaseBuilder, strategy: str, s: AttnShape, cp: int, u: int, bwd: bool,
                   linear: bool) -> None:
    """Add the forward (``bwd`` False) or backward phase of ``strategy`` on shape ``s`` over ``cp`` ranks
    (Ulysses degree ``u``) to ``ph``."""
    if strategy == "zigzag_ring":
        _ring(ph, s, cp, list(range(cp)), s.heads, s.kv_heads, s.seq_len, bwd)
    elif strategy == "allgather":
        _allgather(ph, s, cp, bwd)
    elif strategy in ("ulysses", "linear_ulysses", "usp"):
        _ulysses_like(ph, s, cp, u, bwd, linear)
    elif strategy == "linear_ring":
        _linear_ring(ph, s, cp, bwd)
    elif strategy == "delta_state":
        _delta_state(ph, s, cp, bwd)
    elif strategy == "delta_ulysses":
        _delta_ulysses(ph, s, cp, bwd)
    else:
        _lasp(ph, s, cp, bwd, chain=strategy == "lasp1")


def _attn(ph: PhaseBuilder, b, h, sq, sk, d, diag: bool, bwd: bool) -> float:
    """Time of one local softmax block (q ``sq`` rows x ``sk`` keys); ``diag``: causal square block."""
    full = 4.0 * b * h * sq * sk * d * (2.5 if bwd else 1.0)
    if not diag:
        return ph.kernel(full, full, ph.hw.softmax_flops)
    n = -(-sq // ph.hw.tile)                        # tiles per side; the diagonal ones run in full
    return ph.kernel(0.5 * full, full * (n + 1) / (2 * n), ph.hw.softmax_flops)


def _ring(ph: PhaseBuilder, s: AttnShape, r: int, members: list, hq: int, hkv: int, n_ring: int, bwd: bool):
    """Ring attention over ``r`` ranks (``members``) on a ring shard of n_ring/r tokens, hq/hkv heads."""
    b, d, e = s.batch, s.head_dim, s.dtype_bytes
    sl = n_ring // r
    kv = b * sl * hkv * d                            # elements of K (or V) on a rank
    zig, causal = s.layout == "zigzag", s.causal
    hop = 0.0
    for t in range(r):
        if t == 0:                                   # own block: causal square (or full)
            c = _attn(ph, b, hq, sl, sl, d, causal, bwd)
            rows = sl
        elif causal and zig:                         # 2C x C unmasked on every rank
            c, rows = _attn(ph, b, hq, sl, sl // 2, d, False, bwd), sl  # (rows: worst rank, all q)
        else:                                        # full block (contiguous causal: the last rank)
            c, rows = _attn(ph, b, hq, sl, sl, d, False, bwd), sl
        qe = b * rows * hq * d
        c += ph.mem((8 + e) * qe + 2 * (8 + e) * kv) if bwd else ph.mem(MERGE_BYTES * qe + (e + 4) * qe * (e != 4))
        m = ph.comm("p2p", 2 * kv * e, members, calls=2) if t + 1 < r else 0.0
        if bwd and t >= 1:                           # dK/dV accumulator of this step leaves now
            dkv = ph.comm("p2p", 2 * kv * 4, members, calls=2)
            ph.seg(c, m + hop)                       # the previous step's dK/dV hop runs under this one
            hop = dkv
        else:
            ph.seg(c, m)
    if hop:
        ph.seg(0.0, hop, overlap=False)                            # the last dK/dV hop home is exposed


def _a2a(ph: PhaseBuilder, s: AttnShape, u: int, sl: int, heads_sum: int, extra_s: float = 0.0) -> None:
    """One packed all-to-all over ``u`` consecutive ranks of tensors with ``heads_sum`` heads in total
    (sl local tokens) and its packing copies (6b per element, 8b with the zigzag reorder): exposed."""
    if u == 1:  # a group of one rank: no collective, no copy
        return
    e, elems = s.dtype_bytes, s.batch * sl * heads_sum * s.head_dim
    t = ph.comm("all_to_all", (u - 1) * s.batch * sl * (heads_sum // u) * s.head_dim * e, list(range(u)))
    ph.seg(extra_s + ph.mem((8 if s.layout == "zigzag" else 6) * e * elems), t, overlap=False)


def _ulysses_like(ph: PhaseBuilder, s: AttnShape, p: int, u: int, bwd: bool, linear: bool):
    """Ulysses over ``u`` ranks (u = p: plain Ulysses; u < p: the USP Ulysses part around a ring)."""
    b, d, e, sl = s.batch, s.head_dim, s.dtype_bytes, s.seq_len // p
    hq = s.heads
    hkv = hq if linear else max(s.kv_heads, u)       # replicated KV heads travel
    qkv_heads, out_heads = hq + 2 * hkv, hq
    if bwd:                                           # dout in first, then dq/dk/dv out
        qkv_heads, out_heads = out_heads, qkv_heads
    rep = ph.mem(2 * 2 * e * b * sl * hkv * d) if (hkv != s.kv_heads and not bwd) else 0.0
    _a2a(ph, s, u, sl, qkv_heads, rep)
    n_loc = s.seq_len * u // p                        # tokens each rank sees after the all-to-all
    if u == p and linear:
        fl = 4.0 * b * (hq // u) * n_loc * d * (CHUNK + d) * (2.0 if bwd else 1.0)
        ph.seg(ph.kernel(fl, fl, ph.hw.linear_flops))
    elif u == p:
        ph.seg(_attn(ph, b, hq // u, n_loc, n_loc, d, s.causal, bwd))
    else:
        r = p // u
        _ring(ph, s, r, [j * u for j in range(r)], hq // u, hkv // u, s.seq_len, bwd)
    _a2a(ph, s, u, sl, out_heads)


def _allgather(ph: PhaseBuilder, s: AttnShape, p: int, bwd: bool):
    b, hq, hkv, d, e = s.batch, s.heads, s.kv_heads, s.head_dim, s.dtype_bytes
    sl = s.seq_len // p
    kv = b * sl * hkv * d
    members = list(range(p))
    gather = ph.comm("all_gather", (p - 1) * 2 * kv * e, members)
    local = _attn(ph, b, hq, sl, sl, d, s.causal, bwd) + ph.mem(4 * kv * e)   # + torch.stack([k, v])
    ph.seg(local, gather)
    # remote keys: (P-1)·sl (contiguous causal: the last rank; non-causal: every rank). Zigzag causal,
    # rank r: all q vs r·C keys + q_{2P-1-r} vs (2P-2-2r)·C keys = sl x (P-1)·C on every rank, 2 calls
    rem = (p - 1) * sl
    zig = s.causal and s.layout == "zigzag"
    c = _attn(ph, b, hq, sl, rem // 2 if zig else rem, d, False, bwd) + ph.hw.kernel_overhead
    q_elems = b * sl * hq * d
    reorder = 4 * p * kv * e + 4 * rem * b * hkv * d * e            # _to_sequence + _rows slice copies
    if bwd:  # fp32 dK/dV of every key: zeros, += per block, _from_sequence (gather + permute copies)
        reorder += 8 * p * kv + 2 * (8 + e) * rem * b * hkv * d + 32 * p * kv + 2 * (8 + e) * q_elems
        ph.seg(c + ph.mem(reorder))
        ph.seg(0.0, ph.comm("reduce_scatter", (p - 1) * 2 * kv * 4, members), overlap=False)
    else:
        ph.seg(c + ph.mem(reorder + MERGE_BYTES * q_elems * 3 + (e + 4) * q_elems * (e != 4)))


def _lasp(ph: PhaseBuilder, s: AttnShape, p: int, bwd: bool, chain: bool = False):
    """LASP-2 (one all-gather of fp32 states under the local kernel); ``chain``: LASP-1's serial P2P."""
    b, h, d, e = s.batch, s.heads, s.head_dim, s.dtype_bytes
    sl, c = s.seq_len // p, (2 if s.layout == "zigzag" else 1)
    acc = 8 if e == 8 else 4
    state = c * b * h * d * d * acc
    ein = 2.0 * b * h * sl * d * d                                 # one state einsum (M, inter, dS, ...)
    comb = 2.0 * c * p * c * b * h * d * d                          # prefix / suffix combine over P·c chunks
    kern = 4.0 * b * h * sl * d * (CHUNK + d) * (2.0 if bwd else 1.0)
    g = ph.hw.gemm_flops
    first = ph.kernel(ein, ein, g, calls=0)
    if chain:  # LASP-1 (its Algorithm 6): receive M_{t-1}, o_inter = q M_{t-1}, update, send: P-1 serial
        state = b * h * d * d * acc                                 # hops, each with one inter einsum
        ph.comm("p2p", state, list(range(p)))                       # each rank sends its state once
        nodes, hw = -(-p // ph.gpn), ph.hw
        chain_s = (p - nodes) * (state / (hw.intra_bw * ph.share) + hw.intra_latency) + \
            (nodes - 1) * (state / (hw.inter_bw * ph.share) + hw.inter_latency) + (p - 1) * ein / (g * ph.share)
        ph.seg(first + ph.kernel(kern, kern, ph.hw.linear_flops))
        ph.seg(0.0, chain_s, overlap=False)
    else:
        gather = ph.comm("all_gather", (p - 1) * state, list(range(p)))
        ph.seg(first)
        ph.seg(ph.kernel(kern, kern, ph.hw.linear_flops), gather)
    rest = (3 if bwd else 1) * ein + comb
    per_elem = (17 * e + 80) if bwd else (9 * e + 32)               # chunking, decay scaling, casts
    ph.seg(ph.kernel(rest, rest, g, calls=0) + ph.mem(per_elem * b * sl * h * d))


def _linear_ring(ph: PhaseBuilder, s: AttnShape, p: int, bwd: bool):
    """Ring Attention applied to linear attention: K/V circulate; each remote block adds q·(λ k^T v)."""
    b, h, d, e, sl = s.batch, s.heads, s.head_dim, s.dtype_bytes, s.seq_len // p
    kv = b * sl * h * d
    members = list(range(p))
    kern = 4.0 * b * h * sl * d * (CHUNK + d) * (2.0 if bwd else 1.0)
    ph.seg(ph.kernel(kern, kern, ph.hw.linear_flops))
    blk = 2 * 2.0 * b * h * sl * d * d * (2.5 if bwd else 1.0)   # k^T v then q·(.), per remote block
    for t in range(1, p):
        m = ph.comm("p2p", 2 * kv * e + (2 * kv * 4 if bwd else 0), members, calls=4 if bwd else 2)
        ph.seg(ph.kernel(blk, blk, ph.hw.gemm_flops) + ph.mem(12 * kv), m)


def _delta_flops(b: int, h: int, n: int, dk: int, dv: int) -> float:
    """Forward FLOPs of the chunked gated delta rule on n tokens (ModelConfig.flops_per_token's estimate)."""
    return 2.0 * b * h * n * (2 * CHUNK * (dk + dv) + 3 * dk * dv)


def _delta_state(ph: PhaseBuilder, s: AttnShape, p: int, bwd: bool):
    """State passing for the delta rule: widened local kernel, all-gather of the maps, scan, correction."""
    b, h, dk, dv, e = s.batch, s.heads, s.head_dim, s.dv, s.dtype_bytes
    sl, c = s.seq_len // p, (2 if s.layout == "zigzag" else 1)
    acc = 8 if e == 8 else 4
    g = ph.hw.gemm_flops
    kern = _delta_flops(b, h, sl, dk, dv + dk) * (2.0 if bwd else 1.0)    # value width Dv + Dk
    scan = 2.0 * c * p * b * h * dk * dk * (dk + (0 if bwd else dv))      # n maps composed (A^T R backward)
    corr = 2.0 * b * h * sl * dk * dv                                       # o(0, I)·S_in (or G_j backward)
    ph.seg(ph.kernel(kern, kern, ph.hw.linear_flops) + ph.mem((16 + 2 * e) * b * sl * h * (dk + dv)))
    if p > 1:
        sent = (p - 1) * c * b * h * dk * (dv if bwd else dk + dv) * acc
        ph.seg(0.0, ph.comm("all_gather", sent, list(range(p))), overlap=False)
    ph.seg(ph.kernel(scan + corr, scan + corr, g, calls=0))


def _delta_ulysses(ph: PhaseBuilder, s: AttnShape, p: int, bwd: bool):
    """All-to-all head parallelism for the delta rule: q|k|v|beta (+ g) in, the local kernel, out back."""
    b, h, dk, dv, e = s.batch, s.heads, s.head_dim, s.dv, s.dtype_bytes
    sl, members = s.seq_len // p, list(range(p))
    per_tok = (p - 1) * b * sl * (h // p)           # (token, head) pairs a rank sends away
    ins = [(2 * dk + dv + 1) * e + (4 if e == 4 else 0)] + ([] if e == 4 else [4])   # g packed when fp32
    outs = [dv * e]
    if bwd:
        ins, outs = outs, ins                       # dout in; dq, dk, dv, dbeta (, dg) out
    reorder = 8 if s.layout == "zigzag" else 6
    for width in ins:
        ph.seg(ph.mem(reorder * width * b * sl * h),
               ph.comm("all_to_all", per_tok * width, members), overlap=False)
    fl = _delta_flops(b, h // p, s.seq_len, dk, dv) * (2.0 if bwd else 1.0)
    ph.seg(ph.kernel(fl, fl, ph.hw.linear_flops))
    for width in outs:
        ph.seg(ph.mem(reorder * width * b * sl * h),
               ph.comm("all_to_all", per_tok * width, members), overlap=False)


def masked_phases(phases: list, strategy: str, s: AttnShape, cp: int) -> list:
    """Documents / window for a softmax strategy: the dense phases rescaled by what survives skipping
    (:func:`dist_attn.documents.doc_cost`, the ring's own host plan, on the bottleneck rank).

    * compute (every strategy): x f, f = max over ranks of visible pairs / max of the dense causal pairs
      (the kernels skip invisible key tiles; tile-edge waste is not modelled);
    * ring bytes and calls: x g, g = max over ranks of K/V blocks sent / (P-1) (skipped exchanges move
      nothing; backward's dK/dV go back for the same blocks). All-gather / Ulysses / USP move all bytes
      (g = 1): their masks are applied after the collective;
    * time: f·compute + g·comm - min(f, g)·(what overlap hid in the dense phase), exact when f = g.
    """
    import dataclasses
    from dist_attn.documents import doc_cost
    dense = doc_cost(None, None, cp, s.layout, s.causal, seq_len=s.seq_len)
    masked = doc_cost(s.cu_seqlens, s.window_size, cp, s.layout, s.causal, seq_len=s.seq_len)
    f = max(masked["pairs"]) / max(max(dense["pairs"]), 1)
    g = max(masked["ring_sends"]) / max(cp - 1, 1) if strategy == "zigzag_ring" else 1.0
    out = []
    for ph in phases:
        hidden = ph.compute_s + ph.comm_s - ph.time_s
        sent = {k: (int(round(v * g)) if k == "p2p" else v) for k, v in ph.sent.items()}
        calls = {k: (int(round(v * g)) if k == "p2p" else v) for k, v in ph.calls.items()}
        ring = g if strategy == "zigzag_ring" else 1.0
        out.append(dataclasses.replace(
            ph, flops=ph.flops * f, sent=sent, calls=calls, intra=ph.intra * ring, inter=ph.inter * ring,
            compute_s=ph.compute_s * f, comm_s=ph.comm_s * g,
            time_s=f * ph.compute_s + g * ph.comm_s - min(f, g) * hidden))
    return out
