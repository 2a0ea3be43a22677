"""Causal linear attention with decay and state in/out: ``lightning_attn`` and its kernel object.

INTERIM: dispatches to the chunked naive reference until the Triton kernel lands.
"""
from __future__ import annotations

from kernels.interface import LinearKernel, linear_kernel_from_autograd
from kernels.lightning_attn.naive import linear_attn_chunked

_NAIVE = linear_kernel_from_autograd("naive_chunked", linear_attn_chunked)


def linear_kernel(backend: str = "auto") -> LinearKernel:
    """The :class:`~kernels.interface.LinearKernel` for ``backend`` in {"auto", "triton", "torch"}."""
    return _NAIVE


def lightning_attn(q, k, v, *, decay=None, initial_state=None, output_final_state=False, scale=None,
                   backend="auto"):
    out, state = linear_kernel(backend)(q, k, v, decay=decay, initial_state=initial_state, scale=scale)
    return out, (state if output_final_state else None)
