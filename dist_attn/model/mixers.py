"""The math of each sequence mixer, written once, on ``[B, S/P, H, D]`` tensors.

Modules that own the projections call these functions: :mod:`dist_attn.model.layers` (the plain
model, full weights) and the megatron engine's layers (``parallel/_megatron_layers.py``: fused,
tensor-parallel projections on megatron's ``[s, b, h]`` activations, H/T heads per TP rank). A module
computes q, k, v and gate *projections* in our layout and hands them here; everything between the
projections and the output projection is here, so a new mixer type is one function plus its
projections in each engine.

Mixers:

* :func:`softmax_mix` -- causal GQA softmax attention with RoPE at the tokens' positions and an
  optional head-wise sigmoid output gate ``o_h * sigmoid(x w_h)`` (one scalar per head and token).
* :func:`linear_mix` -- decayed linear attention: ``q = silu(x Wq)``, ``k = silu(x Wk)``, ``v = x Wv``;
  ``S_t = exp(decay_h + g_t) S_{t-1} + k_t^T v_t``, ``o_t = D^-1/2 q_t S_t``; RMSNorm over D per head;
  elementwise sigmoid gate. ``L`` layers pass a fixed per-head ``decay``, ``G`` layers a per-token gate
  ``g`` from :func:`mamba_gate`.
* :func:`delta_mix` -- Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024; the layer of Qwen3-Next)::

      q, k, v = silu(conv_K(x Wq | x Wk | x Wv))          causal depthwise conv, kernel K, per channel
      q, k    = q / |q|, k / |k|                          L2 norm over Dk per head
      beta    = sigmoid(x Wb),   g = mamba_gate(x Wa)      [B, S/P, H] each
      S_t     = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = Dk^-1/2 q_t^T S_t
      o       = RMSNorm_Dv(o) * silu(x Wo_gate)            per head, elementwise gate

* :func:`mamba_gate` -- the per-token log gate of Mamba2 / Gated DeltaNet, ``g = -exp(A_log) ·
  softplus(a + dt_bias) <= 0`` per head (a = x Wa), in fp32.

Context parallelism: the convolution reaches the K-1 tokens before each chunk by a halo exchange
(:func:`dist_attn.dispatch.short_conv`), the delta rule by state passing or by the all-to-all
(:func:`dist_attn.dispatch.delta_attention`, chosen by ``parallel.linear_cp``).

Packed documents: every mixer takes ``cu_seqlens`` (1-D int tensor of GLOBAL document offsets
``[0, e_1, ..., S]``, the same for every batch row, see ``notes/contracts.md``), passed to the
attention only when it is not None, so a call without documents is exactly the unpacked one. RoPE
positions are the caller's ``position_ids``: for packed documents they restart at each document
(:func:`dist_attn.data.sharding.shard_packed`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dist_attn import dispatch
from dist_attn.context import CPContext


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * g over the last dim; statistics in fp32 (fp64 for fp64 inputs), result in the input dtype."""
    xf = x.to(_acc(x))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(xf.dtype)).to(x.dtype)


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def apply_rope(x: torch.Tensor, position_ids: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate ``x [B, S/P, H, D]`` by the *global* positions ``position_ids [B, S/P]`` or ``[S/P]``.

    Channel pairs (i, i + D/2) rotate by angle pos * theta^(-2i/D) ("rotate half" convention), so
    q_m . k_n depends only on m - n. Positions come from :func:`dist_attn.layout.position_ids`, which
    is why a shard in the zigzag layout (positions not contiguous) still gets the right rotation.
    """
    d = x.shape[-1]
    acc = torch.promote_types(x.dtype, torch.float32)  # angles in fp32 (fp64 for fp64 inputs)
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=acc) / d)  # (D/2,)
    pos = position_ids.to(device=x.device, dtype=acc)
    if pos.dim() == 1:
        pos = pos.unsqueeze(0)  # (1, S/P)
    ang = pos.unsqueeze(-1) * inv_freq  # (B|1, S/P, D/2)
    cos, sin = ang.cos().unsqueeze(2), ang.sin().unsqueeze(2)  # (B|1, S/P, 1, D/2)
    xf = x.to(acc)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def _docs(cu_seqlens) -> dict:
    return {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}


def softmax_mix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, position_ids: torch.Tensor, theta: float,
                cp: CPContext, gate: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, window_size: int | None = None) -> torch.Tensor:
    """q ``[B, S/P, Hq, D]``, k/v ``[B, S/P, Hkv, D]`` (projections), gate logits ``[B, S/P, Hq]`` or None
    -> ``[B, S/P, Hq, D]``: RoPE on q and k, causal attention through ``dispatch`` (the CP strategy;
    ``window_size`` W: a query at p sees keys p - W .. p), then ``o_h * sigmoid(gate_h)``."""
    q, k = apply_rope(q, position_ids, theta), apply_rope(k, position_ids, theta)
    o = dispatch.softmax_attention(q, k, v, cp=cp, causal=True, window_size=window_size,
                                   **_docs(cu_seqlens))  # (B, S/P, Hq, D)
    return softmax_out(o, gate)


def softmax_out(o: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """What follows the softmax attention: ``o [B, S, Hq, D]`` times sigmoid(gate logits ``[B, S, Hq]``),
    one gate per head and token (``o`` unchanged for gate None). Shared by :func:`softmax_mix` and decoding."""
    if gate is not None:
        o = o * torch.sigmoid(gate).unsqueeze(-1)  # (B, S/P, Hq, 1)
    return o


def linear_mix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, *,
               decay: torch.Tensor | None, norm_weight: torch.Tensor, eps: float, cp: CPContext,
               cu_seqlens: torch.Tensor | None = None, g: torch.Tensor | None = None) -> torch.Tensor:
    """q/k/v/gate ``[B, S/P, H, D]`` (projections), ``decay [H]`` log-decay (fp32, <= 0) or None, ``g``
    ``[B, S/P, H]`` per-token log gate (<= 0) or None, ``norm_weight [D]`` -> ``[B, S/P, H, D]``: silu
    feature maps, causal gated linear attention through ``dispatch`` with scale D^-1/2, RMSNorm over D
    per head, elementwise sigmoid gate."""
    q, k = F.silu(q), F.silu(k)
    extra = _docs(cu_seqlens) if g is None else {**_docs(cu_seqlens), "g": g}
    o = dispatch.linear_attention(q, k, v, cp=cp, decay=decay, scale=q.shape[-1] ** -0.5, **extra)
    return linear_out(o, gate, norm_weight, eps)


def linear_out(o: torch.Tensor, gate: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """What follows the linear attention (``L``, ``G``): RMSNorm over D per head of ``o [B, S, H, D]``
    times sigmoid(gate ``[B, S, H, D]``) elementwise. Shared by :func:`linear_mix` and decoding."""
    return rms_norm(o, norm_weight, eps) * torch.sigmoid(gate)


def mamba_gate(a: torch.Tensor, a_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """``a [B, S/P, H]`` (the gate projection x Wa), ``a_log, dt_bias [H]`` -> fp32 log gate
    ``g = -exp(A_log) · softplus(a + dt_bias)`` ``[B, S/P, H]`` (<= 0): the discretised decay exp(-A·dt)
    of Mamba2 with a data-dependent step dt = softplus(a + dt_bias), one scalar per head and token."""
    acc = _acc(a)  # fp32 (fp64 for fp64 inputs)
    return -torch.exp(a_log.to(acc)) * F.softplus(a.to(acc) + dt_bias.to(acc))


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(|x|^2 + eps) over the last dim; statistics in fp32 (fp64 for fp64), result in the input dtype."""
    xf = x.to(_acc(x))
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def delta_mix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              gate: torch.Tensor, *, conv_weight: torch.Tensor | None, a_log: torch.Tensor, dt_bias: torch.Tensor,
              norm_weight: torch.Tensor, eps: float, cp: CPContext,
              cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Gated DeltaNet between the projections and the output projection (module docstring).

    q, k ``[B, S/P, H, Dk]``, v and the output gate ``[B, S/P, H, Dv]``, a, b ``[B, S/P, H]``
    (projections); ``conv_weight [H, 2·Dk + Dv, K]`` (per head: the q, k, v channels' filters; None
    for no convolution), ``a_log, dt_bias [H]``, ``norm_weight [Dv]`` -> ``[B, S/P, H, Dv]``.
    The three convolutions run as one on the per-head concatenation ``[q_h | k_h | v_h]`` (one halo
    exchange under CP); a TP rank passes its heads' slice of every per-head tensor.
    """
    bsz, s, h, dk = q.shape
    dv = v.shape[-1]
    if conv_weight is None:
        q, k, v = F.silu(q), F.silu(k), F.silu(v)
    else:
        x = torch.cat([q, k, v], dim=-1).reshape(bsz, s, h * (2 * dk + dv))  # channels (head, [q|k|v])
        x = dispatch.short_conv(x, conv_weight.reshape(h * (2 * dk + dv), -1), cp=cp, activation="silu",
                                **_docs(cu_seqlens))
        q, k, v = x.view(bsz, s, h, 2 * dk + dv).split([dk, dk, dv], dim=-1)
    q, k, v, beta, g = delta_rule_inputs(q, k, v, a, b, a_log, dt_bias)
    o = dispatch.delta_attention(q, k, v, beta, g, cp=cp, scale=dk ** -0.5, **_docs(cu_seqlens))
    return delta_out(o, gate, norm_weight, eps)


def delta_rule_inputs(q, k, v, a, b, a_log, dt_bias):
    """Convolved q, k ``[B, S, H, Dk]``, v ``[B, S, H, Dv]`` and the a, b projections ``[B, S, H]`` -> the
    delta rule's (q/|q|, k/|k|, v contiguous, beta = sigmoid(b) in (0, 1), g = mamba_gate(a) fp32 <= 0).
    Shared by :func:`delta_mix` and decoding."""
    return (l2_normalize(q), l2_normalize(k), v.contiguous(), torch.sigmoid(b), mamba_gate(a, a_log, dt_bias))


def delta_out(o: torch.Tensor, gate: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """What follows the delta rule (``D``): RMSNorm over Dv per head of ``o [B, S, H, Dv]`` times
    silu(gate ``[B, S, H, Dv]``) elementwise. Shared by :func:`delta_mix` and decoding."""
    return rms_norm(o, norm_weight, eps) * F.silu(gate)
