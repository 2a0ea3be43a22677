"""Configuration of the hybrid language model: one dataclass, validated, with a parameter and FLOP count.

A hybrid stacks ``n_layers`` blocks; ``pattern`` names the sequence mixer of each block and is repeated /
truncated to ``n_layers``: ``"LLLF"`` over 8 layers is ``LLLFLLLF``. Letters:

* ``L`` linear attention with a fixed per-head decay (Lightning / MiniMax-01: ``"LLLLLLLF"``);
* ``G`` gated linear attention: the same layer with a per-token, per-head log gate (Mamba2 / simple GLA);
  it shares the ``linear_*`` sizes;
* ``D`` Gated DeltaNet (Qwen3-Next: ``"DDDF"``), sizes ``delta_*``, short convolution ``conv_size``;
* ``F`` full softmax attention.

    cfg = ModelConfig(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, pattern="LLLF")
    cfg.layer_types        # "LLLF"
    cfg.num_params()       # exact count of HybridLM(cfg).parameters()
    cfg.flops_per_token(4096)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from dist_attn.checks import fail

LAYER_TYPES = {"L": "linear attention", "G": "gated linear attention", "D": "Gated DeltaNet",
               "F": "full softmax attention"}
LINEAR_FAMILY = "LGD"
"""Layer types whose context parallelism is chosen by ``parallel.linear_cp`` (state passing or all-to-all)."""


@dataclass
class ModelConfig:
    vocab_size: int = 256
    """Token vocabulary size V (256 = the byte-level tokenizer of :mod:`dist_attn.data.prepare`)."""
    d_model: int = 64
    """Residual stream width."""
    n_layers: int = 4
    """Number of blocks (each: sequence mixer + SwiGLU MLP, both pre-norm residual)."""
    pattern: str = "LLLF"
    """Mixer per block, repeated/truncated to ``n_layers``: ``L`` linear, ``G`` gated linear, ``D`` Gated
    DeltaNet, ``F`` softmax attention."""
    n_heads: int = 4
    """Query heads Hq of the softmax (``F``) layers."""
    n_kv_heads: Optional[int] = None
    """Key/value heads Hkv of the softmax layers (GQA); must divide ``n_heads``. None: ``n_heads`` (MHA)."""
    head_dim: Optional[int] = None
    """Head dim D of the softmax layers (even, for RoPE). None: ``d_model // n_heads``."""
    linear_heads: Optional[int] = None
    """Heads H of the linear (``L``) layers. None: ``n_heads``."""
    linear_head_dim: Optional[int] = None
    """Head dim (Dk = Dv) of the linear layers (state Dk x Dv per head). None: ``d_model // linear_heads``."""
    delta_heads: Optional[int] = None
    """Heads H of the Gated DeltaNet (``D``) layers. None: ``linear_heads``."""
    delta_head_dim: Optional[int] = None
    """Key/query head dim Dk of the ``D`` layers (state Dk x Dv per head). None: ``d_model // delta_heads``."""
    delta_v_head_dim: Optional[int] = None
    """Value head dim Dv of the ``D`` layers (Qwen3-Next uses 2·Dk). None: ``delta_head_dim``."""
    conv_size: int = 4
    """Kernel size K of the ``D`` layers' causal depthwise convolution on q, k and v (1: a per-channel scale, no mixing)."""
    ffn_hidden: Optional[int] = None
    """SwiGLU hidden width. None: ``mlp_ratio * d_model`` rounded up to a multiple of 8."""
    mlp_ratio: float = 8 / 3
    """SwiGLU width relative to ``d_model`` when ``ffn_hidden`` is None (8/3 keeps 3 matrices ~ 8 d^2 params)."""
    rope_theta: float = 10000.0
    """RoPE base of the softmax layers (linear layers use no positional encoding: the decay orders tokens)."""
    gated_attention: bool = True
    """Head-wise sigmoid output gate on the softmax layers: o_h * sigmoid(x w_h) ("Gated Attention", 2025)."""
    linear_decay_min: float = 0.6
    """Smallest per-head decay lambda of the linear layers (head 0, shortest memory, ~1/(1-lambda) tokens)."""
    linear_decay_max: float = 0.999
    """Largest per-head decay lambda (last head, longest memory); heads in between are log-spaced in 1-lambda."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head (the head matmul still costs FLOPs)."""
    init_std: float = 0.02
    """Std of the normal init of every weight matrix; output projections use init_std / sqrt(2 n_layers)."""
    linear_qkv_init_std: Optional[float] = None
    """Init std of the linear layers' q/k/v projections. None: d_model^-1/2 (unit-scale features at init).
    The output RMSNorm makes a linear layer invariant to the scale of q, k and v, so Adam's step
    relative to |W| is ~lr / |W|: at 0.02 in a small model it scrambles the layer and MQAR stalls."""
    max_seq_len: int = 2048
    """Largest *global* sequence length S the model accepts (checked per forward; RoPE needs no table)."""
    window_size: Optional[int] = None
    """Sliding-window attention for the ``F`` layers: a query at global position p sees keys p - W .. p
    (flash-attn's left window; with packed documents only inside its document). None: full causal.
    Under CP the ring skips the blocks (and their transfers) that no local query's window reaches."""

    def __post_init__(self):
        self.validate()

    # ---------------------------------------------------------------- derived sizes
    @property
    def layer_types(self) -> str:
        """``pattern`` repeated and truncated to ``n_layers`` characters."""
        reps = -(-self.n_layers // max(len(self.pattern), 1))
        return (self.pattern * reps)[: self.n_layers]

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def softmax_head_dim(self) -> int:
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def lin_heads(self) -> int:
        return self.n_heads if self.linear_heads is None else self.linear_heads

    @property
    def lin_head_dim(self) -> int:
        return self.d_model // self.lin_heads if self.linear_head_dim is None else self.linear_head_dim

    @property
    def d_heads(self) -> int:
        return self.lin_heads if self.delta_heads is None else self.delta_heads

    @property
    def d_head_dim(self) -> int:
        return self.d_model // self.d_heads if self.delta_head_dim is None else self.delta_head_dim

    @property
    def d_v_head_dim(self) -> int:
        return self.d_head_dim if self.delta_v_head_dim is None else self.delta_v_head_dim

    @property
    def linear_qkv_std(self) -> float:
        return self.d_model ** -0.5 if self.linear_qkv_init_std is None else self.linear_qkv_init_std

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return 8 * math.ceil(self.mlp_ratio * self.d_model / 8)

    # ---------------------------------------------------------------- validation
    def validate(self) -> "ModelConfig":
        """Raise ValueError (expected / got / fix) on the first inconsistent field; return self."""
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                fail(f"ModelConfig.{name}", "a positive int", v, f"set {name} >= 1")
        for name in ("n_kv_heads", "head_dim", "linear_heads", "linear_head_dim", "ffn_hidden", "delta_heads",
                     "delta_head_dim", "delta_v_head_dim"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                fail(f"ModelConfig.{name}", "a positive int or None", v,
                     f"set {name} >= 1 or leave it None for the default")
        bad = sorted(set(self.pattern) - set(LAYER_TYPES))
        if not self.pattern or bad:
            fail("ModelConfig.pattern", f"a non-empty string of {sorted(LAYER_TYPES)} (L linear, G gated linear, "
                 "D Gated DeltaNet, F full softmax)", repr(self.pattern),
                 "write the mixer of each block, e.g. 'LLLF' (3 linear : 1 full) or 'DDDF' (Qwen3-Next-like)")
        if self.head_dim is None and self.d_model % self.n_heads != 0:
            fail("ModelConfig.n_heads",
                 f"a divisor of d_model={self.d_model} (head_dim is derived as d_model // n_heads)",
                 self.n_heads, "choose n_heads dividing d_model, or set head_dim explicitly")
        if self.n_heads % self.kv_heads != 0:
            fail("ModelConfig.n_kv_heads", f"a divisor of n_heads={self.n_heads} (each KV head serves a group of "
                 f"query heads)", self.n_kv_heads, "choose n_kv_heads dividing n_heads")
        if "F" in self.layer_types and self.softmax_head_dim % 2 != 0:
            fail("ModelConfig.head_dim", "an even softmax head dim (RoPE rotates pairs of channels)",
                 self.softmax_head_dim, "choose an even head_dim (or d_model // n_heads even)")
        if self.linear_head_dim is None and self.d_model % self.lin_heads != 0:
            fail("ModelConfig.linear_heads", f"a divisor of d_model={self.d_model}", self.lin_heads,
                 "choose linear_heads dividing d_model, or set linear_head_dim explicitly")
        if "D" in self.layer_types and self.delta_head_dim is None and self.d_model % self.d_heads != 0:
            fail("ModelConfig.delta_heads", f"a divisor of d_model={self.d_model}", self.d_heads,
                 "choose delta_heads dividing d_model, or set delta_head_dim explicitly")
        w = self.window_size
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 0):
            fail("ModelConfig.window_size", "None or an int >= 0 (a query at p sees keys p - W .. p)", w,
                 "set e.g. window_size=1024, or None for full causal attention")
        if not isinstance(self.conv_size, int) or isinstance(self.conv_size, bool) or self.conv_size < 1:
            fail("ModelConfig.conv_size", "a positive int (the short convolution's kernel size)",
                 self.conv_size, "use 4, as Gated DeltaNet and Mamba do")
        if not (0.0 < self.linear_decay_min <= self.linear_decay_max < 1.0):
            fail("ModelConfig.linear_decay_min/max", "0 < linear_decay_min <= linear_decay_max < 1",
                 (self.linear_decay_min, self.linear_decay_max),
                 "use decays in (0, 1), e.g. min 0.6 (memory ~2 tokens) and max 0.999 (~1000 tokens)")
        if self.linear_qkv_init_std is not None and not self.linear_qkv_init_std > 0:
            fail("ModelConfig.linear_qkv_init_std", "a positive float or None", self.linear_qkv_init_std,
                 "leave it None for d_model^-1/2")
        if self.mlp_ratio <= 0 or self.norm_eps <= 0 or self.init_std <= 0 or self.rope_theta <= 0:
            fail("ModelConfig.mlp_ratio/norm_eps/init_std/rope_theta", "positive values",
                 (self.mlp_ratio, self.norm_eps, self.init_std, self.rope_theta), "set them > 0")
        return self

    # ---------------------------------------------------------------- counting
    def mixer_params(self, kind: str) -> int:
        """Parameters of one sequence mixer of type ``kind`` ("L", "G", "D" or "F")."""
        d = self.d_model
        if kind == "D":  # q, k, v, output gate, a, b projections; conv on q|k|v; A_log, dt_bias; norm; o
            h, dk, dv = self.d_heads, self.d_head_dim, self.d_v_head_dim
            return d * h * (2 * dk + 2 * dv + 2) + h * (2 * dk + dv) * self.conv_size + 2 * h + dv + h * dv * d
        if kind == "G":  # the L layer + the gate's projection a [d -> H] and A_log, dt_bias [H]
            return self.mixer_params("L") + d * self.lin_heads + 2 * self.lin_heads
        if kind == "F":
            hq, hkv, hd = self.n_heads, self.kv_heads, self.softmax_head_dim
            gate = d * hq if self.gated_attention else 0
            return d * hq * hd + 2 * d * hkv * hd + hq * hd * d + gate  # q, k, v, o, gate
        h, hd = self.lin_heads, self.lin_head_dim
        return 3 * d * h * hd + h * hd * d + d * h * hd + hd  # q, k, v, o, elementwise gate, out norm

    def num_params(self) -> int:
        """Exact number of parameters of ``HybridLM(self)`` (tied embeddings counted once)."""
        d, v = self.d_model, self.vocab_size
        block = 2 * d + 3 * d * self.ffn_dim  # two RMSNorm gains + SwiGLU (gate, up, down)
        total = sum(block + self.mixer_params(t) for t in self.layer_types)
        total += v * d + d  # embedding + final norm
        if not self.tie_embeddings:
            total += v * d
        return total

    def flops_per_token(self, seq_len: int, linear_chunk: int = 64) -> float:
        """Training FLOPs per token at global sequence length ``seq_len`` (one forward + backward).

        Convention: train = 3 x forward (backward = 2 x forward; activation recompute not counted).

        * matmuls: 6 * N, N = parameters used in a per-token matmul = all parameters except the input
          embedding table (a lookup), but with the V x d output head counted even when tied;
        * softmax layer forward per token: QK^T and PV cost 2·S·D each per head -> 4·S·D·Hq, halved
          for the causal mask (causal halving applied) -> 2·S·D·Hq;
        * linear layer (``L``, ``G``) forward per token, chunked form with chunk C = min(linear_chunk, S):
          intra-chunk (QK^T ⊙ M)V costs 4·C·D and the state read/update 4·D·D per head -> 4·H·D·(C + D);
        * Gated DeltaNet layer (``D``) forward per token and head, chunked WY form: K K^T and Q K^T
          (4·C·Dk), the triangular solve for the new values and their use (4·C·Dv), q S, K S and the state
          update (6·Dk·Dv) -> H·(4·C·(Dk + Dv) + 6·Dk·Dv) (the short convolution's weights are in 6·N).
          An estimate of the algorithm's work, not of a particular kernel's.
        """
        if seq_len <= 0:
            raise ValueError(f"flops_per_token: expected seq_len > 0, got {seq_len}. Fix: pass the global S.")
        n = self.num_params() - (0 if self.tie_embeddings else self.vocab_size * self.d_model)
        fwd_attn = 0.0
        for t in self.layer_types:
            c = min(linear_chunk, seq_len)
            if t == "F":
                fwd_attn += 0.5 * 4 * seq_len * self.softmax_head_dim * self.n_heads
            elif t == "D":
                h, dk, dv = self.d_heads, self.d_head_dim, self.d_v_head_dim
                fwd_attn += h * (4 * c * (dk + dv) + 6 * dk * dv)
            else:
                fwd_attn += 4 * self.lin_heads * self.lin_head_dim * (c + self.lin_head_dim)
        return 6.0 * n + 3.0 * fwd_attn
