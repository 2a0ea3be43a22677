"""Softmax attention with log-sum-exp: ``flash_attn`` and the kernel object strategies consume.

Layout ``[B, S, H, D]``: q ``[B, Sq, Hq, D]``, k/v ``[B, Sk, Hkv, D]`` with Hq a multiple of Hkv
(GQA/MQA), any head dim D (Triton: D <= 128, padded to a power of two inside the kernel). ``lse[b, h, i] = log sum_j exp(scale * q_i . k_j)`` over the
visible keys (fp32, or fp64 for fp64 inputs on the torch backend). Causal masking uses global
positions: query ``q_offset + i`` sees key ``k_offset + j`` iff ``k_offset + j <= q_offset + i``; a
row that sees no key gets out 0 and lse -inf, and zero (never NaN) gradients. Packed documents
(``cu_seqlens``, global offsets) and a left window (``window_size``, causal only) restrict the keys of
each row to one interval; key blocks outside every row's interval are skipped (:mod:`.masks`).

Backends:

* ``triton`` -- :mod:`.triton_kernel` (fp16/bf16/fp32), our GPU kernel; also runs on CPU under
  ``TRITON_INTERPRET=1`` (tests only: far too slow to train with).
* ``torch`` -- :mod:`.torch_kernel`, blockwise online softmax in plain torch (adds fp64), the CPU
  training path and the fp64 path of the strategy tests.
* ``auto`` -- per call. CPU (and meta) tensors: ``torch``, exactly as before. CUDA tensors: torch's
  FlashAttention-2 ops (:mod:`.sdpa_kernel`) for the cases they cover (fp16/bf16, full or causal
  blocks ending where the query block ends, packed documents and windows as varlen segments, no
  gradient into the LSE), chosen per case by the measured table
  ``benchmarks/results/sdpa_select_<gpu>.json`` (written by ``python -m benchmarks.kernels`` on that
  GPU; ``$DIST_ATTN_SDPA_SELECT`` names another file) and, without a table, torch's op; ``triton``
  for everything else (fp32, other offsets, a gradient into the LSE).

Triton is imported lazily, so the torch backend works where triton is absent.
"""
from __future__ import annotations

from dist_attn.kernels.flash_attn import torch_kernel
from dist_attn.kernels.interface import BACKENDS, SoftmaxKernel, resolve_backend

__all__ = ["flash_attn", "ours_kernel", "softmax_kernel"]


def _impl(backend: str, device):
    if resolve_backend(backend, device, "flash_attn") == "triton":
        from dist_attn.kernels.flash_attn import triton_kernel  # lazy: importing triton is slow and optional
        return triton_kernel
    return torch_kernel


def _make(backend: str) -> SoftmaxKernel:
    def fwd(q, k, v, *, causal=False, softmax_scale=None, q_offset=0, k_offset=0, cu_seqlens=None,
            window_size=None):
        return _impl(backend, q.device).fwd(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                            q_offset=q_offset, k_offset=k_offset, cu_seqlens=cu_seqlens,
                                            window_size=window_size)

    def bwd(dout, q, k, v, out, lse, *, causal=False, softmax_scale=None, q_offset=0, k_offset=0, dlse=None,
            cu_seqlens=None, window_size=None):
        return _impl(backend, q.device).bwd(dout, q, k, v, out, lse, causal=causal,
                                            softmax_scale=softmax_scale, q_offset=q_offset,
                                            k_offset=k_offset, dlse=dlse, cu_seqlens=cu_seqlens,
                                            window_size=window_size)

    return SoftmaxKernel(f"flash_attn[{backend}]", fwd, bwd)


_KERNELS: dict = {}


def ours_kernel() -> SoftmaxKernel:
    """Our own kernels only: Triton on CUDA, torch elsewhere (resolved per call); ``auto``'s fallback."""
    if "ours" not in _KERNELS:
        _KERNELS["ours"] = _make("auto")
    return _KERNELS["ours"]


def softmax_kernel(backend: str = "auto") -> SoftmaxKernel:
    """The :class:`~dist_attn.kernels.interface.SoftmaxKernel` for ``backend`` in {"auto", "triton", "torch"}.

    ``fwd``/``bwd`` choose on every call from the tensors (device, dtype, offsets, mask), so one
    object serves CPU and GPU tensors alike; ``auto`` as in the module docstring. The kernel objects
    are cached (one per backend name).
    """
    if backend not in BACKENDS:
        raise ValueError(f"softmax_kernel: backend expected one of {BACKENDS}, got {backend!r}. "
                         f"Fix: pass backend='auto' (Triton on GPU, torch on CPU).")
    if backend not in _KERNELS:
        if backend == "auto":
            from dist_attn.kernels.flash_attn.sdpa_kernel import auto_select, sdpa_softmax_kernel
            _KERNELS[backend] = sdpa_softmax_kernel(fallback=ours_kernel(), select=auto_select,
                                                    name="flash_attn[auto]")
        else:
            _KERNELS[backend] = _make(backend)
    return _KERNELS[backend]


def flash_attn(q, k, v, *, causal=False, softmax_scale=None, q_offset=0, k_offset=0, return_lse=False,
               backend="auto", cu_seqlens=None, window_size=None):
    """Differentiable softmax attention; ``(out, lse)`` if ``return_lse`` else ``out``.

    q ``[B, Sq, Hq, D]``, k/v ``[B, Sk, Hkv, D]`` -> out ``[B, Sq, Hq, D]``, lse ``[B, Hq, Sq]``;
    out_i = sum_j softmax_j(scale * q_i . k_j) v_j over visible keys, scale = D^-0.5 by default.
    Gradients flow through both ``out`` and ``lse``. ``cu_seqlens`` / ``window_size``: see the module docstring.
    """
    out, lse = softmax_kernel(backend)(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                       q_offset=q_offset, k_offset=k_offset, cu_seqlens=cu_seqlens,
                                       window_size=window_size)
    return (out, lse) if return_lse else out
