"""A softmax-attention kernel backed by torch's own flash-attention ops, with our kernel for the rest.

Same contract as :mod:`dist_attn.kernels.flash_attn` (``fwd -> (out [B,Sq,Hq,D], lse fp32 [B,Hq,Sq])``,
``bwd(..., dlse=None) -> dq, dk, dv``, GQA, global positions q_offset/k_offset, packed documents
``cu_seqlens`` and a left window). torch ships FlashAttention-2 as ``aten._flash_attention_forward/
_backward``; both take and return the log-sum-exp the ring merge needs, and the backward accepts a
*merged* out/lse (it recomputes P = exp(s - lse) and delta = rowsum(dout * out), exactly our bwd), so
ring and all-gather use it through the kernel interface unchanged. The ops are called in their
varlen form: sequences packed [B*S, H, D] and cut into segments by ``cum_seq_q/cum_seq_k``.

Segments (built on the device from ``cu_seqlens``, no host sync). In a varlen segment with lq
queries and lk keys, FlashAttention-2 aligns causal masks and windows bottom-right: local query i
sees local key j iff j <= i + lk - lq (causal) and j >= i + lk - lq - W (left window W). Cut the
block's queries and keys at every document boundary; segment d holds the queries and keys of
document d inside the block. If both end at the same global position, bottom-right alignment is
exactly our rule t <= p, t >= p - W. Under causality no query of the block sees a key at or past
E = q_offset + Sq, so keys are cut at E too and the keys [E, k_offset + Sk) form one trailing
segment without queries. Then every document's query and key segments end together (min(doc end, E))
whenever k_offset + Sk >= E, and the varlen call is exact. Per batch row the segments are
    queries  clamp(cu, q_offset, E) - q_offset            (n entries, 0 .. Sq; then the empty trailer)
    keys     clamp(cu, k_offset, max(E, k_offset)) - k_offset   (.. then the trailing keys up to Sk)
for cu = cu_seqlens (n entries; a CPU ``cu_seqlens`` is first cut to the documents that meet the
block), repeated over the batch with offsets b*Sq, b*Sk. The op keeps per-segment buffers (about
128 rows of fp32 dQ per segment and head), so a block with more than (Sq + Sk) / 128 + 16 segments
per batch row goes to the fallback (a long device-resident ``cu_seqlens``). max_seqlen_q/k,
which must be host ints, are the upper bounds Sq and Sk (the op sizes its grid by them; segments are
shorter). A query segment with no visible key gets out 0 and lse +inf from FlashAttention: the lse
is mapped to our -inf, and -inf back to +inf before the backward (exp(s - inf) = 0, no NaN).

Fast path (:func:`fast_mode`) when all of these hold, else the ``fallback`` kernel (our Triton/torch):
  * CUDA tensors, fp16/bf16, head dim a multiple of 8 up to 256, Sq, Sk >= 1; no gradient into the
    LSE (``dlse`` None, backward);
  * no documents/window: the mask is full (not causal, or causal with every key visible to every
    row), or causal with k_offset + Sk >= q_offset + Sq (the diagonal block; keys past the block
    end become the trailing segment);
  * documents and/or a window: not causal (documents only, any block), causal with every key visible
    and no window (documents only), or causal with k_offset + Sk >= q_offset + Sq (the diagonal
    block, an all-gathered K/V); a window is causal-only by contract.
On CPU, ``fast_cpu=True`` routes the no-document full and diagonal cases through
``aten._scaled_dot_product_flash_attention_for_cpu`` (fp32/bf16; KV heads repeated for GQA), which
has no varlen form; ``fast_cpu="varlen"`` runs the CUDA code path on CPU tensors and needs a stand-in
for the two CUDA ops (the tests patch :func:`_op` with an fp64 emulation of their documented rule).

Verified on CPU (tests/test_sdpa_kernel.py): the selection, the segment construction against the
interval masks of :mod:`.masks` (every covered case, random documents/offsets/windows), the whole
varlen path (packing, segments, LSE layout and +-inf mapping, merged-LSE backward, GQA, trailing
keys) against the fp64 reference through the emulated ops, and the CPU flash op numerics.
Verified only on a GPU (tests/test_gpu_check.py, stage a of benchmarks/gpu_check.sh): that torch's
CUDA ops follow the rule above (bottom-right alignment, +inf lse and zero output for empty rows, zero
dK/dV for keys without queries, windows), and their numerics against fp64.
Every op is looked up with ``getattr`` so a torch without it falls back instead of failing; a torch
whose varlen LSE is [segments, H, max_q] (old FlashAttention) takes the fast path only without
documents or windows.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_attn.kernels.flash_attn.masks import has_mask
from dist_attn.kernels.interface import SoftmaxKernel

log = logging.getLogger("dist_attn.kernels")
_HALF = (torch.float16, torch.bfloat16)
_warned: set = set()
_LSE_2D: dict = {}


def _op(name: str):
    return getattr(torch.ops.aten, name, None)


@dataclass(frozen=True)
class FastPlan:
    """How torch's op serves one block: its ``is_causal`` flag, the left window, whether the block
    is cut into document segments, and ``k_end``: local keys [k_end, Sk) are invisible to every row."""
    is_causal: bool
    window: int | None = None
    segments: bool = False
    k_end: int = -1


def fast_mode(q, k, *, causal, q_offset, k_offset, cu_seqlens=None, window_size=None, dlse=None,
              cpu=False):
    """The :class:`FastPlan` for this call, or None when the fast path does not cover it.

    ``cpu``: False (CPU tensors never), True (the CPU flash op: no documents or windows, diagonal
    or full blocks), or "varlen" (CPU tensors take the CUDA-form path; tests with stand-in ops)."""
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    if dlse is not None or sq == 0 or sk == 0:
        return None
    masked = has_mask(cu_seqlens, window_size)
    varlen = q.device.type == "cuda" or (cpu == "varlen" and q.device.type == "cpu")
    if varlen:
        if q.dtype not in _HALF or d % 8 or d > 256 or _op("_flash_attention_forward") is None:
            return None
    elif not (cpu is True and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)
              and not masked and _op("_scaled_dot_product_flash_attention_for_cpu") is not None):
        return None
    end = q_offset + sq
    all_visible = not causal or k_offset + sk - 1 <= q_offset
    if not masked:
        if all_visible:
            return FastPlan(False, k_end=sk)
        if q_offset == k_offset and sq == sk:
            return FastPlan(True, k_end=sk)
        if varlen and k_offset + sk >= end:  # bottom-right aligned; keys past the block: a trailing segment
            return FastPlan(True, segments=k_offset + sk > end, k_end=max(end, k_offset) - k_offset)
        return None
    if cu_seqlens is not None and _block_docs(cu_seqlens, q_offset, k_offset, sq, sk).numel() - 1 > \
            (sq + sk) // 128 + MAX_EXTRA_SEGMENTS:
        return None  # too many segments per batch row: the op's per-segment buffers would dominate
    if all_visible and window_size is None:
        return FastPlan(False, segments=True, k_end=sk)
    if causal and k_offset + sk >= end:
        return FastPlan(True, window_size, segments=True, k_end=max(end, k_offset) - k_offset)
    return None


MAX_EXTRA_SEGMENTS = 16


def _block_docs(cu_seqlens, q_offset, k_offset, sq, sk):
    """``cu_seqlens`` cut to the documents that meet the block's span [lo, hi) = [min(q_offset,
    k_offset), max(q_offset + Sq, k_offset + Sk)) when it is on the CPU (free to read): [lo, the
    boundaries strictly inside, hi] gives the same segments minus empty ones. A device tensor is
    kept whole (reading it would be a host sync), so every global document is one segment."""
    if cu_seqlens.device.type != "cpu":
        return cu_seqlens
    lo, hi = min(q_offset, k_offset), max(q_offset + sq, k_offset + sk)
    c = cu_seqlens.to(torch.int64)
    return torch.cat([c.new_tensor([lo]), c[(c > lo) & (c < hi)], c.new_tensor([hi])])


def _packed(x):
    """[B, S, H, D] -> [B*S, H, D] (a view when x is contiguous)."""
    return x.contiguous().view(x.shape[0] * x.shape[1], *x.shape[2:])


def cum_seqs(plan: FastPlan, b: int, sq: int, sk: int, q_offset: int, k_offset: int, cu_seqlens, device):
    """``(cum_seq_q, cum_seq_k)`` int32 on ``device`` for the packed [B*Sq] queries and [B*Sk] keys
    (see the module docstring): per batch row one segment per document plus a trailing one."""
    if not plan.segments and plan.k_end == sk:  # one segment per batch row
        return (torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32, device=device),
                torch.arange(0, (b + 1) * sk, sk, dtype=torch.int32, device=device))
    end = q_offset + sq
    if cu_seqlens is None:  # one document covering the block
        cu = torch.arange(2, dtype=torch.int64, device=device) * max(end, k_offset + sk)
    else:
        cu = _block_docs(cu_seqlens, q_offset, k_offset, sq, sk).to(device=device, dtype=torch.int64)
    cq = cu.clamp(q_offset, end) - q_offset                      # [n]: 0 .. Sq
    ck = cu.clamp(k_offset, k_offset + plan.k_end) - k_offset    # [n]: 0 .. k_end (then keys up to Sk)
    rows = torch.arange(b, dtype=torch.int64, device=device)[:, None]
    cum_q = torch.cat([(cq[None, :] + rows * sq).flatten(), torch.full((1,), b * sq, dtype=torch.int64, device=device)])
    cum_k = torch.cat([(ck[None, :] + rows * sk).flatten(), torch.full((1,), b * sk, dtype=torch.int64, device=device)])
    return cum_q.to(torch.int32), cum_k.to(torch.int32)


def _window_kw(plan: FastPlan) -> dict:
    return {} if plan.window is None else dict(window_size_left=int(plan.window), window_size_right=0)


def _lse_2d(device) -> bool:
    """Whether this torch's varlen forward returns the unpadded LSE [H, total_q] (FlashAttention
    >= 2.6; older ones return [segments, H, max_q]). Probed once per device on a tiny problem (a
    shape query, no sync)."""
    if device not in _LSE_2D:
        t = torch.zeros(2, 1, 8, dtype=torch.float16, device=device)
        cu = torch.arange(3, dtype=torch.int32, device=device)
        _LSE_2D[device] = _op("_flash_attention_forward")(t, t, t, cu, cu, 1, 1, 0.0, False, False)[1].dim() == 2
    return _LSE_2D[device]


def _varlen_args(q, k, plan: FastPlan, q_offset, k_offset, cu_seqlens):
    """Shapes, the LSE layout of this torch's op and the segment offsets, shared by forward and backward."""
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    lse_2d = _lse_2d(q.device)
    if plan.segments and not lse_2d:
        raise RuntimeError("this torch's varlen flash LSE is [segments, H, max_q]: documents/windows unsupported")
    cu_q, cu_k = cum_seqs(plan, b, sq, sk, q_offset, k_offset, cu_seqlens, q.device)
    return b, sq, hq, d, sk, lse_2d, cu_q, cu_k


def _varlen_fwd(q, k, v, plan: FastPlan, scale, q_offset, k_offset, cu_seqlens):
    b, sq, hq, d, sk, lse_2d, cu_q, cu_k = _varlen_args(q, k, plan, q_offset, k_offset, cu_seqlens)
    out, lse = _op("_flash_attention_forward")(_packed(q), _packed(k), _packed(v), cu_q, cu_k, sq, sk, 0.0,
                                               plan.is_causal, False, scale=scale, **_window_kw(plan))[:2]
    lse = lse.view(hq, b, sq).transpose(0, 1) if lse_2d else lse[..., :sq]
    lse = lse.float().masked_fill(lse == float("inf"), float("-inf"))  # a row without keys: FA's +inf -> -inf
    return out.view(b, sq, hq, d), lse


def _varlen_bwd(dout, q, k, v, out, lse, plan: FastPlan, scale, q_offset, k_offset, cu_seqlens):
    b, sq, hq, d, sk, lse_2d, cu_q, cu_k = _varlen_args(q, k, plan, q_offset, k_offset, cu_seqlens)
    lse = lse.float().masked_fill(lse == float("-inf"), float("inf"))  # exp(s - inf) = 0 for rows without keys
    lse_fa = lse.transpose(0, 1).reshape(hq, b * sq) if lse_2d else lse
    rng = torch.empty(2, dtype=torch.int64, device=q.device)  # dropout 0: the RNG state is not read
    dq, dk, dv = _op("_flash_attention_backward")(
        _packed(dout.to(q.dtype)), _packed(q), _packed(k), _packed(v), _packed(out.to(q.dtype)),
        lse_fa.contiguous(), cu_q, cu_k, sq, sk, 0.0, plan.is_causal, rng, rng, scale=scale, **_window_kw(plan))
    dk, dv = dk.view(k.shape), dv.view(v.shape)
    if plan.k_end < sk:  # keys past the last query: the trailing segment has no queries
        dk[:, plan.k_end:] = 0
        dv[:, plan.k_end:] = 0
    return dq.view(q.shape), dk, dv


def _cpu_fwd(q, k, v, is_causal, scale):
    g = q.shape[2] // k.shape[2]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)))
    out, lse = _op("_scaled_dot_product_flash_attention_for_cpu")(qt, kt, vt, 0.0, is_causal, scale=scale)
    return out.transpose(1, 2).contiguous(), lse.float()


def _cpu_bwd(dout, q, k, v, out, lse, is_causal, scale):
    b, sk, hkv, d = k.shape
    g = q.shape[2] // hkv
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)))
    dq, dk, dv = _op("_scaled_dot_product_flash_attention_for_cpu_backward")(
        dout.to(q.dtype).transpose(1, 2), qt, kt, vt, out.to(q.dtype).transpose(1, 2), lse.float(), 0.0,
        is_causal, scale=scale)
    dk = dk.transpose(1, 2).reshape(b, sk, hkv, g, d).sum(3)  # GQA: sum over the repeated heads
    dv = dv.transpose(1, 2).reshape(b, sk, hkv, g, d).sum(3)
    return dq.transpose(1, 2).contiguous(), dk.to(k.dtype), dv.to(v.dtype)


def sdpa_softmax_kernel(fast_cpu: bool | str = False, fallback: SoftmaxKernel | None = None,
                        select=None, name: str | None = None) -> SoftmaxKernel:
    """The :class:`SoftmaxKernel` using torch's flash ops where they apply and ``fallback`` elsewhere
    (default: our kernel, Triton on CUDA and torch otherwise, resolved per call). ``fast_cpu``: see
    :func:`fast_mode`. ``select(q, plan, mask) -> bool`` (optional) may still send a covered call
    to the fallback (``auto``: the measured table, :class:`SelectTable`)."""
    if fallback is None:
        from dist_attn.kernels.flash_attn import ours_kernel
        fallback = ours_kernel()

    def _extra(cu_seqlens, window_size):
        return {k: v for k, v in (("cu_seqlens", cu_seqlens), ("window_size", window_size)) if v is not None}

    def _varlen(q):
        return q.is_cuda or fast_cpu == "varlen"

    def _plan(q, k, causal, softmax_scale, q_offset, k_offset, cu_seqlens, window_size, dlse=None):
        """The fast-path plan (None: our kernel) after the measured selection, and the softmax scale."""
        plan = fast_mode(q, k, causal=causal, q_offset=q_offset, k_offset=k_offset, cu_seqlens=cu_seqlens,
                         window_size=window_size, dlse=dlse, cpu=fast_cpu)
        if plan is not None and select is not None and not select(q, plan, mask_class(causal, cu_seqlens, window_size)):
            plan = None
        return plan, (q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale))

    def fwd(q, k, v, *, causal=False, softmax_scale=None, q_offset=0, k_offset=0, cu_seqlens=None, window_size=None):
        plan, scale = _plan(q, k, causal, softmax_scale, q_offset, k_offset, cu_seqlens, window_size)
        if plan is not None:
            try:
                if _varlen(q):
                    return _varlen_fwd(q, k, v, plan, scale, int(q_offset), int(k_offset), cu_seqlens)
                return _cpu_fwd(q, k, v, plan.is_causal, scale)
            except RuntimeError as exc:  # an op this torch build rejects: fall back, say so once
                _warn_once("fwd", exc)
        return fallback.fwd(q, k, v, causal=causal, softmax_scale=softmax_scale, q_offset=q_offset,
                            k_offset=k_offset, **_extra(cu_seqlens, window_size))

    def bwd(dout, q, k, v, out, lse, *, causal=False, softmax_scale=None, q_offset=0, k_offset=0, dlse=None,
            cu_seqlens=None, window_size=None):
        plan, scale = _plan(q, k, causal, softmax_scale, q_offset, k_offset, cu_seqlens, window_size, dlse)
        if plan is not None:
            try:
                if _varlen(q):
                    return _varlen_bwd(dout, q, k, v, out, lse, plan, scale, int(q_offset), int(k_offset),
                                       cu_seqlens)
                return _cpu_bwd(dout, q, k, v, out, lse, plan.is_causal, scale)
            except RuntimeError as exc:
                _warn_once("bwd", exc)
        return fallback.bwd(dout, q, k, v, out, lse, causal=causal, softmax_scale=softmax_scale, q_offset=q_offset,
                            k_offset=k_offset, dlse=dlse, **_extra(cu_seqlens, window_size))

    tag = {False: "", True: "cpu+", "varlen": "varlen+"}[fast_cpu]
    return SoftmaxKernel(name or f"sdpa_flash[{tag}{fallback.name}]", fwd, bwd)


# --- auto: our kernel or torch's, per case, from a measured table --------------------------------------
def mask_class(causal: bool, cu_seqlens, window_size) -> str:
    """The table's case of a call: "window", "docs", "causal" or "full"."""
    if window_size is not None:
        return "window"
    if cu_seqlens is not None:
        return "docs"
    return "causal" if causal else "full"


def device_slug(name: str) -> str:
    """File-name form of a device name: "NVIDIA H100 80GB HBM3" -> "nvidia_h100_80gb_hbm3"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


class SelectTable:
    """Measured winners per case, written by ``python -m benchmarks.kernels`` on a GPU as
    ``benchmarks/results/sdpa_select_<device>.json``::

        {"device": ..., "torch": ..., "rows": [{"mask": "causal", "D": 128, "dtype": "bfloat16",
          "S": 8192, "winner": "sdpa" | "ours", "ms": {"ours": .., "sdpa": ..}}, ...]}

    (fwd+bwd time of ``flash_attn`` vs ``sdpa_kernel``). A call takes the winner of the row with its
    mask class, head dim and dtype whose S is nearest to the call's Sq in log2; no such row: no opinion.
    """

    def __init__(self, rows: list[dict], source: str = ""):
        self.rows, self.source, self._memo = rows, source, {}

    def prefer_sdpa(self, mask: str, d: int, dtype: torch.dtype, s: int):
        key = (mask, d, dtype, s)
        if key not in self._memo:
            name = str(dtype).replace("torch.", "")
            cand = [r for r in self.rows if r["mask"] == mask and r["D"] == d and r["dtype"] == name]
            best = min(cand, key=lambda r: abs(math.log2(r["S"]) - math.log2(max(s, 1))), default=None)
            self._memo[key] = None if best is None else best["winner"] == "sdpa"
        return self._memo[key]

    @classmethod
    def load(cls, path) -> "SelectTable":
        with open(path) as f:
            data = json.load(f)
        return cls(list(data.get("rows", [])), str(path))


_TABLES: dict = {}


def select_table(device) -> SelectTable | None:
    """The table for ``device``: ``$DIST_ATTN_SDPA_SELECT`` (a path) or the measured file of this
    GPU model under benchmarks/results; None without one (or when it cannot be read: logged once)."""
    key = str(device)
    if key not in _TABLES:
        path = os.environ.get("DIST_ATTN_SDPA_SELECT")
        if path is None and device.type == "cuda":
            path = RESULTS / f"sdpa_select_{device_slug(torch.cuda.get_device_name(device))}.json"
        table = None
        if path is not None and Path(path).is_file():
            try:
                table = SelectTable.load(path)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("sdpa select table %s unreadable (%s): using the default rule", path, exc)
        _TABLES[key] = table
    return _TABLES[key]


def auto_select(q, plan: FastPlan, mask: str) -> bool:
    """``auto``'s choice for a call the fast path covers: the measured table's winner, else torch's
    op (the default rule: FlashAttention-2 in torch beats our FA2-class Triton kernel on H100)."""
    table = select_table(q.device)
    if table is None:
        return True
    pref = table.prefer_sdpa(mask, q.shape[-1], q.dtype, q.shape[1])
    return True if pref is None else pref


def _warn_once(kind, exc):
    if kind not in _warned:
        _warned.add(kind)
        log.warning("sdpa_flash %s: torch's flash op failed (%s); using the fallback kernel",
                    kind, str(exc).splitlines()[0][:200])
