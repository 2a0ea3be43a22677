"""The contract between local kernels and the context-parallel strategies.

A strategy never calls Triton directly: it receives a *kernel object* with a functional
``fwd`` and ``bwd`` (no autograd inside) so it can run forward and backward block by block
around its own communication, as ring attention must. The same object is also a plain
differentiable callable, so a model can use it directly.

Softmax kernels (layout ``[B, S, H, D]``)::

    fwd(q, k, v, *, causal, softmax_scale, q_offset, k_offset, cu_seqlens=None, window_size=None)
        -> (out [B,Sq,Hq,D], lse fp32 [B,Hq,Sq])
    bwd(dout, q, k, v, out, lse, *, causal, softmax_scale, q_offset, k_offset, dlse=None,
        cu_seqlens=None, window_size=None) -> (dq, dk, dv)

Query row i sits at global position q_offset + i, key j at k_offset + j. ``cu_seqlens`` (1-D int
tensor [0, e_1, ..., S] of GLOBAL document offsets, on the CPU or q's device) and ``window_size`` W
(int >= 0, causal only) restrict visibility: p sees t iff doc(p) == doc(t), t <= p if causal and
p - W <= t (see :mod:`dist_attn.kernels.flash_attn.masks`). Both None: plain causal / full attention.

``bwd`` may be handed the *merged* ``out``/``lse`` of several key blocks (ring attention): with
P_ij = exp(s_ij - lse_i) and delta_i = rowsum(dout_i * out_i) - dlse_i it then returns exactly this
block's share of the gradient, dS = P * (dP - delta).

Linear kernels (q, k ``[B, S, H, Dk]``, v ``[B, S, H, Dv]``, state fp32 ``[B, H, Dk, Dv]``)::

    fwd(q, k, v, *, decay, initial_state, scale, g=None, cu_seqlens=None) -> (out [B,S,H,Dv], final_state)
    bwd(dout, dfinal_state, q, k, v, *, decay, initial_state, scale, g=None, cu_seqlens=None)
        -> (dq, dk, dv, dinitial_state, dg)

S_t = exp(decay_h + g_t) S_{t-1} + k_t^T v_t, o_t = scale · q_t S_t, with ``decay`` [H] (<= 0, not
differentiated) and ``g`` [B, S, H] a per-token log gate (<= 0, differentiated). ``cu_seqlens`` holds
the call's LOCAL document offsets [0, ..., S]: the state is reset to 0 before every interior start,
so ``initial_state`` only reaches the first document and ``final_state`` is the state after the last
one. ``dfinal_state`` may be None (no gradient flows into the final state); ``dinitial_state`` is None
when ``initial_state`` is None, ``dg`` None when ``g`` is None.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

log = logging.getLogger("dist_attn.kernels")

BACKENDS = ("auto", "triton", "torch")
_logged: set = set()


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device, op: str) -> str:
    """Pick ``triton`` or ``torch`` for ``op`` on ``device``; log the choice once per (op, device type).

    ``auto`` uses Triton on CUDA and the torch implementation elsewhere (the Triton interpreter is
    correct on CPU but far too slow to train with). ``triton`` on a CPU tensor is allowed only under
    ``TRITON_INTERPRET=1`` (set before triton is imported), which is how the tests run it.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend expected one of {BACKENDS}, got {backend!r}. "
                         f"Fix: pass backend='auto' (Triton on GPU, torch on CPU).")
    if backend == "auto":
        choice = "triton" if device.type == "cuda" else "torch"
    else:
        choice = backend
    if choice == "triton" and device.type != "cuda" and not triton_interpreting():
        raise ValueError(f"{op}: backend='triton' expected CUDA tensors or TRITON_INTERPRET=1, got "
                         f"{device.type} tensors without the interpreter. Fix: use backend='torch' or "
                         f"'auto' on CPU, or export TRITON_INTERPRET=1 before importing triton.")
    key = (op, device.type, choice)
    if key not in _logged:
        _logged.add(key)
        log.info("%s: using the %s backend on %s (requested %r)", op, choice, device.type, backend)
    return choice


class _SoftmaxFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kernel, causal, softmax_scale, q_offset, k_offset, cu_seqlens=None,
                window_size=None):
        mask_kw = {} if cu_seqlens is None and window_size is None else \
            dict(cu_seqlens=cu_seqlens, window_size=window_size)  # kernels without masks keep working
        out, lse = kernel.fwd(q, k, v, causal=causal, softmax_scale=softmax_scale,
                              q_offset=q_offset, k_offset=k_offset, **mask_kw)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (kernel, causal, softmax_scale, q_offset, k_offset, mask_kw)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        kernel, causal, softmax_scale, q_offset, k_offset, mask_kw = ctx.args
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = kernel.bwd(dout.contiguous(), q, k, v, out, lse, causal=causal,
                                softmax_scale=softmax_scale, q_offset=q_offset, k_offset=k_offset,
                                dlse=dlse, **mask_kw)
        return dq, dk, dv, None, None, None, None, None, None, None


@dataclass(frozen=True)
class SoftmaxKernel:
    """A softmax attention kernel: functional ``fwd``/``bwd`` plus a differentiable ``__call__``."""
    name: str
    fwd: Callable
    bwd: Callable

    def __call__(self, q, k, v, *, causal=False, softmax_scale=None, q_offset=0, k_offset=0, cu_seqlens=None,
                 window_size=None):
        if softmax_scale is None:
            softmax_scale = q.shape[-1] ** -0.5
        return _SoftmaxFn.apply(q, k, v, self, causal, softmax_scale, q_offset, k_offset, cu_seqlens, window_size)


def _linear_extra(g, cu_seqlens) -> dict:
    """The gate/document keywords that are set (kernels written before them keep working without)."""
    return {key: val for key, val in (("g", g), ("cu_seqlens", cu_seqlens)) if val is not None}


def call_linear_bwd(kernel, *args, **kw):
    """kernel.bwd as the 5-tuple (dq, dk, dv, dinitial_state, dg) (older kernels return 4)."""
    res = tuple(kernel.bwd(*args, **kw))
    return res if len(res) == 5 else res + (None,)


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, decay, initial_state, g, kernel, scale, cu_seqlens):
        extra = _linear_extra(g, cu_seqlens)
        out, state = kernel.fwd(q, k, v, decay=decay, initial_state=initial_state, scale=scale, **extra)
        ctx.save_for_backward(q, k, v, decay, initial_state, g)
        ctx.args = (kernel, scale, cu_seqlens)
        return out, state

    @staticmethod
    def backward(ctx, dout, dstate):
        q, k, v, decay, initial_state, g = ctx.saved_tensors
        kernel, scale, cu_seqlens = ctx.args
        if dout is None:
            dout = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=v.dtype, device=v.device)
        dq, dk, dv, dinit, dg = call_linear_bwd(kernel, dout.contiguous(), dstate, q, k, v, decay=decay,
                                            initial_state=initial_state, scale=scale,
                                            **_linear_extra(g, cu_seqlens))
        if initial_state is None:
            dinit = None
        if g is None:
            dg = None
        return dq, dk, dv, None, dinit, dg, None, None, None


@dataclass(frozen=True)
class LinearKernel:
    """A causal linear attention kernel: functional ``fwd``/``bwd`` plus a differentiable ``__call__``.

    ``decay`` is a per-head log-decay ``[H]`` (<= 0, not differentiated); ``None`` means no decay.
    ``g`` a per-token log gate ``[B, S, H]`` (<= 0, differentiated); ``cu_seqlens`` local document
    offsets (see the module docstring).
    """
    name: str
    fwd: Callable
    bwd: Callable

    def __call__(self, q, k, v, *, decay=None, initial_state=None, scale=None, g=None, cu_seqlens=None):
        if scale is None:
            scale = q.shape[-1] ** -0.5
        return _LinearFn.apply(q, k, v, decay, initial_state, g, self, scale, cu_seqlens)


def softmax_kernel_from_autograd(name: str, fn: Callable) -> SoftmaxKernel:
    """Wrap any differentiable ``fn(q,k,v,*,causal,softmax_scale,q_offset,k_offset) -> (out, lse)``
    (e.g. a naive reference) as a :class:`SoftmaxKernel`; ``bwd`` recomputes and uses autograd.
    ``cu_seqlens``/``window_size`` are passed to ``fn`` only when set, so ``fn`` needs to accept them
    only if the caller uses documents or windows.

    Only exact when ``out``/``lse`` handed to ``bwd`` are this block's own; strategies that merge
    blocks (ring) pass the merged ones, so this adapter rescales: the block's own (o_b, lse_b) are
    recomputed, and the upstream gradients are mapped through the merge weights w = exp(lse_b - lse).
    """

    def _drop_unset(kw):
        return {key: val for key, val in kw.items() if key not in ("cu_seqlens", "window_size") or val is not None}

    def fwd(q, k, v, **kw):
        with torch.no_grad():
            return fn(q, k, v, **_drop_unset(kw))

    def bwd(dout, q, k, v, out, lse, *, dlse=None, **kw):
        kw = _drop_unset(kw)
        with torch.enable_grad():
            qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
            ob, lb = fn(qq, kk, vv, **kw)
            # merged o = sum_b w_b o_b with w_b = exp(lse_b - lse); d o_b = w_b dout and
            # d lse_b = w_b * (rowdot(dout, o_b) - rowdot(dout, o)) + w_b * dlse.
            lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
            w = torch.exp(lb.detach() - lse_safe).nan_to_num(0.0)  # [B,H,S]
            w = torch.where(torch.isinf(lb.detach()), torch.zeros_like(w), w)
            wt = w.transpose(1, 2).unsqueeze(-1)  # [B,S,H,1]
            d_ob = (wt * dout.float()).to(ob.dtype)
            rd_b = (dout.float() * ob.detach().float()).sum(-1).transpose(1, 2)
            rd = (dout.float() * out.float()).sum(-1).transpose(1, 2)
            d_lb = w * (rd_b - rd)
            if dlse is not None:
                d_lb = d_lb + w * dlse
            dq, dk, dv = torch.autograd.grad((ob, lb), (qq, kk, vv), (d_ob, d_lb), allow_unused=True)
        return tuple(torch.zeros_like(t) if g is None else g for g, t in zip((dq, dk, dv), (q, k, v)))

    return SoftmaxKernel(name, fwd, bwd)


def linear_kernel_from_autograd(name: str, fn: Callable) -> LinearKernel:
    """Wrap a differentiable ``fn(q,k,v,*,decay,initial_state,scale[,g,cu_seqlens]) -> (out, state)`` as
    a :class:`LinearKernel` whose ``bwd`` recomputes the forward under autograd. ``g``/``cu_seqlens``
    are passed to ``fn`` only when set."""

    def fwd(q, k, v, *, g=None, cu_seqlens=None, **kw):
        with torch.no_grad():
            return fn(q, k, v, **kw, **_linear_extra(g, cu_seqlens))

    def bwd(dout, dstate, q, k, v, *, decay=None, initial_state=None, scale=None, g=None, cu_seqlens=None):
        with torch.enable_grad():
            qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
            s0 = None if initial_state is None else initial_state.detach().requires_grad_(True)
            gg = None if g is None else g.detach().requires_grad_(True)
            out, state = fn(qq, kk, vv, decay=decay, initial_state=s0, scale=scale,
                            **_linear_extra(gg, cu_seqlens))
            outs, grads = [out], [dout]
            if dstate is not None:
                outs.append(state)
                grads.append(dstate)
            inputs = [t for t in (qq, kk, vv, s0, gg) if t is not None]
            got = torch.autograd.grad(outs, inputs, grads, allow_unused=True)
        got = iter(torch.zeros_like(t) if x is None else x for x, t in zip(got, inputs))
        dq, dk, dv = next(got), next(got), next(got)
        dinit = None if s0 is None else next(got)
        dg = None if gg is None else next(got)
        return dq, dk, dv, dinit, dg

    return LinearKernel(name, fwd, bwd)
