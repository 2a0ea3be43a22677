"""Gated delta rule (Gated DeltaNet) with state in/out and document resets.

Layout: q, k ``[B, S, H, Dk]``, v ``[B, S, H, Dv]``, beta ``[B, S, H]`` in (0, 1), g ``[B, S, H]`` <= 0
(log gate); state fp32 ``[B, H, Dk, Dv]`` (fp64 for fp64 inputs on the torch backend). Per head::

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,     o_t = scale * q_t^T S_t

``S_{-1}`` = ``initial_state`` or 0, ``scale`` defaults to Dk^-0.5; LOCAL ``cu_seqlens`` ``[0, ..., S]``
(same for every batch row) replaces S_{t-1} by 0 at every interior document start t, so the initial
state reaches only the first document and the final state is the last document's.

Backends (kernel object: :class:`~dist_attn.kernels.gated_delta.interface.DeltaKernel`):

* ``torch``: ``torch_kernel.chunk_gated_delta`` (chunked WY/UT form, any dtype incl. fp64), backward
  by autograd through the chunked form.
* ``fla``: flash-linear-attention's Triton ``chunk_gated_delta_rule`` (package ``fla-core``, tested
  against 0.6.0) on CUDA for fp16/bf16/fp32. Batched documents are flattened into fla's varlen form
  (B = 1, one fla sequence per (row, document); the initial state goes to each row's first document).
  ``bwd`` re-runs fla's forward under autograd and calls its backward.
* ``auto``: ``fla`` for CUDA tensors of those dtypes when fla imports, else ``torch``.
"""
from __future__ import annotations

import functools
import logging

import torch

from dist_attn.kernels.gated_delta.interface import DeltaKernel, delta_kernel_from_autograd
from dist_attn.kernels.gated_delta.torch_kernel import chunk_gated_delta

log = logging.getLogger("dist_attn.kernels")
BACKENDS = ("auto", "torch", "fla")
_OP = "gated_delta"
_KERNELS: dict = {}
_logged: set = set()


def fla_available() -> bool:
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


def fla_version() -> str | None:
    try:
        import fla
        return getattr(fla, "__version__", None)
    except Exception:  # noqa: BLE001
        return None


def _fla_fits(q) -> bool:
    return q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16, torch.float32)


def _resolve(backend: str, q) -> str:
    if backend == "auto":
        choice = "fla" if _fla_fits(q) and fla_available() else "torch"
    else:
        choice = backend
    if choice == "fla" and not (_fla_fits(q) and fla_available()):
        raise ValueError(f"{_OP}: backend='fla' expected CUDA fp16/bf16/fp32 tensors and an importable "
                         f"fla-core, got {q.device.type} {q.dtype} (fla importable: {fla_available()}). "
                         f"Fix: use backend='auto' or 'torch'.")
    key = (q.device.type, choice)
    if key not in _logged:
        _logged.add(key)
        log.info("%s: using the %s backend on %s (requested %r)", _OP, choice, q.device.type, backend)
    return choice


def fla_gated_delta(q, k, v, beta, g, *, initial_state=None, scale=None, cu_seqlens=None):
    """Differentiable call of fla's chunk kernel under this package's contract (batched documents).

    With ``cu_seqlens`` the batch is flattened to fla's varlen form: row r's document d becomes fla
    sequence r·n_docs + d; empty documents are dropped. The offsets are built on the host from a CPU
    copy of ``cu_seqlens`` (no sync when it is given on the CPU; fla needs host offsets anyway).
    """
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    b, s, h, dk = q.shape
    dv = v.shape[-1]
    scale = dk ** -0.5 if scale is None else scale
    s0 = None if initial_state is None else initial_state.float()
    if cu_seqlens is None:
        return chunk_gated_delta_rule(q, k, v, g.float(), beta, scale=scale, initial_state=s0,
                                      output_final_state=True)
    bounds = sorted({int(x) for x in torch.as_tensor(cu_seqlens).cpu().tolist()} | {0, s})
    n_docs = len(bounds) - 1
    flat = torch.tensor([r * s + x for r in range(b) for x in bounds[:-1]] + [b * s], dtype=torch.long)
    if s0 is not None:  # row r's state enters its first document, the others start from zero
        inits = torch.zeros(b, n_docs, h, dk, dv, dtype=torch.float32, device=q.device)
        inits = torch.cat([s0[:, None], inits[:, 1:]], 1).reshape(b * n_docs, h, dk, dv)
    else:
        inits = None

    def flat_(t):
        return t.reshape(1, b * s, *t.shape[2:])

    out, final = chunk_gated_delta_rule(flat_(q), flat_(k), flat_(v), flat_(g).float(), flat_(beta), scale=scale,
                                        initial_state=inits, output_final_state=True,
                                        cu_seqlens=flat.to(q.device), cu_seqlens_cpu=flat)
    final = final.reshape(b, n_docs, h, dk, dv)[:, -1]
    return out.reshape(b, s, h, dv), final


def delta_kernel(backend: str = "auto", chunk_size: int = 64) -> DeltaKernel:
    """The :class:`DeltaKernel` for ``backend`` in {"auto", "torch", "fla"}; resolved per call from q.

    ``chunk_size`` is the torch backend's chunk (fla uses its own 64).
    """
    if backend not in BACKENDS:
        raise ValueError(f"{_OP}: backend expected one of {BACKENDS}, got {backend!r}. "
                         f"Fix: pass backend='auto' (fla on GPU, torch on CPU).")
    key = (backend, chunk_size)
    if key not in _KERNELS:
        torch_k = delta_kernel_from_autograd(f"gated_delta[torch,{chunk_size}]",
                                             functools.partial(chunk_gated_delta, chunk_size=chunk_size))
        fla_k = delta_kernel_from_autograd("gated_delta[fla]", fla_gated_delta)

        def fwd(q, k, v, beta, g, **kw):
            return (fla_k if _resolve(backend, q) == "fla" else torch_k).fwd(q, k, v, beta, g, **kw)

        def bwd(dout, dstate, q, k, v, beta, g, **kw):
            return (fla_k if _resolve(backend, q) == "fla" else torch_k).bwd(dout, dstate, q, k, v, beta, g, **kw)

        _KERNELS[key] = DeltaKernel(f"gated_delta[{backend}]", fwd, bwd)
    return _KERNELS[key]


def gated_delta(q, k, v, beta, g, *, initial_state=None, scale=None, cu_seqlens=None, backend="auto"):
    """Differentiable gated delta rule on one process; returns ``(out [B,S,H,Dv], final_state)``."""
    return delta_kernel(backend)(q, k, v, beta, g, initial_state=initial_state, scale=scale,
                                 cu_seqlens=cu_seqlens)


__all__ = ["DeltaKernel", "delta_kernel", "delta_kernel_from_autograd", "gated_delta", "chunk_gated_delta",
           "fla_gated_delta", "fla_available", "fla_version", "BACKENDS"]
