"""Building blocks of the hybrid model: RMSNorm, SwiGLU and the sequence mixers' modules (``L``, ``G``,
``D``, ``F``).

The mixers' math lives in :mod:`dist_attn.model.mixers` (shared with the megatron engine's layers);
the modules here own the full-width projections and the ``[B, S/P, d] <-> [B, S/P, H, D]`` reshapes.

Shapes: B batch, S/P local tokens (this rank's shard of a global sequence of S tokens), d = d_model,
H heads, D head dim. Activations are ``[B, S/P, d]``; attention tensors ``[B, S/P, H, D]``.

Every module that mixes information *across tokens* declares ``token_mixing = True`` and must also
declare ``cp_aware = True``, meaning it reaches the other ranks' tokens through
:mod:`dist_attn.dispatch` (see :func:`dist_attn.model.hybrid.check_cp_awareness`). Pointwise
modules declare ``token_mixing = False``. Both mixers here call only ``dispatch``: with CP disabled
that is the local kernel, with CP enabled a strategy that communicates.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dist_attn.context import CPContext
from dist_attn.model.config import ModelConfig
from dist_attn.model.mixers import apply_rope, delta_mix, linear_mix, mamba_gate, rms_norm, softmax_mix

__all__ = ["RMSNorm", "SwiGLU", "apply_rope", "SoftmaxAttention", "LinearAttention", "GatedLinearAttention",
           "GatedDeltaNet", "decay_schedule", "gate_init", "MIXERS", "init_linear"]


class RMSNorm(nn.Module):
    """x / rms(x) * g over the last dim; statistics in fp32, result in the input dtype."""
    token_mixing = False

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): ``[B, S/P, d] -> [B, S/P, d]``, per token."""
    token_mixing = False

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        self.down.is_output_proj = True  # scaled init, see HybridLM._init_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class SoftmaxAttention(nn.Module):
    """Causal GQA softmax attention with RoPE and an optional head-wise sigmoid output gate.

    ``x [B, S/P, d]`` -> q ``[B, S/P, Hq, D]``, k/v ``[B, S/P, Hkv, D]`` -> attention via
    ``dispatch.softmax_attention`` -> (gate: o_h * sigmoid(x w_h), one scalar per head and token,
    "Gated Attention for LLMs", 2025; it lets a head output ~0 instead of parking mass on a sink
    token) -> ``o_proj`` -> ``[B, S/P, d]``.
    """
    token_mixing = True
    cp_aware = True

    def __init__(self, cfg: ModelConfig, cp: CPContext):
        super().__init__()
        self.cp = cp
        self.hq, self.hkv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.softmax_head_dim
        self.theta = cfg.rope_theta
        self.window_size = cfg.window_size  # sliding left window (None: full causal)
        d = cfg.d_model
        self.q_proj = nn.Linear(d, self.hq * self.hd, bias=False)
        self.k_proj = nn.Linear(d, self.hkv * self.hd, bias=False)
        self.v_proj = nn.Linear(d, self.hkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.hq * self.hd, d, bias=False)
        self.o_proj.is_output_proj = True
        self.gate = nn.Linear(d, self.hq, bias=False) if cfg.gated_attention else None

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.hq, self.hd)
        k = self.k_proj(x).view(b, s, self.hkv, self.hd)
        v = self.v_proj(x).view(b, s, self.hkv, self.hd)
        gate = self.gate(x) if self.gate is not None else None  # (B, S/P, Hq): one gate per head
        o = softmax_mix(q, k, v, position_ids=position_ids, theta=self.theta, cp=self.cp, gate=gate,
                        cu_seqlens=cu_seqlens, window_size=self.window_size)  # (B, S/P, Hq, D)
        return self.o_proj(o.reshape(b, s, self.hq * self.hd))


def decay_schedule(n_heads: int, lam_min: float, lam_max: float) -> torch.Tensor:
    """Per-head log-decay g ``[H]`` (g = log lambda <= 0), fixed, not trained.

    1 - lambda (the forgetting rate, ~1 / memory length in tokens) is log-spaced from 1 - lam_min
    (head 0) to 1 - lam_max (head H-1): a geometric spread of memory lengths, the role played by
    TransNormerLLM's / Lightning's ALiBi-like slopes 2^(-8h/H). The kernel contract does not
    differentiate the decay, so it is a buffer.
    """
    if n_heads == 1:
        rate = torch.tensor([1.0 - lam_max], dtype=torch.float64)
    else:
        t = torch.linspace(0.0, 1.0, n_heads, dtype=torch.float64)
        rate = (1.0 - lam_min) ** (1.0 - t) * (1.0 - lam_max) ** t
    return torch.log1p(-rate).float()  # log(lambda), accurate for lambda near 1


class _LinearBase(nn.Module):
    """What ``L`` and ``G`` share: q/k/v and output-gate projections ``[d -> H·D]``, the per-head output
    RMSNorm and ``o_proj``; the state's decay (fixed ``[H]`` or per token ``[B, S/P, H]``) is the subclass's.
    Parameters are created in the order q, k, v, gate, (the subclass's), out_norm, o_proj."""

    def _init_in(self, cfg: ModelConfig, cp: CPContext) -> None:
        self.cp = cp
        self.h, self.hd = cfg.lin_heads, cfg.lin_head_dim
        d, inner = cfg.d_model, cfg.lin_heads * cfg.lin_head_dim
        self.q_proj = nn.Linear(d, inner, bias=False)
        self.k_proj = nn.Linear(d, inner, bias=False)
        self.v_proj = nn.Linear(d, inner, bias=False)
        self.gate = nn.Linear(d, inner, bias=False)

    def _init_out(self, cfg: ModelConfig) -> None:
        self.out_norm = RMSNorm(self.hd, cfg.norm_eps)
        self.o_proj = nn.Linear(self.h * self.hd, cfg.d_model, bias=False)
        self.o_proj.is_output_proj = True
        # the output norm makes q, k, v scale-invariant: see ModelConfig.linear_qkv_init_std
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            proj.init_std = cfg.linear_qkv_std

    def _mix(self, x: torch.Tensor, cu_seqlens, **decay_or_g) -> torch.Tensor:
        """``x [B, S/P, d]`` -> ``mixers.linear_mix`` (decay=... or g=...) -> ``o_proj`` -> ``[B, S/P, d]``."""
        b, s, _ = x.shape
        shape = (b, s, self.h, self.hd)
        q, k, v = self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)
        o = linear_mix(q, k, v, self.gate(x).view(shape), norm_weight=self.out_norm.weight,
                       eps=self.out_norm.eps, cp=self.cp, cu_seqlens=cu_seqlens, **decay_or_g)  # (B, S/P, H, D)
        return self.o_proj(o.reshape(b, s, self.h * self.hd))


class LinearAttention(_LinearBase):
    """Causal linear attention with per-head decay (Lightning / TransNormerLLM / MiniMax style).

    q = silu(x Wq), k = silu(x Wk), v = x Wv ``[B, S/P, H, D]``;  with lambda_h = exp(g_h),
    S_t = lambda_h S_{t-1} + k_t^T v_t and o_t = D^-1/2 q_t S_t (``dispatch.linear_attention``);
    then RMSNorm over D per head, an elementwise sigmoid gate sigmoid(x Wg), and ``o_proj``.

    Feature map: SiLU rather than elu+1. elu+1 keeps features positive so that the classic
    normaliser q_t . sum_j k_j stays positive; we normalise the *output* with RMSNorm instead
    (TransNormerLLM's NormAttention), so positivity buys nothing, and SiLU keeps a sign (a key can
    subtract from the state) -- TransNormerLLM and MiniMax-01 use it. The output norm also bounds
    the otherwise unnormalised growth of S_t, and removes the dependence on the scale D^-1/2.
    """
    token_mixing = True
    cp_aware = True

    def __init__(self, cfg: ModelConfig, cp: CPContext):
        super().__init__()
        self._init_in(cfg, cp)
        self._init_out(cfg)
        # not persistent: a function of the config, so checkpoints do not pin the schedule
        self._decay_range = (cfg.linear_decay_min, cfg.linear_decay_max)
        self.register_buffer("log_decay", decay_schedule(self.h, *self._decay_range), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
        decay = self.log_decay  # [H], <= 0
        if decay.dtype != torch.float32:  # module cast to bf16 (e.g. by DeepSpeed): rebuild the exact values
            decay = decay_schedule(self.h, *self._decay_range).to(decay.device)
        return self._mix(x, cu_seqlens, decay=decay)


def gate_init(n_heads: int, a_range=(1.0, 16.0), dt_range=(1e-3, 0.1), dt_floor: float = 1e-4):
    """Initial ``(A_log, dt_bias)`` ``[H]`` of a Mamba2-style gate (:func:`~dist_attn.model.mixers.mamba_gate`),
    from the global RNG: A ~ U(a_range), dt log-uniform in dt_range (floored), dt_bias = softplus^-1(dt),
    so at init g = -A·dt: memories of ~1/(A·dt) tokens, spread over the heads (Mamba2's init)."""
    a = torch.empty(n_heads).uniform_(*a_range)
    lo, hi = math.log(dt_range[0]), math.log(dt_range[1])
    dt = torch.exp(torch.rand(n_heads) * (hi - lo) + lo).clamp(min=dt_floor)
    return torch.log(a), dt + torch.log(-torch.expm1(-dt))  # softplus^-1(dt) = dt + log(1 - e^-dt)


class GatedLinearAttention(_LinearBase):
    """``G``: :class:`LinearAttention` with a per-token gate in place of the fixed decay (Mamba2 / simple GLA).

    q, k, v, the output gate and the norm as in ``L``; the state decays by a data-dependent scalar per
    head and token, S_t = exp(g_t) S_{t-1} + k_t^T v_t with g_t = -exp(A_log) · softplus(x_t Wa + dt_bias)
    <= 0 (``mixers.mamba_gate``; ``a_proj [d -> H]``, ``A_log, dt_bias [H]`` trained). Under CP the gate
    travels as LASP-2's per-token ``g`` (state passing) or with q/k/v through Ulysses' all-to-all.
    """
    token_mixing = True
    cp_aware = True

    def __init__(self, cfg: ModelConfig, cp: CPContext):
        super().__init__()
        self._init_in(cfg, cp)
        self.a_proj = nn.Linear(cfg.d_model, self.h, bias=False)
        a_log, dt_bias = gate_init(self.h)
        self.A_log, self.dt_bias = nn.Parameter(a_log), nn.Parameter(dt_bias)
        self._init_out(cfg)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
        g = mamba_gate(self.a_proj(x), self.A_log, self.dt_bias)  # (B, S/P, H) fp32, <= 0
        return self._mix(x, cu_seqlens, decay=None, g=g)


class GatedDeltaNet(nn.Module):
    """``D``: Gated DeltaNet (the delta rule with a Mamba2 gate; Qwen3-Next's linear layer).

    ``x [B, S/P, d]`` -> q, k ``[B, S/P, H, Dk]``, v ``[B, S/P, H, Dv]``, a, b ``[B, S/P, H]``, output
    gate ``[B, S/P, H, Dv]`` -> :func:`~dist_attn.model.mixers.delta_mix` (causal depthwise conv of
    kernel K on q|k|v + SiLU, L2-normalised q and k, beta = sigmoid(b), g = -exp(A_log)·softplus(a +
    dt_bias), the gated delta rule through ``dispatch``, RMSNorm(o) · silu(gate)) -> ``o_proj``.

    Parameters: q/k/v/gate/a/b projections, ``conv_weight [H, 2·Dk + Dv, K]`` (per head the filters of
    its q, k and v channels, so a TP slice of heads is a slice of this tensor), ``A_log``, ``dt_bias [H]``,
    the output norm's gain ``[Dv]`` (shared by the heads), ``o_proj``. Init: q/k/v at d^-1/2 (the L2
    norms and the output norm make the layer insensitive to their scale, as for ``L``), conv filters
    U(±K^-1/2) (``nn.Conv1d``'s default for a depthwise filter), the gate as Mamba2 (:func:`gate_init`).
    """
    token_mixing = True
    cp_aware = True

    def __init__(self, cfg: ModelConfig, cp: CPContext):
        super().__init__()
        self.cp = cp
        self.h, self.dk, self.dv, self.k_conv = cfg.d_heads, cfg.d_head_dim, cfg.d_v_head_dim, cfg.conv_size
        d, h = cfg.d_model, self.h
        self.q_proj = nn.Linear(d, h * self.dk, bias=False)
        self.k_proj = nn.Linear(d, h * self.dk, bias=False)
        self.v_proj = nn.Linear(d, h * self.dv, bias=False)
        self.gate = nn.Linear(d, h * self.dv, bias=False)
        self.a_proj = nn.Linear(d, h, bias=False)
        self.b_proj = nn.Linear(d, h, bias=False)
        bound = self.k_conv ** -0.5
        self.conv_weight = nn.Parameter(torch.empty(h, 2 * self.dk + self.dv, self.k_conv).uniform_(-bound, bound))
        a_log, dt_bias = gate_init(h)
        self.A_log, self.dt_bias = nn.Parameter(a_log), nn.Parameter(dt_bias)
        self.out_norm = RMSNorm(self.dv, cfg.norm_eps)
        self.o_proj = nn.Linear(h * self.dv, d, bias=False)
        self.o_proj.is_output_proj = True
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            proj.init_std = cfg.linear_qkv_std

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
        b, s, _ = x.shape
        h = self.h
        q, k = self.q_proj(x).view(b, s, h, self.dk), self.k_proj(x).view(b, s, h, self.dk)
        v, gate = self.v_proj(x).view(b, s, h, self.dv), self.gate(x).view(b, s, h, self.dv)
        o = delta_mix(q, k, v, self.a_proj(x), self.b_proj(x), gate,
                      conv_weight=self.conv_weight, a_log=self.A_log,
                      dt_bias=self.dt_bias, norm_weight=self.out_norm.weight, eps=self.out_norm.eps, cp=self.cp,
                      cu_seqlens=cu_seqlens)  # (B, S/P, H, Dv)
        return self.o_proj(o.reshape(b, s, h * self.dv))


MIXERS = {"L": LinearAttention, "G": GatedLinearAttention, "D": GatedDeltaNet, "F": SoftmaxAttention}


def init_linear(module: nn.Module, std: float, n_layers: int) -> None:
    """Normal(0, std) for weight matrices; output projections (marked ``is_output_proj``) get
    std / sqrt(2 n_layers) so the residual stream's variance does not grow with depth (GPT-2);
    a module carrying its own ``init_std`` uses that."""
    if isinstance(module, nn.Linear):
        s = std / math.sqrt(2 * n_layers) if getattr(module, "is_output_proj", False) else std
        s = getattr(module, "init_std", s)
        nn.init.normal_(module.weight, mean=0.0, std=s)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
