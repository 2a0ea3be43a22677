"""One entry per layer type: route attention to the configured CP strategy (or the local kernel).

* :func:`softmax_attention` -- ``parallel.softmax_cp``: ring, all-gather, Ulysses, USP;
* :func:`linear_attention` (``L``, ``G`` layers) and :func:`delta_attention` (``D`` layers) --
  ``parallel.linear_cp``: ``lasp2`` means *state passing* for both (LASP-2's one all-gather of fp32
  chunk states for decayed / gated linear attention; for the delta rule the all-gather of per-chunk
  affine maps ``[b | A]`` of :func:`dist_attn.gated_delta.gated_delta_attention`), ``ulysses`` means
  all-to-all head parallelism (the local kernel on the full sequence for H/P heads, two all-to-alls);
* :func:`short_conv` -- the causal depthwise convolution of ``D`` layers, a halo of K-1 tokens under CP.

Model layers call only these functions, so a layer can never silently run on its local shard:
with CP enabled the call goes through a strategy that communicates.

``cu_seqlens`` (packed documents: GLOBAL document offsets ``[0, e_1, ..., S]``, the same on every rank)
is passed on to the kernel or strategy only when it is not None, so callers without documents reach
exactly the unpacked code path. Without CP the global offsets are the local ones.
"""
from __future__ import annotations

import torch

from dist_attn.context import CPContext
from dist_attn.kernels.flash_attn import softmax_kernel
from dist_attn.kernels.lightning_attn import linear_kernel


def _docs(cu_seqlens) -> dict:
    return {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cp: CPContext,
                      causal: bool = True, softmax_scale=None, cu_seqlens=None,
                      window_size: int | None = None) -> torch.Tensor:
    """q ``[B, S/P, Hq, D]``, k/v ``[B, S/P, Hkv, D]`` -> out ``[B, S/P, Hq, D]``; ``window_size`` (a
    sliding left window, causal only) is passed on, like ``cu_seqlens``, only when it is not None."""
    kernel, docs = softmax_kernel(cp.backend), _docs(cu_seqlens)
    if window_size is not None:
        docs["window_size"] = window_size
    if not cp.enabled:
        out, _ = kernel(q, k, v, causal=causal, softmax_scale=softmax_scale, **docs)
        return out
    s = cp.softmax_strategy
    if s == "zigzag_ring":
        from dist_attn.ring import ring_attention
        return ring_attention(q, k, v, group=cp.group, causal=causal, layout=cp.layout,
                              softmax_scale=softmax_scale, local_attn=kernel, **docs)
    if s == "allgather":
        from dist_attn.allgather import allgather_attention
        return allgather_attention(q, k, v, group=cp.group, causal=causal, layout=cp.layout,
                                   softmax_scale=softmax_scale, local_attn=kernel, **docs)
    if s == "ulysses":
        from dist_attn.ulysses import ulysses_attention
        return ulysses_attention(q, k, v, group=cp.group, causal=causal, layout=cp.layout,
                                 softmax_scale=softmax_scale, local_attn=kernel, **docs)
    if s == "usp":
        from dist_attn.usp import usp_attention
        return usp_attention(q, k, v, ulysses_group=cp.ulysses_group, ring_group=cp.ring_group,
                             causal=causal, layout=cp.layout, softmax_scale=softmax_scale, local_attn=kernel,
                             **docs)
    raise AssertionError(f"unhandled softmax strategy {s}")


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cp: CPContext,
                     decay: torch.Tensor | None = None, scale=None, cu_seqlens=None,
                     g: torch.Tensor | None = None) -> torch.Tensor:
    """Causal linear attention. q/k ``[B, S/P, H, Dk]``, v ``[B, S/P, H, Dv]``, optional per-token log
    gate ``g [B, S/P, H]`` (<= 0) -> ``[B, S/P, H, Dv]``."""
    kernel = linear_kernel(cp.backend)
    docs = _docs(cu_seqlens) if g is None else {**_docs(cu_seqlens), "g": g}
    if not cp.enabled:
        out, _ = kernel(q, k, v, decay=decay, scale=scale, **docs)
        return out
    if cp.linear_strategy == "lasp2":
        from dist_attn.lasp2 import lasp2_attention
        return lasp2_attention(q, k, v, group=cp.group, decay=decay, layout=cp.layout, scale=scale,
                               local_linear=kernel, **docs)
    if cp.linear_strategy == "ulysses":
        from dist_attn.ulysses import ulysses_attention
        return ulysses_attention(q, k, v, group=cp.group, causal=True, layout=cp.layout, softmax_scale=scale,
                                 local_attn=kernel, decay=decay, **docs)
    raise AssertionError(f"unhandled linear strategy {cp.linear_strategy}")


def _delta_backend(backend: str) -> str:
    """The delta-rule kernel backend for a CP context's ``backend`` (triton/auto: fla where it fits)."""
    return "torch" if backend == "torch" else "auto"


def delta_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, g: torch.Tensor, *,
                    cp: CPContext, scale=None, cu_seqlens=None) -> torch.Tensor:
    """Gated delta rule. q/k ``[B, S/P, H, Dk]`` (L2-normalised by the layer), v ``[B, S/P, H, Dv]``, beta
    ``[B, S/P, H]`` in (0, 1), g ``[B, S/P, H]`` <= 0 -> ``[B, S/P, H, Dv]``.

    ``linear_cp=lasp2``: :func:`~dist_attn.gated_delta.gated_delta_attention` (state passing, forward
    (P-1)·c·B·H·Dk·(Dk+Dv)·4 bytes per rank, independent of S). ``linear_cp=ulysses``: q, k, v, beta
    (in q's dtype, one all-to-all; g in its own when it is fp32 and q is not) to ``[B, S, H/P, .]`` in
    global order, the local kernel with the global ``cu_seqlens``, the output back: (P-1)/P²·B·S·H·
    (b·(2Dk + 2Dv + 1) + 4) bytes forward, needs H % P == 0.
    """
    from dist_attn.kernels.gated_delta import delta_kernel
    kernel = delta_kernel(_delta_backend(cp.backend))
    if not cp.enabled:
        out, _ = kernel(q, k, v, beta, g, scale=scale, cu_seqlens=cu_seqlens)
        return out
    if cp.linear_strategy == "lasp2":
        from dist_attn.gated_delta import gated_delta_attention
        return gated_delta_attention(q, k, v, beta, g, group=cp.group, layout=cp.layout, scale=scale,
                                     local_kernel=kernel, **_docs(cu_seqlens))
    if cp.linear_strategy == "ulysses":
        from dist_attn.plan import check_head_split
        from dist_attn.ulysses import global_order, head_to_seq, seq_to_head
        p, (b, sl, h, _) = cp.world_size, q.shape
        check_head_split("delta_attention (linear_cp=ulysses)", h, h, p, "CP size")
        order = global_order(sl * p, p, cp.layout, q.device)
        beta = beta.to(q.dtype).unsqueeze(-1)  # [B, S/P, H, 1]: a head dim of one
        if g.dtype == q.dtype:
            q_h, k_h, v_h, beta_h, g_h = seq_to_head((q, k, v, beta, g.unsqueeze(-1)), cp.group, order)
        else:
            q_h, k_h, v_h, beta_h = seq_to_head((q, k, v, beta), cp.group, order)
            (g_h,) = seq_to_head((g.unsqueeze(-1),), cp.group, order)
        out_h, _ = kernel(q_h, k_h, v_h, beta_h.squeeze(-1), g_h.squeeze(-1), scale=scale,
                          cu_seqlens=cu_seqlens)  # [B, S, H/P, Dv]: the full sequence in global order
        (out,) = head_to_seq((out_h.to(v.dtype),), cp.group, order)
        return out
    raise AssertionError(f"unhandled linear strategy {cp.linear_strategy}")


def short_conv(x: torch.Tensor, weight: torch.Tensor, *, cp: CPContext, cu_seqlens=None,
               activation: str | None = "silu") -> torch.Tensor:
    """Causal depthwise convolution ``x [B, S/P, C]``, ``weight [C, K]`` -> ``[B, S/P, C]``, zero before
    each document start (GLOBAL ``cu_seqlens``). Under CP :func:`dist_attn.short_conv.short_conv` (a P2P
    halo of K-1 tokens per chunk); without, the same taps on the local sequence::

        y_p = act( sum_j w[:, j] · x_{p-K+1+j} · [p-K+1+j >= doc_start(p)] )
    """
    if cp.enabled:
        from dist_attn.short_conv import short_conv as cp_conv
        return cp_conv(x, weight, group=cp.group, layout=cp.layout, activation=activation, **_docs(cu_seqlens))
    b, s, ch = x.shape
    k = weight.shape[1]
    acc = torch.promote_types(x.dtype, torch.float32)  # bf16 inputs accumulate in fp32
    pos = torch.arange(s, device=x.device)
    if cu_seqlens is None:
        start = torch.zeros_like(pos)
    else:
        cu = cu_seqlens.to(device=x.device, dtype=torch.long)
        start = cu[(torch.searchsorted(cu, pos, right=True) - 1).clamp(min=0)]
    xp = torch.nn.functional.pad(x.to(acc), (0, 0, k - 1, 0))  # (B, K-1+S, C): zeros before the start
    w = weight.to(acc)
    y = sum(w[:, j] * xp[:, j:j + s] * (pos - (k - 1) + j >= start).to(acc)[:, None] for j in range(k))
    if activation == "silu":
        y = torch.nn.functional.silu(y)
    return y.to(x.dtype)
