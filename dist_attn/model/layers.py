"""Building blocks of the hybrid model: RMSNorm, SwiGLU and the two sequence mixers' modules.

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
from dist_attn.model.mixers import apply_rope, linear_mix, rms_norm, softmax_mix

__all__ = ["RMSNorm", "SwiGLU", "apply_rope", "SoftmaxAttention", "LinearAttention", "decay_schedule", "MIXERS",
           "init_linear"]


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
                        cu_seqlens=cu_seqlens)  # (B, S/P, Hq, D)
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


class LinearAttention(nn.Module):
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
        self.cp = cp
        self.h, self.hd = cfg.lin_heads, cfg.lin_head_dim
        d, inner = cfg.d_model, cfg.lin_heads * cfg.lin_head_dim
        self.q_proj = nn.Linear(d, inner, bias=False)
        self.k_proj = nn.Linear(d, inner, bias=False)
        self.v_proj = nn.Linear(d, inner, bias=False)
        self.gate = nn.Linear(d, inner, bias=False)
        self.out_norm = RMSNorm(self.hd, cfg.norm_eps)
        self.o_proj = nn.Linear(inner, d, bias=False)
        self.o_proj.is_output_proj = True
        # the output norm makes q, k, v scale-invariant: see ModelConfig.linear_qkv_init_std
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            proj.init_std = cfg.linear_qkv_std
        # not persistent: a function of the config, so checkpoints do not pin the schedule
        self._decay_range = (cfg.linear_decay_min, cfg.linear_decay_max)
        self.register_buffer("log_decay", decay_schedule(self.h, *self._decay_range), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
        b, s, _ = x.shape
        shape = (b, s, self.h, self.hd)
        q, k, v = self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)
        decay = self.log_decay  # [H], <= 0
        if decay.dtype != torch.float32:  # module cast to bf16 (e.g. by DeepSpeed): rebuild the exact values
            decay = decay_schedule(self.h, *self._decay_range).to(decay.device)
        o = linear_mix(q, k, v, self.gate(x).view(shape), decay=decay, norm_weight=self.out_norm.weight,
                       eps=self.out_norm.eps, cp=self.cp, cu_seqlens=cu_seqlens)  # (B, S/P, H, D)
        return self.o_proj(o.reshape(b, s, self.h * self.hd))


MIXERS = {"L": LinearAttention, "F": SoftmaxAttention}


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
