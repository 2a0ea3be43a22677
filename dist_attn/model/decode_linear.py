"""Decoders of the recurrent mixers (``L``, ``G``, ``D``) for :mod:`dist_attn.model.generate`.

Each keeps a fixed-size state per layer (constant memory and time per token). ``prefill`` runs the
training forward's kernel asked for its final state; ``step`` advances the recurrence by one token in
fp32 (fp64 for fp64 models). What follows the recurrence (output norm, gate) is the training forward's
own function from :mod:`dist_attn.model.mixers` (``linear_out``, ``delta_out``), so both paths share it.

* ``L``: ``S_t = exp(decay_h) S_{t-1} + k_t^T v_t`` (``[B, H, Dk, Dv]``, k = silu(x Wk)),
  ``o_t = D^-1/2 silu(q_t) S_t``. ``G``: the same with the per-token log gate g_t = mamba_gate(x_t Wa).
* ``D``: ``S_t = exp(g_t) (S_{t-1} - beta_t k_t (k_t^T S_{t-1})) + beta_t k_t v_t^T`` after a causal
  depthwise convolution whose last K-1 inputs are part of the state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dist_attn import dispatch
from dist_attn.model.generate import MixerDecoder, register_decoder
from dist_attn.model.layers import GatedDeltaNet, GatedLinearAttention, LinearAttention, decay_schedule
from dist_attn.model.mixers import delta_out, delta_rule_inputs, linear_out, mamba_gate


def _linear_out(m, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """o ``[B, S, H, D]`` (attention output) -> ``mixers.linear_out`` (norm, sigmoid gate), o_proj -> [B, S, d]."""
    b, s = x.shape[:2]
    o = linear_out(o, m.gate(x).view(b, s, m.h, m.hd), m.out_norm.weight, m.out_norm.eps)
    return m.o_proj(o.reshape(b, s, m.h * m.hd))


@register_decoder(LinearAttention)
class LinearDecoder(MixerDecoder):
    """State: ``S [B, H, Dk, Dv]`` in fp32 (fp64 for fp64 models), the lightning kernel's accumulator.
    Subclasses change only the decay (:meth:`_decay`)."""

    @staticmethod
    def _decay(m, x):
        """``(kernel kwargs, log lambda [B|1, S, H] fp32)`` of the layer on ``x [B, S, d]``: L's fixed
        log-decay ``[H]`` (rebuilt exactly when the module was cast, as its forward does)."""
        d = m.log_decay
        d = d if d.dtype == torch.float32 else decay_schedule(m.h, *m._decay_range).to(d.device)
        return dict(decay=d), d[None, None]

    def init_state(self, m, batch, device, dtype):
        return torch.zeros(batch, m.h, m.hd, m.hd, device=device, dtype=torch.promote_types(dtype, torch.float32))

    def prefill(self, m, x, position_ids):
        from dist_attn.kernels.lightning_attn import linear_kernel
        b, s, _ = x.shape
        shape = (b, s, m.h, m.hd)
        q, k, v = F.silu(m.q_proj(x).view(shape)), F.silu(m.k_proj(x).view(shape)), m.v_proj(x).view(shape)
        # the kernel dispatch.linear_attention calls without CP, asked for its final state too
        o, state = linear_kernel(m.cp.backend)(q, k, v, **self._decay(m, x)[0], scale=m.hd ** -0.5)
        return _linear_out(m, o, x), state

    def step(self, m, x, position, state):
        b = x.shape[0]
        shape = (b, m.h, m.hd)
        acc = state.dtype
        q = F.silu(m.q_proj(x).view(shape)).to(acc)
        k = F.silu(m.k_proj(x).view(shape)).to(acc)
        v = m.v_proj(x).view(shape)
        lam = torch.exp(self._decay(m, x)[1][:, 0].to(acc))                      # [B|1, H]
        state = state * lam[:, :, None, None] + k.unsqueeze(-1) * v.to(acc).unsqueeze(-2)  # [B, H, Dk, Dv]
        o = (m.hd ** -0.5) * torch.einsum("bhk,bhkv->bhv", q, state)                # [B, H, Dv]
        return _linear_out(m, o.to(v.dtype).unsqueeze(1), x), state


@register_decoder(GatedLinearAttention)
class GatedLinearDecoder(LinearDecoder):
    """``G``: as ``L`` with the per-token log gate g_t = mamba_gate(x_t Wa) in place of the fixed decay:
    ``S_t = exp(g_t) S_{t-1} + k_t^T v_t``."""

    @staticmethod
    def _decay(m, x):
        g = mamba_gate(m.a_proj(x), m.A_log, m.dt_bias)                           # [B, S, H] fp32
        return dict(decay=None, g=g), g


@register_decoder(GatedDeltaNet)
class GatedDeltaDecoder(MixerDecoder):
    """``D``: state ``(S [B, H, Dk, Dv] fp32, conv window [B, K-1, C])``, the delta-rule state and the
    last K-1 convolution inputs (C = H·(2Dk + Dv) channels, zeros before the first token). Step::

        y_t = silu(sum_j w[:, j] x_{t-K+1+j});  q, k = l2norm;  beta = sigmoid(x Wb);  g = mamba_gate(x Wa)
        S_t = exp(g_t) (S_{t-1} - beta_t k_t (k_t^T S_{t-1})) + beta_t k_t v_t^T;  o_t = Dk^-1/2 q_t^T S_t
    """

    def init_state(self, m, batch, device, dtype):
        acc = torch.promote_types(dtype, torch.float32)
        c = m.h * (2 * m.dk + m.dv)
        return (torch.zeros(batch, m.h, m.dk, m.dv, device=device, dtype=acc),
                torch.zeros(batch, m.k_conv - 1, c, device=device, dtype=dtype))

    @staticmethod
    def _inputs(m, x):
        b, s, _ = x.shape
        q, k = m.q_proj(x).view(b, s, m.h, m.dk), m.k_proj(x).view(b, s, m.h, m.dk)
        v = m.v_proj(x).view(b, s, m.h, m.dv)
        return torch.cat([q, k, v], dim=-1).reshape(b, s, -1)                # [B, S, C]: (head, [q|k|v])

    @staticmethod
    def _finish(m, y, x):
        """Conv output ``y [B, S, C]`` -> q, k (L2), v, beta, g of the delta rule (``mixers.delta_rule_inputs``)."""
        b, s, _ = x.shape
        q, k, v = y.view(b, s, m.h, 2 * m.dk + m.dv).split([m.dk, m.dk, m.dv], dim=-1)
        return delta_rule_inputs(q, k, v, m.a_proj(x), m.b_proj(x), m.A_log, m.dt_bias)

    @staticmethod
    def _out(m, o, x):
        b, s = x.shape[:2]
        o = delta_out(o, m.gate(x).view(b, s, m.h, m.dv), m.out_norm.weight, m.out_norm.eps)
        return m.o_proj(o.reshape(b, s, m.h * m.dv))

    def prefill(self, m, x, position_ids):
        from dist_attn.kernels.gated_delta import delta_kernel
        xin = self._inputs(m, x)
        w = m.conv_weight.reshape(xin.shape[-1], -1)                          # [C, K]
        y = dispatch.short_conv(xin, w, cp=m.cp, activation="silu")
        q, k, v, beta, g = self._finish(m, y, x)
        o, state = delta_kernel(dispatch._delta_backend(m.cp.backend))(q, k, v, beta, g, scale=m.dk ** -0.5)
        window = torch.cat([xin.new_zeros(xin.shape[0], m.k_conv - 1, xin.shape[-1]), xin], dim=1)
        return self._out(m, o.to(v.dtype), x), (state, window[:, window.shape[1] - (m.k_conv - 1):])

    def step(self, m, x, position, state):
        s_mat, window = state
        acc = s_mat.dtype
        xin = self._inputs(m, x)                                              # [B, 1, C]
        full = torch.cat([window, xin], dim=1)                                # [B, K, C]
        w = m.conv_weight.reshape(xin.shape[-1], -1).to(acc)                  # [C, K]
        y = F.silu((full.to(acc) * w.t()[None]).sum(dim=1, keepdim=True)).to(x.dtype)
        q, k, v, beta, g = self._finish(m, y, x)
        q, k, v = q[:, 0].to(acc), k[:, 0].to(acc), v[:, 0].to(acc)          # [B, H, D]
        beta, lam = beta[:, 0].to(acc), torch.exp(g[:, 0].to(acc))            # [B, H]
        ks = torch.einsum("bhk,bhkv->bhv", k, s_mat)                          # k^T S
        s_mat = lam[..., None, None] * (s_mat - beta[..., None, None] * k.unsqueeze(-1) * ks.unsqueeze(-2)) \
            + beta[..., None, None] * k.unsqueeze(-1) * v.unsqueeze(-2)
        o = (m.dk ** -0.5) * torch.einsum("bhk,bhkv->bhv", q, s_mat)
        return self._out(m, o.to(x.dtype).unsqueeze(1), x), (s_mat, full[:, 1:])
