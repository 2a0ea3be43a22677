"""One entry per layer type: route attention to the configured CP strategy (or the local kernel).

Model layers call only these two functions, so a layer can never silently run on its local shard:
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
                      causal: bool = True, softmax_scale=None, cu_seqlens=None) -> torch.Tensor:
    """q ``[B, S/P, Hq, D]``, k/v ``[B, S/P, Hkv, D]`` -> out ``[B, S/P, Hq, D]``."""
    kernel, docs = softmax_kernel(cp.backend), _docs(cu_seqlens)
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
                     decay: torch.Tensor | None = None, scale=None, cu_seqlens=None) -> torch.Tensor:
    """Causal linear attention. q/k ``[B, S/P, H, Dk]``, v ``[B, S/P, H, Dv]`` -> ``[B, S/P, H, Dv]``."""
    kernel, docs = linear_kernel(cp.backend), _docs(cu_seqlens)
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
