"""Softmax attention with log-sum-exp: ``flash_attn`` and the kernel object strategies consume.

INTERIM: dispatches to the naive reference until the Triton and blockwise torch kernels land.
"""
from __future__ import annotations

from kernels.flash_attn.naive import attention_ref
from kernels.interface import SoftmaxKernel, softmax_kernel_from_autograd

_NAIVE = softmax_kernel_from_autograd("naive", attention_ref)


def softmax_kernel(backend: str = "auto") -> SoftmaxKernel:
    """The :class:`~kernels.interface.SoftmaxKernel` for ``backend`` in {"auto", "triton", "torch"}."""
    return _NAIVE


def flash_attn(q, k, v, *, causal=False, softmax_scale=None, q_offset=0, k_offset=0, return_lse=False,
               backend="auto"):
    out, lse = softmax_kernel(backend)(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                       q_offset=q_offset, k_offset=k_offset)
    return (out, lse) if return_lse else out
