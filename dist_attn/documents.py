"""Packed documents and sliding windows for the context-parallel strategies: validation, host planning
and the cost of the visible work.

Vocabulary. The global sequence of S tokens packs documents given by ``cu_seqlens = [0, e_1, ..., S]``
(global offsets, the same on every rank and for every batch row; empty documents are allowed and
harmless). A query at global position p sees key t iff doc(p) == doc(t), t <= p when causal, and
p - W <= t for a window W (causal only). Equivalently p sees the key interval [lo(p), hi(p))::

    lo(p) = max(doc_start(p), p - W)      hi(p) = min(doc_end(p), p + 1 if causal else S)

Both never decrease with p and lo(p+1) <= hi(p), so a run of queries [a, b) sees exactly the keys
[lo(a), hi(b-1)): whether a (query chunk, key chunk) pair has any visible key is two bisections.

Worked example, S = 16, P = 2, zigzag (4 chunks of 4), documents [0, 3, 9, 16)::

    chunk:   0: 0..3      1: 4..7      2: 8..11     3: 12..15
    docs:    A A A B      B B B B      B C C C      C C C C
    rank 0 holds chunks 0, 3; rank 1 holds chunks 1, 2.
    causal, no window: rank 0's chunk 3 (doc C) needs keys [9, 16): chunk 2 (rank 1) and itself;
    rank 1's chunks 1, 2 need keys [3, 12): chunk 0 (rank 0) partly, and themselves.

Host planning (which ring exchanges to skip) needs the offsets as Python integers: a CPU
``cu_seqlens`` costs nothing; a CUDA one is copied to the host once per call (one device sync) by
:func:`host_offsets`, so keep ``cu_seqlens`` on the CPU (data loaders produce it there). All-gather,
Ulysses and USP's all-to-all do not plan on the host and accept either without a sync.

Checks. :func:`check_documents` raises ``ValueError`` (expected / got / fix) on every rank before any
collective: 1-D int32/int64 tensor on the CPU or q's device, starting at 0, ending at S, never
decreasing (value checks only for CPU tensors, or after the one host copy of the ring); window an int
>= 0 with causal=True. ``cu_seqlens`` that differ between ranks cannot be detected without talking:
under ``torch.autograd.set_detect_anomaly(True)`` :func:`check_same_on_ranks` adds one tiny all-reduce
(max and min of a checksum) and then every rank raises together.
"""
from __future__ import annotations

import numbers
from bisect import bisect_right
from typing import Optional, Sequence

import numpy as np
import torch

from dist_attn.checks import fail
from dist_attn.layout import check_layout, rank_ranges

Offsets = Optional[tuple]  # host cu_seqlens as a tuple of ints, or None (one document)


def check_documents(where: str, cu_seqlens, window_size, causal: bool, seq_len: int, device) -> None:
    """Validate ``cu_seqlens`` (global offsets of a sequence of ``seq_len`` tokens) and ``window_size``."""
    if window_size is not None:
        if isinstance(window_size, bool) or not isinstance(window_size, numbers.Integral) or window_size < 0:
            fail(where, "window_size None or an int >= 0", repr(window_size),
                 "pass the left window W (a query at p sees keys p - W .. p) or None")
        if not causal:
            fail(where, "window_size only with causal=True", f"window_size={window_size} with causal=False",
                 "pass causal=True or window_size=None")
    if cu_seqlens is None:
        return
    if not isinstance(cu_seqlens, torch.Tensor):
        fail(where, "cu_seqlens as a 1-D int32/int64 torch tensor", type(cu_seqlens).__name__,
             "torch.tensor(offsets, dtype=torch.int32)")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        fail(where, "cu_seqlens as a 1-D int32/int64 tensor [0, e_1, ..., S] with at least 2 entries",
             f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}", "torch.tensor(offsets, dtype=torch.int32)")
    if cu_seqlens.device.type != "cpu" and cu_seqlens.device != torch.device(device):
        fail(where, f"cu_seqlens on the CPU or on q's device {device}", str(cu_seqlens.device),
             "keep cu_seqlens on the CPU (recommended) or move it to q's device")
    if cu_seqlens.device.type == "cpu":
        check_offsets(where, tuple(cu_seqlens.tolist()), seq_len)


def check_offsets(where: str, cu: Sequence[int], seq_len: int) -> None:
    """Value checks of host offsets: start 0, end ``seq_len`` (the global S), never decrease."""
    short = f"{list(cu[:6])}{'...' if len(cu) > 6 else ''}{'' if len(cu) <= 6 else f' (last {cu[-1]})'}"
    if cu[0] != 0:
        fail(where, "cu_seqlens to start at 0", short, "prepend 0: offsets are cumulative document lengths")
    if cu[-1] != seq_len:
        fail(where, f"cu_seqlens to end at the global sequence length S={seq_len}", short,
             "the last offset is P x the local length; pass GLOBAL offsets, the same on every rank")
    bad = next((i for i in range(1, len(cu)) if cu[i] < cu[i - 1]), None)
    if bad is not None:
        fail(where, "cu_seqlens never decreasing", f"cu_seqlens[{bad}]={cu[bad]} < cu_seqlens[{bad - 1}]="
             f"{cu[bad - 1]}", "pass cumulative offsets (torch.cumsum of the lengths, with a leading 0)")


def host_offsets(where: str, cu_seqlens, seq_len: int) -> Offsets:
    """``cu_seqlens`` as host integers (validated); None stays None. A CUDA tensor costs one sync."""
    if cu_seqlens is None:
        return None
    cu = tuple(int(x) for x in cu_seqlens.tolist())  # .tolist() of a CUDA tensor: the documented sync
    check_offsets(where, cu, seq_len)
    return cu


def check_same_on_ranks(where: str, cu: Offsets, window_size, group) -> None:
    """Debug check (one small all-reduce): raise on every rank if the ranks disagree on the documents
    or the window. Runs only under ``torch.autograd.set_detect_anomaly(True)``."""
    if not torch.is_anomaly_enabled():
        return
    import torch.distributed as dist
    h = hash((cu, window_size)) & 0x3FFFFFFFFFFF  # deterministic for a tuple of ints (no str hashing)
    t = torch.tensor([h, -h], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    if int(t[0]) != -int(t[1]):
        fail(where, "the same cu_seqlens and window_size on every rank of the group",
             "different values on different ranks", "build cu_seqlens from the global batch, identically everywhere")


# --- host visibility (Python integers) ---------------------------------------------------------
def key_range(a: int, b: int, cu: Offsets, causal: bool, window_size, seq_len: int) -> tuple[int, int]:
    """Global keys ``[lo(a), hi(b-1))`` seen by the queries ``[a, b)`` (empty when lo >= hi)."""
    if b <= a:
        return 0, 0

    def bounds(p):
        if cu is None:
            return 0, seq_len
        d = min(max(bisect_right(cu, p) - 1, 0), len(cu) - 2)
        return cu[d], cu[d + 1]

    lo = bounds(a)[0]
    if window_size is not None:
        lo = max(lo, a - window_size)
    hi = bounds(b - 1)[1]
    if causal:
        hi = min(hi, b)
    return lo, hi


def ranges_meet(qr, kr, cu: Offsets, causal: bool, window_size, seq_len: int) -> bool:
    """Does any query of the global range ``qr`` see any key of ``kr``?"""
    lo, hi = key_range(qr[0], qr[1], cu, causal, window_size, seq_len)
    return max(lo, kr[0]) < min(hi, kr[1])


def visible_pairs(qr, kr, cu: Offsets, causal: bool, window_size, seq_len: int) -> int:
    """Number of visible (query, key) pairs between the global ranges ``qr`` and ``kr`` (numpy)."""
    p = np.arange(qr[0], qr[1], dtype=np.int64)
    if cu is None:
        ds, de = np.zeros_like(p), np.full_like(p, seq_len)
    else:
        c = np.asarray(cu, dtype=np.int64)
        d = np.clip(np.searchsorted(c, p, side="right") - 1, 0, len(c) - 2)
        ds, de = c[d], c[d + 1]
    lo = ds if window_size is None else np.maximum(ds, p - window_size)
    hi = np.minimum(de, p + 1) if causal else de
    return int(np.clip(np.minimum(hi, kr[1]) - np.maximum(lo, kr[0]), 0, None).sum())


def ring_need(cu: Offsets, causal: bool, window_size, world: int, layout: str, seq_len: int) -> list:
    """``need[r][src]``: do rank r's queries see any key held by rank src (the same table on every rank)."""
    ranges = [rank_ranges(seq_len, r, world, layout) for r in range(world)]
    return [[any(ranges_meet(qr, kr, cu, causal, window_size, seq_len) for qr in ranges[r] for kr in ranges[s])
             for s in range(world)] for r in range(world)]


def doc_cost(cu_seqlens, window_size, world: int, layout: str, causal: bool = True, seq_len: int | None = None,
             block_bytes: int | None = None) -> dict:
    """The work and ring traffic that survive skipping, per rank (a pure function for the cost model).

    ``cu_seqlens``: offsets (tensor or sequence of ints) or None for one document, in which case
    ``seq_len`` is required. ``block_bytes``: bytes of one rank's K and V (2·B·S/P·Hkv·D·b), to turn
    blocks into bytes. Returns:

    * ``pairs`` [P]: visible (query, key) pairs per rank (attention FLOPs are 4·D·Hq·B per pair);
      ``pairs_max_over_mean``: the load imbalance (1.0 = balanced);
    * ``ring_sends`` [P]: K/V blocks each rank sends in the forward ring (the exchanges of rank src's
      block to every rank that needs it; P-1 without skipping); ``ring_bytes_fwd`` [P] when
      ``block_bytes`` is given (backward: the same blocks again plus their fp32 dK/dV);
    * ``ring_offsets``: the ring distances that are exchanged at all.
    """
    check_layout(layout)
    if cu_seqlens is not None:
        cu = tuple(int(x) for x in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens))
        seq_len = cu[-1]
    else:
        cu = None
        assert seq_len is not None, "seq_len is needed without cu_seqlens"
    ranges = [rank_ranges(seq_len, r, world, layout) for r in range(world)]
    pairs = [sum(visible_pairs(qr, (0, seq_len), cu, causal, window_size, seq_len) for qr in ranges[r])
             for r in range(world)]
    need = ring_need(cu, causal, window_size, world, layout, seq_len)
    sends = [sum(need[(src + d) % world][src] for d in range(1, world)) for src in range(world)]
    offsets = sorted({(r - s) % world for r in range(world) for s in range(world) if r != s and need[r][s]})
    mean = sum(pairs) / world
    out = dict(pairs=pairs, pairs_max_over_mean=(max(pairs) / mean) if mean else 1.0, ring_sends=sends,
               ring_offsets=offsets)
    if block_bytes is not None:
        out["ring_bytes_fwd"] = [n * block_bytes for n in sends]
    return out
