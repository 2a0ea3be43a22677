"""The kernel object for the gated delta rule (in the spirit of :mod:`dist_attn.kernels.interface`).

    fwd(q, k, v, beta, g, *, initial_state=None, scale=None, cu_seqlens=None) -> (out, final_state)
    bwd(dout, dfinal_state, q, k, v, beta, g, *, initial_state=None, scale=None, cu_seqlens=None)
        -> (dq, dk, dv, dbeta, dg, dinitial_state)      # dinitial_state None when initial_state is None
    __call__(q, k, v, beta, g, *, initial_state=None, scale=None, cu_seqlens=None) -> (out, final_state)
        (differentiable in q, k, v, beta, g and initial_state, through out and final_state)

Shapes: q, k ``[B, S, H, Dk]``, v ``[B, S, H, Dv]``, beta, g ``[B, S, H]``, state fp32 ``[B, H, Dk, Dv]``
(fp64 for fp64 inputs on the torch backend). ``cu_seqlens`` is LOCAL to the call (state reset at every
interior document start), as in the linear-kernel contract. ``dfinal_state`` may be None.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


class _DeltaFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, g, initial_state, kernel, scale, cu_seqlens):
        out, state = kernel.fwd(q, k, v, beta, g, initial_state=initial_state, scale=scale,
                                cu_seqlens=cu_seqlens)
        ctx.save_for_backward(q, k, v, beta, g, initial_state)
        ctx.args = (kernel, scale, cu_seqlens)
        return out, state

    @staticmethod
    def backward(ctx, dout, dstate):
        q, k, v, beta, g, initial_state = ctx.saved_tensors
        kernel, scale, cu_seqlens = ctx.args
        if dout is None:
            dout = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=v.dtype, device=v.device)
        dq, dk, dv, dbeta, dg, dinit = kernel.bwd(dout.contiguous(), dstate, q, k, v, beta, g,
                                                  initial_state=initial_state, scale=scale,
                                                  cu_seqlens=cu_seqlens)
        return dq, dk, dv, dbeta, dg, (dinit if initial_state is not None else None), None, None, None


@dataclass(frozen=True)
class DeltaKernel:
    """A gated-delta-rule kernel: functional ``fwd``/``bwd`` plus a differentiable ``__call__``."""
    name: str
    fwd: Callable
    bwd: Callable

    def __call__(self, q, k, v, beta, g, *, initial_state=None, scale=None, cu_seqlens=None):
        if scale is None:
            scale = q.shape[-1] ** -0.5
        return _DeltaFn.apply(q, k, v, beta, g, initial_state, self, scale, cu_seqlens)


def delta_kernel_from_autograd(name: str, fn: Callable) -> DeltaKernel:
    """Wrap a differentiable ``fn(q,k,v,beta,g,*,initial_state,scale,cu_seqlens) -> (out, state)`` as a
    :class:`DeltaKernel` whose ``bwd`` recomputes the forward under autograd."""

    def fwd(q, k, v, beta, g, **kw):
        with torch.no_grad():
            out, state = fn(q, k, v, beta, g, **kw)
        return out.to(v.dtype), state

    def bwd(dout, dstate, q, k, v, beta, g, *, initial_state=None, **kw):
        with torch.enable_grad():
            ins = [t.detach().requires_grad_(True) for t in (q, k, v, beta, g)]
            s0 = None if initial_state is None else initial_state.detach().requires_grad_(True)
            out, state = fn(*ins, initial_state=s0, **kw)
            outs, grads = [out], [dout.to(out.dtype)]
            if dstate is not None:
                outs.append(state)
                grads.append(dstate.to(state.dtype))
            inputs = ins + ([s0] if s0 is not None else [])
            got = torch.autograd.grad(outs, inputs, grads, allow_unused=True)
        got = [torch.zeros_like(t) if x is None else x.to(t.dtype) for x, t in zip(got, inputs)]
        return (*got[:5], got[5] if s0 is not None else None)

    return DeltaKernel(name, fwd, bwd)
