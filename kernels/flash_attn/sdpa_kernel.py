"""A softmax-attention kernel backed by torch's own flash-attention ops, with our kernel for the rest.

Same contract as :mod:`dist_attn.kernels.flash_attn` (``fwd -> (out [B,Sq,Hq,D], lse fp32 [B,Hq,Sq])``,
``bwd(..., dlse=None) -> dq, dk, dv``, GQA, global positions q_offset/k_offset). torch ships
FlashAttention-2 as ``aten._flash_attention_forward/_backward``; both take and return the
log-sum-exp the ring merge needs, and the backward accepts a *merged* out/lse (it recomputes
P = exp(s - lse) and delta = rowsum(dout * out), exactly our bwd), so ring and all-gather use it
through the kernel interface unchanged. The ops are called in their varlen form (sequences packed
[B*S, H, D] with offsets 0, S, 2S, ...) because that form's backward takes the offsets as tensors
(the fixed-length one needs undefined tensors, which Python cannot pass).

Fast path when all of these hold, else :func:`dist_attn.kernels.flash_attn.softmax_kernel` ("auto"):
  * CUDA tensors, fp16/bf16, head dim a multiple of 8 up to 256, Sq, Sk >= 1;
  * no documents, no window (torch's varlen offsets could carry documents: a later extension);
  * the mask is "full" (not causal, or causal with every key visible to every row:
    k_offset + Sk - 1 <= q_offset) or the diagonal causal block (q_offset == k_offset, Sq == Sk);
  * backward: no gradient flowing into the LSE (``dlse`` is None).
On CPU, ``fast_cpu=True`` routes the same cases through ``aten._scaled_dot_product_flash_attention
_for_cpu`` (fp32/bf16; KV heads repeated for GQA): the tests check the selection, the layout and LSE
conventions and the merged-LSE backward there, since the CUDA ops cannot run without a GPU.
Every op is looked up with ``getattr`` so a torch without it falls back instead of failing.
"""
from __future__ import annotations

import logging

import torch

from dist_attn.kernels.interface import SoftmaxKernel

log = logging.getLogger("dist_attn.kernels")
_HALF = (torch.float16, torch.bfloat16)
_warned: set = set()


def _op(name: str):
    return getattr(torch.ops.aten, name, None)


def fast_mode(q, k, *, causal, q_offset, k_offset, cu_seqlens=None, window_size=None, dlse=None,
              cpu=False):
    """None if the fast path does not cover this call, else the ``is_causal`` flag to give torch."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    if cu_seqlens is not None or window_size is not None or dlse is not None or sq == 0 or sk == 0:
        return None
    if q.device.type == "cuda":
        if q.dtype not in _HALF or d % 8 or d > 256 or _op("_flash_attention_forward") is None:
            return None
    elif not (cpu and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)
              and _op("_scaled_dot_product_flash_attention_for_cpu") is not None):
        return None
    if not causal or k_offset + sk - 1 <= q_offset:
        return False
    if q_offset == k_offset and sq == sk:
        return True
    return None


def _packed(x):
    """[B, S, H, D] -> [B*S, H, D] and the offsets 0, S, ..., B*S (int32, on x's device)."""
    b, s = x.shape[:2]
    return x.reshape(b * s, *x.shape[2:]), torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=x.device)


def _lse_to_ours(lse, b, h, sq):
    """torch returns [B, H, Sq] (fixed-length layout) or [H, B*Sq] (varlen layout) by version."""
    if lse.dim() == 2:
        return lse.view(h, b, sq).transpose(0, 1).float()
    return lse[..., :sq].float()


def _cuda_fwd(q, k, v, is_causal, scale):
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    qp, cu_q = _packed(q.contiguous())
    (kp, cu_k), (vp, _) = _packed(k.contiguous()), _packed(v.contiguous())
    out, lse = _op("_flash_attention_forward")(qp, kp, vp, cu_q, cu_k, sq, sk, 0.0, is_causal, False,
                                               scale=scale)[:2]
    return out.view(b, sq, hq, d), _lse_to_ours(lse, b, hq, sq)


def _cuda_bwd(dout, q, k, v, out, lse, is_causal, scale):
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    qp, cu_q = _packed(q.contiguous())
    (kp, cu_k), (vp, _) = _packed(k.contiguous()), _packed(v.contiguous())
    # the layout this torch's varlen backward expects is the one its forward returns: probe it once
    # per device on a tiny problem (shapes only; no host sync)
    key = ("varlen_lse_2d", q.device)
    if key not in _warned:
        t = torch.zeros(2, 1, 8, dtype=q.dtype, device=q.device)
        cu = torch.tensor([0, 1, 2], dtype=torch.int32, device=q.device)
        probe = _op("_flash_attention_forward")(t, t, t, cu, cu, 1, 1, 0.0, False, False)[1]
        _warned.add(key)
        _warned.add(("lse2d", q.device) if probe.dim() == 2 else ("lse3d", q.device))
    lse_fa = lse.float().transpose(0, 1).reshape(hq, b * sq) if ("lse2d", q.device) in _warned else lse.float()
    rng = torch.empty(2, dtype=torch.int64, device=q.device)  # dropout 0: the RNG state is not read
    out_p = out.to(q.dtype).contiguous().view(b * sq, hq, d)
    dq, dk, dv = _op("_flash_attention_backward")(dout.to(q.dtype).contiguous().view(b * sq, hq, d), qp, kp, vp,
                                                  out_p, lse_fa.contiguous(), cu_q, cu_k, sq, sk, 0.0, is_causal,
                                                  rng, rng, scale=scale)
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)


def _cpu_fwd(q, k, v, is_causal, scale):
    g = q.shape[2] // k.shape[2]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)))
    out, lse = _op("_scaled_dot_product_flash_attention_for_cpu")(qt, kt, vt, 0.0, is_causal, scale=scale)
    return out.transpose(1, 2).contiguous(), lse.float()


def _cpu_bwd(dout, q, k, v, out, lse, is_causal, scale):
    b, sk, hkv, d = k.shape
    g = q.shape[2] // hkv
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)))
    dq, dk, dv = _op("_scaled_dot_product_flash_attention_for_cpu_backward")(
        dout.to(q.dtype).transpose(1, 2), qt, kt, vt, out.to(q.dtype).transpose(1, 2), lse.float(), 0.0,
        is_causal, scale=scale)
    dk = dk.transpose(1, 2).reshape(b, sk, hkv, g, d).sum(3)  # GQA: sum over the repeated heads
    dv = dv.transpose(1, 2).reshape(b, sk, hkv, g, d).sum(3)
    return dq.transpose(1, 2).contiguous(), dk.to(k.dtype), dv.to(v.dtype)


def sdpa_softmax_kernel(fast_cpu: bool = False, fallback: SoftmaxKernel | None = None) -> SoftmaxKernel:
    """The :class:`SoftmaxKernel` using torch's flash ops where they apply and ``fallback`` (default
    ``softmax_kernel("auto")``: Triton on GPU, torch on CPU) elsewhere."""
    if fallback is None:
        from dist_attn.kernels.flash_attn import softmax_kernel
        fallback = softmax_kernel("auto")

    def _extra(cu_seqlens, window_size):
        return {k: v for k, v in (("cu_seqlens", cu_seqlens), ("window_size", window_size)) if v is not None}

    def fwd(q, k, v, *, causal=False, softmax_scale=None, q_offset=0, k_offset=0, cu_seqlens=None, window_size=None):
        mode = fast_mode(q, k, causal=causal, q_offset=q_offset, k_offset=k_offset, cu_seqlens=cu_seqlens,
                         window_size=window_size, cpu=fast_cpu)
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
        if mode is not None:
            try:
                return (_cuda_fwd if q.is_cuda else _cpu_fwd)(q, k, v, mode, scale)
            except RuntimeError as exc:  # an op this torch build rejects: fall back, say so once
                _warn_once("fwd", exc)
        return fallback.fwd(q, k, v, causal=causal, softmax_scale=softmax_scale, q_offset=q_offset,
                            k_offset=k_offset, **_extra(cu_seqlens, window_size))

    def bwd(dout, q, k, v, out, lse, *, causal=False, softmax_scale=None, q_offset=0, k_offset=0, dlse=None,
            cu_seqlens=None, window_size=None):
        mode = fast_mode(q, k, causal=causal, q_offset=q_offset, k_offset=k_offset, cu_seqlens=cu_seqlens,
                         window_size=window_size, dlse=dlse, cpu=fast_cpu)
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
        if mode is not None:
            try:
                return (_cuda_bwd if q.is_cuda else _cpu_bwd)(dout, q, k, v, out, lse, mode, scale)
            except RuntimeError as exc:
                _warn_once("bwd", exc)
        return fallback.bwd(dout, q, k, v, out, lse, causal=causal, softmax_scale=softmax_scale, q_offset=q_offset,
                            k_offset=k_offset, dlse=dlse, **_extra(cu_seqlens, window_size))

    return SoftmaxKernel(f"sdpa_flash[{'cpu+' if fast_cpu else ''}{fallback.name}]", fwd, bwd)


def _warn_once(kind, exc):
    if kind not in _warned:
        _warned.add(kind)
        log.warning("sdpa_flash %s: torch's flash op failed (%s); using the fallback kernel",
                    kind, str(exc).splitlines()[0][:200])
