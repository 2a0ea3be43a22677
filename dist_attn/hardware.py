"""Hardware profiles for the cost model (:mod:`dist_attn.cost_model`), the accounting that turns FLOPs and
bytes into time on a profile (:class:`PhaseBuilder`), topology detection, CPU calibration.

A profile holds the *achieved* rates a strategy meets, per device, not datasheet peaks: the local softmax
kernel, the chunked linear kernel, dense GEMMs (the einsums of LASP-2), elementwise memory passes
(merges, reorders), and the two link classes of a node cluster::

    intra   inside a node (NVLink; on CPU: gloo over loopback)      bytes/s per direction per device
    inter   across nodes (InfiniBand, one NIC per GPU, "rail")      bytes/s per direction per device

Every figure carries its source in a comment. The GPU rates are anchors from published measurements
(FlashAttention-2 on H100, fla's linear-vs-flash ratio, NCCL bus bandwidth), not measured here: this
machine has no GPU. ``cpu-gloo`` was measured on the machine the tests run on with :func:`calibrate_cpu`
(``python -m dist_attn.hardware``), and is only meant for that kind of machine (2 busy cores).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Optional

log = logging.getLogger("dist_attn.cost_model")


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    gpus_per_node: int        # devices per node (the default when the topology is not given)
    peak_flops: float         # dense bf16 datasheet peak per device (for MFU, not for time)
    softmax_flops: float      # achieved FLOP/s of the local flash kernel, fwd and bwd (FLOPs as in background.md)
    linear_flops: float       # achieved FLOP/s of the chunked linear kernel, 4·B·H·N·D·(C+D) convention
    gemm_flops: float         # achieved FLOP/s of large GEMMs/einsums (LASP-2 states, MLP in simulate.py)
    mem_bw: float             # bytes/s moved (read + write) by elementwise torch ops
    intra_bw: float           # bytes/s per direction per device inside a node
    inter_bw: float           # bytes/s per direction per device across nodes
    intra_latency: float      # s per collective step inside a node
    inter_latency: float      # s per collective step across nodes
    kernel_overhead: float    # s per local kernel call (launch on GPU, Python tiling on CPU)
    tile: int                 # causal tile edge of the local kernel (diagonal tiles cost in full)
    overlap: bool = True      # can a transfer run under compute (False: every transfer is exposed)
    cores: Optional[int] = None  # CPU only: ranks of a node share this many cores
    # per collective kind, a multiplier on the link bandwidth (gloo's collectives are slower than its p2p)
    kind_bw: tuple = (("p2p", 1.0), ("all_gather", 1.0), ("reduce_scatter", 1.0), ("all_to_all", 1.0))

    def share(self, ranks_per_node: int) -> float:
        """Fraction of a device's compute/memory rate one rank gets (CPU ranks share ``cores``)."""
        return 1.0 if self.cores is None else min(1.0, self.cores / max(1, ranks_per_node))

    def bw(self, kind: str, inter: bool) -> float:
        return (self.inter_bw if inter else self.intra_bw) * dict(self.kind_bw)[kind]


H100_SXM = HardwareProfile(
    name="h100-sxm", gpus_per_node=8,
    peak_flops=989e12,            # H100 SXM bf16 dense, NVIDIA datasheet
    softmax_flops=308e12,         # FlashAttention-2, fwd+bwd, causal, D=128, 8K (background.md anchor)
    # fla: chunked linear attention fwd+bwd at 16K is 5.3x faster than FA2 (background.md). At 16K, D=128,
    # C=64 the FLOP ratio is (3.5·4·N·D·0.5)/(3·4·D·(C+D)) = 7·16384/(12·192) = 49.8, so the linear kernel
    # reaches 308e12 · 5.3 / 49.8 = 32.8e12 (memory bound, as expected for C=64).
    linear_flops=32.8e12,
    gemm_flops=600e12,            # ~60% of peak, typical large bf16 GEMM on H100 (cuBLAS)
    mem_bw=2.6e12,                # HBM3 3.35 TB/s datasheet; elementwise torch kernels reach ~80%
    intra_bw=370e9,               # NVLink 4: 450 GB/s/dir nominal; NCCL reaches ~370 GB/s bus bandwidth
    inter_bw=48e9,                # InfiniBand NDR 400 Gb/s = 50 GB/s line rate, ~48 GB/s achieved per NIC
    intra_latency=10e-6,          # NCCL small-message latency inside a node (order of magnitude)
    inter_latency=20e-6,          # NCCL small-message latency across IB (order of magnitude)
    kernel_overhead=10e-6,        # launch + Python per kernel call
    tile=128,                     # FA2/our Triton BLOCK_M
)

# H200: the same GH100 compute and NVLink 4 as H100 SXM (989 TF bf16 dense, 450 GB/s/dir), more and faster
# memory (141 GB HBM3e, 4.8 TB/s datasheet), DGX H200 nodes with 8x ConnectX-7 400 Gb/s. Only the memory-bound
# rates change: elementwise passes and the linear kernel, scaled by 4.8/3.35 (an assumption, not a measurement).
H200_SXM = replace(H100_SXM, name="h200-sxm", mem_bw=2.6e12 * 4.8 / 3.35, linear_flops=32.8e12 * 4.8 / 3.35)

# A100 SXM 80GB (the LASP-2 paper's cluster: DGX-A100, 8 GPUs/node): 312 TF bf16 dense (datasheet);
# FA2 reaches ~190 TF fwd+bwd causal D=128 (FlashAttention-2 paper, ~60% of peak); the linear kernel keeps
# the H100 ratio to FA2 (32.8/308); NVLink 3 300 GB/s/dir nominal, NCCL ~230 GB/s; HDR 200 Gb/s per NIC
# ~24 GB/s; HBM2e 2.0 TB/s datasheet.
A100_SXM = replace(H100_SXM, name="a100-sxm", peak_flops=312e12, softmax_flops=190e12,
                   linear_flops=190e12 * 32.8 / 308, gemm_flops=200e12, mem_bw=1.6e12,
                   intra_bw=230e9, inter_bw=24e9)

# Measured on this project's CI machine (2 cores, x86_64, shared with other jobs; load average 3-6 while
# measuring) with calibrate_cpu(): torch CPU kernels, one thread per rank, gloo over loopback at P=2.
# Every figure is a best-of-N under load, so timings on an idle machine come out faster; use the profile
# for ratios (between strategies, across sequence lengths), not absolute predictions.
CPU_GLOO = HardwareProfile(
    name="cpu-gloo", gpus_per_node=64, peak_flops=60e9,
    softmax_flops=55e9,           # dist_attn.kernels.flash_attn torch backend, B=1 H=8 D=64, S=1-2K, fwd ~57 / bwd ~63 GF/s
    linear_flops=15e9,            # dist_attn.kernels.lightning_attn torch backend, B=2 H=8 D=64: 35 GF/s at S=256 falling
                                  # to 12 GF/s at S >= 2048 (its per-chunk states leave the cache)
    gemm_flops=33e9,              # torch.einsum of the LASP-2 state products, [2, 1024, 8, 64] operands
    mem_bw=40e9,                  # x - y on 1-8 MiB fp32 (60-90 GB/s idle, in cache); 64 MiB fresh tensors
                                  # drop to ~5 GB/s (page faults), which these sizes do not reach
    intra_bw=1.7e9, inter_bw=1.7e9,   # gloo isend/irecv, 1-4 MiB messages, loopback TCP
    intra_latency=0.2e-3, inter_latency=0.2e-3,   # gloo round trip of an empty message at P=2
    kernel_overhead=0.5e-3,       # Python per local kernel call (tile loop setup, reshapes)
    tile=256,                     # torch kernel tile for B·Hq = 8 (kernels/flash_attn/torch_kernel._block_size)
    overlap=False,                # 2 cores for P compute threads + gloo's threads: nothing hides anything
    cores=2,
    # gloo collectives at 1-4 MiB, P=2: all_gather 0.4-1.0 GB/s, all_to_all 0.2-0.4 GB/s (p2p: 1.5-2.1)
    kind_bw=(("p2p", 1.0), ("all_gather", 0.35), ("reduce_scatter", 0.35), ("all_to_all", 0.25)),
)


@dataclass(frozen=True)
class Phase:
    """Forward or backward of one layer on the bottleneck rank."""
    flops: float          # FLOPs by the convention above (causal halving applied)
    sent: dict            # collective kind -> bytes this rank sends (== CommRecorder.sent)
    calls: dict           # collective kind -> collective calls (== CommRecorder.calls)
    intra: float          # bytes over NVLink / inter over IB, bottleneck rank
    inter: float
    steps: int            # collective rounds, each paying a latency
    compute_s: float      # kernels + memory passes
    comm_s: float         # transfers, if nothing overlapped
    time_s: float         # predicted wall time


@dataclass
class PhaseBuilder:
    """Accumulates the forward or backward of one layer on the bottleneck rank: FLOPs, bytes per
    collective kind, link classes, and (compute, transfer) segments that overlap or add up.

    Link split of a collective over the CP ranks ``members`` (numbered node by node, ``gpn`` per node),
    for the rank that limits it: all inside one node -> NVLink; a P2P ring spanning nodes -> the
    boundary rank sends everything over its one NIC; an all-to-all -> (m-1)/(n-1) of the bytes to the
    m-1 peers of its node, the rest over its NIC; NCCL ring all-gather/reduce-scatter -> striped over
    one channel per NIC of the node, 1/m of the bytes over IB. Time: max(intra/intra_bw,
    inter/inter_bw) + one latency per round.
    """
    hw: HardwareProfile
    gpn: int
    share: float
    flops: float = 0.0
    sent: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)
    intra: float = 0.0
    inter: float = 0.0
    steps: int = 0
    compute_s: float = 0.0
    comm_s: float = 0.0
    time_s: float = 0.0

    def kernel(self, flops: float, work: float, rate: float, calls: int = 1) -> float:
        """Record ``flops`` (convention) and return the time of ``work`` effective FLOPs at ``rate``."""
        self.flops += flops
        return work / (rate * self.share) + calls * self.hw.kernel_overhead

    def mem(self, nbytes: float) -> float:
        return nbytes / (self.hw.mem_bw * self.share)

    def comm(self, kind: str, sent: int, members: list, calls: int = 1, rounds: int = 1) -> float:
        """Record one collective of ``sent`` bytes over the CP ranks ``members``; return its time."""
        self.sent[kind] = self.sent.get(kind, 0) + int(sent)
        self.calls[kind] = self.calls.get(kind, 0) + calls
        first = members[0] // self.gpn
        m_loc = sum(1 for m in members if m // self.gpn == first)
        n = len(members)
        if m_loc == n:
            intra, inter = sent, 0.0
        elif kind == "p2p":
            intra, inter = 0.0, sent
        elif kind == "all_to_all":
            intra, inter = sent * (m_loc - 1) / (n - 1), sent * (n - m_loc) / (n - 1)
        else:  # NCCL ring collectives, one channel per NIC of the node
            intra, inter = sent * (m_loc - 1) / m_loc, sent / m_loc
        self.intra += intra
        self.inter += inter
        self.steps += rounds
        lat = self.hw.inter_latency if inter else self.hw.intra_latency
        t = max(intra / (self.hw.bw(kind, False) * self.share), inter / (self.hw.bw(kind, True) * self.share))
        return t + rounds * lat

    def seg(self, compute_s: float, comm_s: float = 0.0, overlap: bool = True) -> None:
        """A segment of compute and transfer; ``overlap``: the transfer runs under the compute (if the
        profile overlaps at all), else they add up."""
        self.compute_s += compute_s
        self.comm_s += comm_s
        self.time_s += max(compute_s, comm_s) if overlap and self.hw.overlap else compute_s + comm_s

    def done(self) -> Phase:
        return Phase(self.flops, dict(self.sent), dict(self.calls), self.intra, self.inter, self.steps,
                     self.compute_s, self.comm_s, self.time_s)


PROFILES = {p.name: p for p in (H100_SXM, H200_SXM, A100_SXM, CPU_GLOO)}
_ALIASES = {"h100": "h100-sxm", "h200": "h200-sxm", "a100": "a100-sxm", "cpu": "cpu-gloo"}


def get_profile(profile) -> HardwareProfile:
    """A :class:`HardwareProfile`, a name in :data:`PROFILES` (or h100/h200/a100/cpu), or ``"auto"``
    (from ``torch.cuda.get_device_name()``; ``cpu-gloo`` without a GPU)."""
    if isinstance(profile, HardwareProfile):
        return profile
    if profile == "auto":
        import torch
        if not torch.cuda.is_available():
            return CPU_GLOO
        name = torch.cuda.get_device_name().upper()
        for key in ("H200", "H100", "A100"):
            if key in name:
                return PROFILES[_ALIASES[key.lower()]]
        log.warning("cost model: no profile for GPU %r, using h100-sxm", name)
        return H100_SXM
    key = _ALIASES.get(profile, profile)
    if key not in PROFILES:
        raise ValueError(f"get_profile: expected a HardwareProfile or one of {sorted(PROFILES) + sorted(_ALIASES)} "
                         f"or 'auto', got {profile!r}. Fix: pass e.g. profile='h100' or build a HardwareProfile.")
    return PROFILES[key]


def detect_gpus_per_node() -> tuple[Optional[int], str]:
    """(GPUs per node, where it came from): NVML device count if NVML loads, else ``LOCAL_WORLD_SIZE``
    (set by torchrun), else ``(None, "unknown")``."""
    try:
        import pynvml  # nvidia-ml-py
        pynvml.nvmlInit()
        try:
            n = int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
        if n > 0:
            return n, "NVML"
    except Exception:  # noqa: BLE001 - no driver, no library: fall through
        pass
    env = os.environ.get("LOCAL_WORLD_SIZE")
    if env and env.isdigit() and int(env) > 0:
        return int(env), "LOCAL_WORLD_SIZE"
    return None, "unknown"


def _best(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def calibrate_cpu(seq: int = 1024, heads: int = 8, head_dim: int = 64) -> dict:
    """Measure the single-thread rates of :data:`CPU_GLOO` on this machine (no gloo part: run
    ``benchmarks.harness`` for collectives). Returns a dict of the fields it measured."""
    import torch
    from dist_attn.kernels.flash_attn import softmax_kernel
    from dist_attn.kernels.lightning_attn import linear_kernel

    torch.set_num_threads(1)
    sk, lk = softmax_kernel("torch"), linear_kernel("torch")
    q, k, v = (torch.randn(1, seq, heads, head_dim) for _ in range(3))
    kw = dict(causal=False, softmax_scale=None, q_offset=0, k_offset=0)
    flops = 4.0 * heads * seq * seq * head_dim                      # non-causal forward
    t_f = _best(lambda: sk.fwd(q, k, v, **kw))
    out, lse = sk.fwd(q, k, v, **kw)
    t_b = _best(lambda: sk.bwd(out, q, k, v, out, lse, **kw))
    lq, lk_, lv = (torch.randn(2, seq, heads, head_dim) for _ in range(3))
    t_l = _best(lambda: lk.fwd(lq, lk_, lv, decay=None, initial_state=None, scale=None), reps=3)
    t_g = _best(lambda: torch.einsum("blhk,blhv->bhkv", lq, lv))
    x, y = torch.randn(2 ** 20), torch.randn(2 ** 20)          # 4 MiB each
    t_m = _best(lambda: x - y)
    return {"softmax_flops": 3.5 * flops / (t_f + t_b),
            "linear_flops": 4.0 * 2 * heads * seq * head_dim * (64 + head_dim) / t_l,
            "gemm_flops": 2.0 * 2 * heads * seq * head_dim * head_dim / t_g,
            "mem_bw": 3 * x.numel() * 4 / t_m}


if __name__ == "__main__":
    for key, val in calibrate_cpu().items():
        print(f"{key:>14}: {val:.3g}   (profile: {getattr(CPU_GLOO, key):.3g})")
