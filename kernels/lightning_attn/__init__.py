"""Causal linear attention with per-head decay, per-token gates, documents and state in/out
(Lightning Attention-2 / simple GLA).

Layout: q, k ``[B, S, H, Dk]``, v ``[B, S, H, Dv]``; state fp32 ``[B, H, Dk, Dv]``; ``decay`` is a
per-head log-decay ``[H]`` (<= 0, not differentiated; ``None`` = no decay), ``g`` a per-token log gate
``[B, S, H]`` (<= 0, differentiated; ``None`` = none), ``cu_seqlens`` local document offsets
``[0, ..., S]`` (state reset to 0 before every interior start)::

    S_t = exp(decay_h + g_t) S_{t-1} + k_t^T v_t,     o_t = scale * q_t S_t,     scale defaults to Dk ** -0.5

computed chunk by chunk (64 tokens): masked (Q K^T ⊙ D) V inside a chunk, the running state across
chunks. Backends: ``triton`` (``triton_kernel.py``; CUDA, or CPU under ``TRITON_INTERPRET=1``) and
``torch`` (``torch_kernel.py``; vectorised chunks, hand-written backward, also fp64); ``auto`` picks
Triton on CUDA and torch elsewhere, per call, from the device of ``q``.
"""
from __future__ import annotations

from dist_attn.kernels.interface import BACKENDS, LinearKernel, resolve_backend
from dist_attn.kernels.lightning_attn import torch_kernel

_OP = "lightning_attn"
_KERNELS: dict = {}


def _impl(backend: str, device):
    """The module implementing ``backend`` for tensors on ``device`` (Triton imported lazily)."""
    if resolve_backend(backend, device, _OP) == "triton":
        from dist_attn.kernels.lightning_attn import triton_kernel
        return triton_kernel
    return torch_kernel


def _extra(g, cu_seqlens) -> dict:
    return {key: val for key, val in (("g", g), ("cu_seqlens", cu_seqlens)) if val is not None}


def linear_kernel(backend: str = "auto") -> LinearKernel:
    """The :class:`~dist_attn.kernels.interface.LinearKernel` for ``backend`` in {"auto", "triton", "torch"}.

    ``fwd(q, k, v, *, decay, initial_state, scale, g=None, cu_seqlens=None) -> (out [B,S,H,Dv] in
    v.dtype, final_state fp32)``; ``bwd(dout, dfinal_state, q, k, v, *, decay, initial_state, scale,
    g=None, cu_seqlens=None) -> (dq, dk, dv, dinitial_state, dg)`` with ``dfinal_state`` optional,
    ``dinitial_state`` None when ``initial_state`` is None and ``dg`` None when ``g`` is None. The
    backend is resolved on every call, so one kernel object serves CPU and CUDA tensors.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{_OP}: backend expected one of {BACKENDS}, got {backend!r}. "
                         f"Fix: pass backend='auto' (Triton on GPU, torch on CPU).")
    if backend not in _KERNELS:
        def fwd(q, k, v, *, decay=None, initial_state=None, scale=None, g=None, cu_seqlens=None):
            return _impl(backend, q.device).lightning_fwd(
                q, k, v, decay=decay, initial_state=initial_state, scale=scale, **_extra(g, cu_seqlens))

        def bwd(dout, dfinal_state, q, k, v, *, decay=None, initial_state=None, scale=None, g=None,
                cu_seqlens=None):
            res = tuple(_impl(backend, q.device).lightning_bwd(
                dout, dfinal_state, q, k, v, decay=decay, initial_state=initial_state, scale=scale,
                **_extra(g, cu_seqlens)))
            return res if len(res) == 5 else res + (None,)  # a backend without gates returns 4

        _KERNELS[backend] = LinearKernel(f"lightning_attn[{backend}]", fwd, bwd)
    return _KERNELS[backend]


def lightning_attn(q, k, v, *, decay=None, initial_state=None, output_final_state=False, scale=None,
                   backend="auto", g=None, cu_seqlens=None):
    """Differentiable causal linear attention; returns ``(out [B,S,H,Dv], final_state or None)``.

    Gradients flow to q, k, v, ``g`` and ``initial_state``, including those that reach ``final_state``
    (LASP-2 hands the final state of one rank to the next). ``output_final_state=False`` returns
    None in its place.
    """
    out, state = linear_kernel(backend)(q, k, v, decay=decay, initial_state=initial_state, scale=scale,
                                        g=g, cu_seqlens=cu_seqlens)
    return out, (state if output_final_state else None)
