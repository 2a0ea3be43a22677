"""Local (single-device) attention kernels used by every context-parallel strategy.

Layout everywhere: ``[batch, seq, heads, head_dim]`` (``[B, S, H, D]``).

* :mod:`dist_attn.kernels.flash_attn` -- softmax attention that also returns the log-sum-exp (LSE),
  which ring/all-gather strategies need to merge partial results.
* :mod:`dist_attn.kernels.lightning_attn` -- chunked causal linear attention with per-head decay,
  initial state in and final state out, which LASP-2 needs.

Each op has a Triton implementation, a torch implementation (CPU fallback, same API) and a
plain-torch ``naive.py`` reference used by the tests.
"""
from dist_attn.kernels.interface import LinearKernel, SoftmaxKernel, resolve_backend

__all__ = ["SoftmaxKernel", "LinearKernel", "resolve_backend"]
