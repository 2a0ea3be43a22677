"""Cost model of the CP strategies: FLOPs, bytes per link class, collective steps, predicted time.

For one attention layer on one rank of a CP group of P ranks (B batch, N global tokens, Hq/Hkv heads,
D head dim, b bytes per element, sl = N/P local tokens, C = N/(2P) zigzag chunk)::

    strategy        bytes sent forward                 bytes sent backward                      rounds f / b
    zigzag_ring     2(P-1)/P·B·N·Hkv·D·b  (p2p)         2(P-1)/P·B·N·Hkv·D·(b+4) (K/V; fp32 dK/dV) P-1 / 2(P-1)
    allgather       2(P-1)/P·B·N·Hkv·D·b  (all_gather)  that + 2(P-1)/P·B·N·Hkv·D·4 (reduce_scatter)  1 / 2
    ulysses         (P-1)/P²·B·N·D·b·(2Hq + 2Hkv')      the same (dout in; dq, dk, dv out)           2 / 2
    usp(U, R)       (U-1)/(U·P)·B·N·D·b·(2Hq + 2Hkv')  all-to-all over U, plus the ring over R with
                    Hkv'/U heads: 2(R-1)/R·B·N·(Hkv'/U)·D·b forward, ·(b+4) backward   2+(R-1) / 2+2(R-1)
    lasp2           (P-1)·c·B·H·Dk·Dv·4  (fp32 states; c = 2 zigzag, 1 contiguous chunks per rank)  1 / 1
    linear_ulysses  (P-1)/P²·B·N·b·H·(2Dk + 2Dv)                                                  2 / 2
    delta_state     (P-1)·c·B·H·Dk·(Dk+Dv)·4  (maps [b | A])   (P-1)·c·B·H·Dk·Dv·4 (state grads)   1 / 1
    delta_ulysses   (P-1)/P²·B·N·H·(b·(2Dk + 2Dv + 1) + 4)  the same (g: fp32, own call unless b=4) 2(3) / 2(3)

``delta_*`` are the Gated DeltaNet (``D``) layers' two forms of ``parallel.linear_cp`` (``lasp2`` = state
passing through :func:`dist_attn.gated_delta.gated_delta_attention`, ``ulysses`` = all-to-all head
parallelism, :func:`dist_attn.dispatch.delta_attention`); Dv is ``AttnShape.v_head_dim``. The state form
runs the local kernel at value width Dv + Dk and its gather waits for it (not overlapped), then every rank
scans the n = c·P chunk maps; the all-to-all form is capped by the head count (H % P == 0) and its two
all-to-alls are exposed.

Hkv' = max(Hkv, P) for Ulysses (KV heads replicated when Hkv < P; U for USP). The bytes are exactly what
:class:`dist_attn.comm.CommRecorder` counts (tests/test_cost_model.py asserts equality).

FLOPs per rank: softmax forward 4·B·Hq·sl·N·D, x0.5 causal (convention; the *time* charges whole
diagonal tiles: a causal sq x sq block costs (n+1)/(2n) of the full block with n = sq/tile tiles);
backward 2.5x forward. Contiguous causal is unbalanced: FLOPs and time are those of the busiest
(last) rank; zigzag is balanced. Chunked linear: forward 4·B·H·sl·D·(C+D) (C = 64, no causal halving), backward
2x; LASP-2 adds its state einsums (2·B·H·sl·D² each: M, inter, and in backward dS_in, dq, dk, dv).

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

import logging
from dataclasses import dataclass
from typing import Optional

from dist_attn.checks import fail as _fail  # ValueError: "<where>: expected ..., got .... Fix: ..."
from dist_attn.hardware import Phase, PhaseBuilder, detect_gpus_per_node, get_profile
from dist_attn.plan import head_split_ok

log = logging.getLogger("dist_attn.cost_model")

STRATEGIES = ("zigzag_ring", "allgather", "ulysses", "usp", "lasp2", "linear_ulysses", "delta_state",
              "delta_ulysses")
MODEL_ONLY = ("lasp1", "linear_ring")
LINEAR = ("lasp2", "linear_ulysses", "lasp1", "linear_ring", "delta_state", "delta_ulysses")
DELTA = ("delta_state", "delta_ulysses")
LABELS = {"linear_ulysses": "ulysses", "delta_state": "lasp2", "delta_ulysses": "ulysses"}  # -> linear_cp
MERGE_BYTES = 56  # fp32 bytes per output element per merge_into (o1-o2, w·(), o1-(), zeros_like, where, copy_)
CHUNK = 64        # chunk of the local linear kernel




@dataclass(frozen=True)
class AttnShape:
    """One attention layer: global sequence ``seq_len`` of ``batch`` sequences, q ``[B, N, heads, D]``,
    k/v ``[B, N, kv_heads, D]``, ``dtype_bytes`` per element."""
    seq_len: int
    heads: int
    kv_heads: int
    head_dim: int
    batch: int = 1
    dtype_bytes: int = 2
    causal: bool = True
    layout: str = "zigzag"
    cu_seqlens: Optional[tuple] = None
    """Packed documents: global offsets ``(0, e_1, ..., seq_len)`` (softmax strategies; see ``_masked``)."""
    window_size: Optional[int] = None
    """Sliding window W (causal): a query sees keys p - W .. p."""
    v_head_dim: int = 0
    """Value head dim Dv of a Gated DeltaNet layer (delta_* strategies); 0: ``head_dim``."""

    @property
    def dv(self) -> int:
        return self.v_head_dim or self.head_dim

    def __post_init__(self):
        for name in ("seq_len", "heads", "kv_heads", "head_dim", "batch"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                _fail("AttnShape", f"{name} a positive int", repr(val), f"pass {name} >= 1")
        if self.dtype_bytes not in (2, 4, 8):
            _fail("AttnShape", "dtype_bytes in (2, 4, 8)", repr(self.dtype_bytes), "2 for bf16/fp16, 4 for fp32")
        if self.heads % self.kv_heads:
            _fail("AttnShape", "kv_heads dividing heads (GQA/MQA)", f"heads={self.heads}, kv_heads={self.kv_heads}",
                  "choose kv_heads dividing heads")
        if self.layout not in ("zigzag", "contiguous"):
            _fail("AttnShape", "layout 'zigzag' or 'contiguous'", repr(self.layout), "pass layout='zigzag'")


@dataclass(frozen=True)
class StrategyCost:
    strategy: str
    cp: int
    ulysses_degree: int
    gpus_per_node: int
    fwd: Phase
    bwd: Phase

    @property
    def time_s(self) -> float:
        return self.fwd.time_s + self.bwd.time_s

    @property
    def sent(self) -> int:
        return sum(self.fwd.sent.values()) + sum(self.bwd.sent.values())


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


def _masked(phases: list, strategy: str, s: AttnShape, cp: int) -> list:
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


def choose_softmax_masked(shape: AttnShape, cp: int, *, gpus_per_node: int, profile="auto") -> tuple:
    """``parallel.softmax_cp=auto`` with packed documents or a window: the valid softmax strategy with
    the lowest predicted time on ``shape`` (its ``cu_seqlens`` / ``window_size``) -> ``(name,
    ulysses_degree, reason)``, like :func:`choose_strategy`."""
    hw = get_profile(profile)
    ok, _ = candidates("softmax", shape, cp, gpus_per_node)
    costs = sorted((strategy_cost(n, shape, cp, profile=hw, gpus_per_node=gpus_per_node, ulysses_degree=u)
                    for n, u in ok), key=lambda c: c.time_s)
    docs = 0 if shape.cu_seqlens is None else len(shape.cu_seqlens) - 1
    ranking = " < ".join(f"{c.strategy}{f'(U={c.ulysses_degree})' if c.strategy == 'usp' else ''} "
                         f"{1e3 * c.time_s:.3g} ms" for c in costs)
    reason = (f"auto(softmax, N={shape.seq_len}, P={cp}, {docs} documents, window={shape.window_size}, "
              f"{hw.name}): {costs[0].strategy} -- predicted fwd+bwd per layer {ranking}")
    log.info(reason)
    return costs[0].strategy, costs[0].ulysses_degree, reason


def strategy_cost(strategy: str, shape: AttnShape, cp: int, *, profile="h100", gpus_per_node=None,
                  ulysses_degree=None) -> StrategyCost:
    """Predicted cost of ``strategy`` for one layer of ``shape`` on a CP group of ``cp`` ranks.

    ``gpus_per_node`` defaults to the profile's; ``ulysses_degree`` (usp only) defaults to
    min(G, largest valid divisor of P). Raises ValueError when the heads cannot be split that way."""
    hw = get_profile(profile)
    where = f"strategy_cost({strategy!r})"
    if strategy not in STRATEGIES + MODEL_ONLY:
        _fail(where, f"one of {STRATEGIES + MODEL_ONLY}", repr(strategy), "pick a strategy from that list")
    if not isinstance(cp, int) or cp < 1:
        _fail(where, "cp a positive int", repr(cp), "pass the CP group size")
    chunks = 2 * cp if shape.layout == "zigzag" else cp
    if shape.seq_len % chunks:
        _fail(where, f"seq_len divisible by {chunks} ({shape.layout} over P={cp})", str(shape.seq_len),
              f"pad the sequence to a multiple of {chunks}")
    gpn = gpus_per_node or hw.gpus_per_node
    linear = strategy in LINEAR
    if linear and shape.kv_heads != shape.heads:
        _fail(where, "kv_heads == heads for linear attention", f"{shape.kv_heads} vs {shape.heads}",
              "project k/v to all heads")
    u = 1
    if strategy in ("ulysses", "linear_ulysses", "delta_ulysses"):
        u = cp
    elif strategy == "usp":
        u = ulysses_degree or max(d for d in range(1, min(cp, gpn) + 1) if cp % d == 0 and valid_split(shape, d))
    if u > 1:
        _check_split(where, shape, u, cp, linear)
    phases = []
    for bwd in (False, True):
        ph = PhaseBuilder(hw, gpn, hw.share(min(cp, gpn)))
        if strategy == "zigzag_ring":
            _ring(ph, shape, cp, list(range(cp)), shape.heads, shape.kv_heads, shape.seq_len, bwd)
        elif strategy == "allgather":
            _allgather(ph, shape, cp, bwd)
        elif strategy in ("ulysses", "linear_ulysses", "usp"):
            _ulysses_like(ph, shape, cp, u, bwd, linear)
        elif strategy == "linear_ring":
            _linear_ring(ph, shape, cp, bwd)
        elif strategy == "delta_state":
            _delta_state(ph, shape, cp, bwd)
        elif strategy == "delta_ulysses":
            _delta_ulysses(ph, shape, cp, bwd)
        else:
            _lasp(ph, shape, cp, bwd, chain=strategy == "lasp1")
        phases.append(ph.done())
    if (shape.cu_seqlens is not None or shape.window_size is not None) and strategy not in LINEAR:
        phases = _masked(phases, strategy, shape, cp)
    return StrategyCost(strategy, cp, u, gpn, *phases)


def valid_split(shape: AttnShape, u: int) -> bool:
    """Can Ulysses split these heads over ``u`` ranks? The plan's rule (:func:`dist_attn.plan.head_split_ok`)."""
    return head_split_ok(shape.heads, shape.kv_heads, u)


def _check_split(where, shape: AttnShape, u: int, cp: int, linear: bool):
    if cp % u:
        divisors = [d for d in range(1, cp + 1) if cp % d == 0]
        _fail(where, f"ulysses_degree dividing P={cp}", str(u), f"pick U in {divisors}")
    if not valid_split(shape, u):
        _fail(where, f"heads split over Ulysses degree {u}: Hq % {u} == 0 and (Hkv % {u} == 0 or {u} % Hkv == 0)",
              f"Hq={shape.heads}, Hkv={shape.kv_heads}", "use a smaller Ulysses degree or a ring/all-gather strategy")


def candidates(layer_kind: str, shape: AttnShape, cp: int, gpn: int) -> tuple[list, list]:
    """([(strategy, ulysses_degree)] valid for the head split, [why others were left out])."""
    if layer_kind == "delta":
        if valid_split(shape, cp):
            return [("delta_state", 1), ("delta_ulysses", cp)], []
        return [("delta_state", 1)], [f"ulysses: H={shape.heads} not divisible by P={cp}"]
    if layer_kind == "linear":
        if valid_split(shape, cp):
            return [("lasp2", 1), ("linear_ulysses", cp)], []
        return [("lasp2", 1)], [f"ulysses: H={shape.heads} not divisible by P={cp}"]
    ok, skipped = [("zigzag_ring", 1), ("allgather", 1)], []
    if valid_split(shape, cp):
        ok.append(("ulysses", cp))
    else:
        skipped.append(f"ulysses: heads Hq={shape.heads}, Hkv={shape.kv_heads} do not split over P={cp}")
    for u in range(2, cp):
        if cp % u == 0 and u <= gpn and valid_split(shape, u):
            ok.append(("usp", u))
    return ok, skipped


def choose_strategy(layer_kind: str, *, heads: int, kv_heads: int, head_dim: int, seq_len: int, cp: int,
                    gpus_per_node=None, dtype_bytes: int = 2, profile="auto", batch: int = 1,
                    causal: bool = True, layout: str = "zigzag", v_head_dim: int = 0) -> tuple[str, int, str]:
    """``strategy=auto``: the valid strategy with the lowest predicted fwd+bwd time for one layer.

    Returns ``(name, ulysses_degree, reason)`` with ``name`` as :class:`dist_attn.context.CPContext`
    spells it (softmax: zigzag_ring | allgather | ulysses | usp; linear and delta (Gated DeltaNet, value
    head dim ``v_head_dim``, 0 = ``head_dim``): lasp2 (state passing) | ulysses) and the
    Ulysses degree (P for ulysses, U for usp, 1 otherwise). GPUs per node: the argument, else NVML,
    else ``LOCAL_WORLD_SIZE``, else the profile's default. Logs the one-line ``reason``."""
    where = "choose_strategy"
    if layer_kind not in ("softmax", "linear", "delta"):
        _fail(where, "layer_kind 'softmax', 'linear' or 'delta'", repr(layer_kind), "pass the attention layer type")
    if not isinstance(cp, int) or isinstance(cp, bool) or cp < 1:
        _fail(where, "cp a positive int", repr(cp), "pass the CP group size")
    hw = get_profile(profile)
    src = "argument"
    if gpus_per_node is None:
        gpus_per_node, src = detect_gpus_per_node()
        if gpus_per_node is None:
            gpus_per_node, src = hw.gpus_per_node, f"{hw.name} default"
    if not isinstance(gpus_per_node, int) or gpus_per_node < 1:
        _fail(where, "gpus_per_node a positive int or None", repr(gpus_per_node), "pass the GPUs per node")
    shape = AttnShape(seq_len, heads, kv_heads, head_dim, batch, dtype_bytes, causal, layout,
                      v_head_dim=v_head_dim)
    if layer_kind in ("linear", "delta") and kv_heads != heads:
        _fail(where, "kv_heads == heads for a linear layer", f"{kv_heads} vs {heads}", "pass kv_heads=heads")
    if cp == 1:
        name = "zigzag_ring" if layer_kind == "softmax" else "lasp2"
        return name, 1, f"auto({layer_kind}): cp=1, no context parallelism (the local kernel runs)"
    chunks = 2 * cp if layout == "zigzag" else cp
    if seq_len % chunks:
        _fail(where, f"seq_len divisible by {chunks} ({layout} over cp={cp})", str(seq_len),
              f"pad the sequence to a multiple of {chunks}")
    ok, skipped = candidates(layer_kind, shape, cp, gpus_per_node)
    costs = sorted((strategy_cost(n, shape, cp, profile=hw, gpus_per_node=gpus_per_node, ulysses_degree=u)
                    for n, u in ok), key=lambda c: c.time_s)
    best = costs[0]
    label = LABELS.get(best.strategy, best.strategy)
    nodes = -(-cp // gpus_per_node)
    ranking = " < ".join(f"{c.strategy}{f'(U={c.ulysses_degree})' if c.strategy == 'usp' else ''} "
                         f"{1e3 * c.time_s:.3g} ms" for c in costs)
    reason = (f"auto({layer_kind}, N={seq_len}, P={cp} on {nodes} node(s) of {gpus_per_node} [{src}], "
              f"Hq={heads}, Hkv={kv_heads}, D={head_dim}, {hw.name}): {label} -- predicted fwd+bwd per layer "
              f"{ranking}" + (f"; not valid: {'; '.join(skipped)}" if skipped else ""))
    log.info(reason)
    return label, best.ulysses_degree, reason


def choose_linear_cp(model_cfg, *, seq_len: int, cp: int, gpus_per_node=None, dtype_bytes: int = 2,
                     profile="auto", batch: int = 1, layout: str = "zigzag") -> tuple[str, str]:
    """``parallel.linear_cp=auto`` for a model whose pattern has Gated DeltaNet (``D``) layers: one choice
    covers the ``L``/``G`` and ``D`` layers, so each option (``lasp2`` = state passing, ``ulysses`` =
    all-to-all, valid only if every such layer's heads split over P) is charged the sum over the layers
    of its predicted fwd+bwd time; the cheapest wins. Returns ``(linear_cp, reason)``; logs the reason."""
    m = model_cfg
    kinds = {t: m.layer_types.count(t) for t in "LGD" if t in m.layer_types}
    if cp == 1 or not kinds:
        return "lasp2", "auto(linear): cp=1 or no linear layers, state passing (nothing to choose)"
    if gpus_per_node is None:
        gpus_per_node = detect_gpus_per_node()[0] or get_profile(profile).gpus_per_node
    common = dict(profile=profile, gpus_per_node=gpus_per_node)
    shapes = {t: (AttnShape(seq_len, m.lin_heads, m.lin_heads, m.lin_head_dim, batch, dtype_bytes, True, layout)
                  if t != "D" else AttnShape(seq_len, m.d_heads, m.d_heads, m.d_head_dim, batch, dtype_bytes, True,
                                             layout, v_head_dim=m.d_v_head_dim)) for t in kinds}
    names = {"lasp2": {"L": "lasp2", "G": "lasp2", "D": "delta_state"},
             "ulysses": {"L": "linear_ulysses", "G": "linear_ulysses", "D": "delta_ulysses"}}
    totals, skipped = {}, []
    for option, per_kind in names.items():
        bad = [t for t in kinds if option == "ulysses" and not valid_split(shapes[t], cp)]
        if bad:
            skipped.append(f"ulysses: heads of {'/'.join(bad)} layers do not split over P={cp}")
            continue
        totals[option] = sum(n * strategy_cost(per_kind[t], shapes[t], cp, **common).time_s for t, n in kinds.items())
    best = min(totals, key=totals.get)
    ranking = " < ".join(f"{o} {1e3 * t:.3g} ms" for o, t in sorted(totals.items(), key=lambda x: x[1]))
    reason = (f"auto(linear layers {''.join(f'{n}x{t}' for t, n in kinds.items())}, N={seq_len}, P={cp}, "
              f"{gpus_per_node} GPUs/node): {best} -- predicted fwd+bwd, all such layers: {ranking}"
              + (f"; not valid: {'; '.join(skipped)}" if skipped else ""))
    log.info(reason)
    return best, reason
