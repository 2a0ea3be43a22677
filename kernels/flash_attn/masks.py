"""Packed documents and sliding windows as per-row key intervals (shared by every backend).

Visibility rule (global positions: query row i is at p = q_offset + i, key j at t = k_offset + j)::

    visible(p, t)  iff  doc(p) == doc(t)  and (t <= p if causal)  and (p - W <= t if window W)

``cu_seqlens = [0, e_1, ..., S]`` (1-D int tensor, non-decreasing; empty documents are harmless) gives
doc(p) = the last d with cu[d] <= p. The rule is an interval per query row and, transposed, per key::

    row p sees keys   t in [lo(p), hi(p)),  lo = max(ds(p), p - W),   hi = min(de(p), p + 1 if causal)
    key t is seen by  p in [qlo(t), qhi(t)), qlo = max(ds(t), t if causal), qhi = min(de(t), t + W + 1)

with ds/de the start/end of the document. lo and hi never decrease with p (and qlo, qhi with t), and
lo(p+1) <= hi(p), so the keys seen by a run of rows [a, b) form ONE range [lo(a), hi(b-1)): a kernel
tile of rows visits only the key blocks of that range (the others are skipped, not masked), and a key
block with lo(last row) <= j0 and j1 <= hi(first row) needs no mask at all.

Everything here runs on the device of ``cu_seqlens`` (``torch.searchsorted``; no host sync) and returns
int32 intervals in LOCAL indices clamped to [0, Sk] (rows) or [0, Sq] (keys); an empty row has lo >= hi.
Positions are assumed to lie in [0, S) (the strategies guarantee it; :func:`check_mask_args` checks it
when ``cu_seqlens`` is on the CPU).
"""
from __future__ import annotations

import numbers

import torch

_BIG = 1 << 40  # "no bound" for positions (int64 arithmetic)


def has_mask(cu_seqlens, window_size) -> bool:
    """True when documents or a window restrict visibility beyond plain causal/full attention."""
    return cu_seqlens is not None or window_size is not None


def check_mask_args(op: str, q: torch.Tensor, sk: int, causal: bool, q_offset: int, k_offset: int,
                    cu_seqlens, window_size) -> None:
    """``ValueError`` (expected / got / fix) for a malformed ``cu_seqlens`` or ``window_size``. Value
    checks (starts at 0, non-decreasing, positions inside [0, S)) run only when ``cu_seqlens`` is on
    the CPU: reading a CUDA tensor would be a host sync."""
    if window_size is not None:
        if isinstance(window_size, bool) or not isinstance(window_size, numbers.Integral) or window_size < 0:
            raise ValueError(f"{op}: window_size expected None or an int >= 0, got {window_size!r}. "
                             f"Fix: pass the left window W (keys p - W .. p) or None.")
        if not causal:
            raise ValueError(f"{op}: window_size expected only with causal=True, got window_size="
                             f"{window_size} with causal=False. Fix: pass causal=True or window_size=None.")
    if cu_seqlens is None:
        return
    if (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2
            or cu_seqlens.dtype not in (torch.int32, torch.int64)):
        got = (f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, torch.Tensor)
               else type(cu_seqlens).__name__)
        raise ValueError(f"{op}: cu_seqlens expected a 1-D int32/int64 tensor [0, e_1, ..., S], got {got}. "
                         f"Fix: torch.tensor(offsets, dtype=torch.int32).")
    if cu_seqlens.device.type != "cpu" and cu_seqlens.device != q.device:
        raise ValueError(f"{op}: cu_seqlens expected on the CPU or on q's device {q.device}, got "
                         f"{cu_seqlens.device}. Fix: cu_seqlens.to(q.device) or keep it on the CPU.")
    if cu_seqlens.device.type == "cpu":
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"{op}: cu_seqlens expected to start at 0 and never decrease, got {cu[:8]}"
                             f"{'...' if len(cu) > 8 else ''}. Fix: pass cumulative document offsets.")
        end = max(q_offset + q.shape[1], k_offset + sk)
        if end > cu[-1] or min(q_offset, k_offset) < 0:
            raise ValueError(f"{op}: positions expected inside [0, S={cu[-1]}) of cu_seqlens, got queries "
                             f"[{q_offset}, {q_offset + q.shape[1]}) and keys [{k_offset}, {k_offset + sk}). "
                             f"Fix: cu_seqlens[-1] must be the global sequence length.")


def _doc_bounds(pos: torch.Tensor, cu_seqlens):
    """Start and end of the document of every position (int64), or +-_BIG without documents."""
    if cu_seqlens is None:
        return torch.full_like(pos, -_BIG), torch.full_like(pos, _BIG)
    cu = cu_seqlens.to(torch.int64)
    d = torch.searchsorted(cu, pos, right=True) - 1          # last start <= p (skips empty documents)
    d = d.clamp(0, cu.numel() - 2)
    return cu[d], cu[d + 1]


def row_intervals(sq: int, sk: int, q_offset: int, k_offset: int, causal: bool, cu_seqlens, window_size,
                  device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` int32 ``[Sq]``: local query row i sees local keys ``[lo_i, hi_i)`` (clamped to [0, Sk])."""
    dev = cu_seqlens.device if cu_seqlens is not None else (device or "cpu")
    p = torch.arange(sq, device=dev, dtype=torch.int64) + q_offset
    ds, de = _doc_bounds(p, cu_seqlens)
    lo, hi = ds, de
    if causal:
        hi = torch.minimum(hi, p + 1)
    if window_size is not None:
        lo = torch.maximum(lo, p - window_size)
    lo = (lo - k_offset).clamp_(0, sk).to(torch.int32)
    hi = (hi - k_offset).clamp_(0, sk).to(torch.int32)
    return (lo, hi) if device is None else (lo.to(device), hi.to(device))


def col_intervals(sq: int, sk: int, q_offset: int, k_offset: int, causal: bool, cu_seqlens, window_size,
                  device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(qlo, qhi)`` int32 ``[Sk]``: local key j is seen by local rows ``[qlo_j, qhi_j)`` (clamped to [0, Sq])."""
    dev = cu_seqlens.device if cu_seqlens is not None else (device or "cpu")
    t = torch.arange(sk, device=dev, dtype=torch.int64) + k_offset
    ds, de = _doc_bounds(t, cu_seqlens)
    qlo, qhi = ds, de
    if causal:
        qlo = torch.maximum(qlo, t)
    if window_size is not None:
        qhi = torch.minimum(qhi, t + window_size + 1)
    qlo = (qlo - q_offset).clamp_(0, sq).to(torch.int32)
    qhi = (qhi - q_offset).clamp_(0, sq).to(torch.int32)
    return (qlo, qhi) if device is None else (qlo.to(device), qhi.to(device))
