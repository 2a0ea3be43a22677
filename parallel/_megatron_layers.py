"""Layers of the megatron-core backend: this project's sequence mixers inside megatron's GPTModel.

Part of the megatron adapter (:mod:`dist_attn.parallel.megatron`); nothing outside ``parallel/`` imports it.

What is megatron's and what is ours. Megatron's ``GPTModel`` keeps its embedding, its
``TransformerBlock`` of ``TransformerLayer`` s (pre-norm residual blocks, bias-dropout-add), its
SwiGLU ``MLP`` and its vocab-parallel output layer and cross entropy. The ``self_attention`` slot of
each layer holds one of our two mixers, chosen by the layer's *global* number from
``ModelConfig.layer_types`` (so a pipeline stage or virtual stage builds the types of the layers it
owns). Megatron's own ``SelfAttention`` does not fit: its output gate is elementwise where ours is
one scalar per head, its RoPE assumes its own zigzag slicing of the sequence, and its CP needs
TransformerEngine. The norms are this project's ``RMSNorm`` and the mixers' math is
:mod:`dist_attn.model.mixers` (the functions HybridLM's layers call), so the function is exactly
:class:`~dist_attn.model.hybrid.HybridLM`'s: the classes here own only the fused tensor-parallel
projections, the TP slices (heads, decay) and the ``[s, b, ...] <-> [b, s, ...]`` layout changes. The HybridLM <->
megatron weight mapping is :mod:`dist_attn.parallel._megatron_weights`.

Layouts (legend). Megatron's activations are ``[s, b, h]``: s = S/P local tokens (P = CP size),
b micro-batch, h = d_model. Ours are ``[B, S/P, H, D]``. The conversion happens at the attention
core: ``[s, b, H/T, D] -> transpose(0, 1) -> [b, s, H/T, D]``. Tensor parallelism (T ranks) splits
heads: a rank holds heads ``[t·H/T, (t+1)·H/T)`` of every projection, so our attention sees H/T
local heads, and the linear layers' per-head decay buffer is sliced the same way.

Fused projections. Each mixer has one column-parallel input projection whose rows are grouped so
that a contiguous split over T ranks gives whole groups (the checkpoint is TP-reshardable, like
megatron's grouped ``linear_qkv``):

* softmax, per KV group g (Hkv groups of r = Hq/Hkv query heads):
  ``[q heads of g (r·D rows) | k_g (D) | v_g (D) | gate of g's query heads (r rows, if gated)]``;
* linear, per head: ``[q_h (D) | k_h (D) | v_h (D) | gate_h (D)]``;
* gated linear (``G``), per head: ``[q_h (D) | k_h (D) | v_h (D) | gate_h (D) | a_h (1)]``;
* Gated DeltaNet (``D``), per head: ``[q_h (Dk) | k_h (Dk) | v_h (Dv) | gate_h (Dv) | a_h (1) | b_h (1)]``.

Per-head parameters of the ``G`` and ``D`` layers (``A_log``, ``dt_bias [H]`` and the ``D`` layer's
convolution filters ``conv_weight [H, 2·Dk + Dv, K]``) are split over TP along heads like the projections:
each rank owns the gates and the q/k/v conv channels of its H/T heads. They are marked tensor-parallel
(counted once per rank in the gradient norm) and saved as TP shards along dim 0.
"""
from __future__ import annotations

import warnings

import torch

with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": expected, we use neither
    warnings.simplefilter("ignore")
    from megatron.core import tensor_parallel
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import (TransformerLayer, TransformerLayerSubmodules,
                                                             get_transformer_layer_offset)

from dist_attn.context import CPContext  # noqa: E402
from dist_attn.layout import position_ids  # noqa: E402
from dist_attn.model.config import ModelConfig  # noqa: E402
from dist_attn.model.layers import RMSNorm, decay_schedule  # noqa: E402
from dist_attn.model.mixers import delta_mix, linear_mix, mamba_gate, softmax_mix  # noqa: E402


class MegatronRMSNorm(RMSNorm):
    """This project's RMSNorm with the constructor megatron's ``build_module`` calls."""

    def __init__(self, config=None, hidden_size: int = 0, eps: float = 1e-6):
        super().__init__(hidden_size, eps)
        # sequence parallelism: each TP rank normalises S/(P·T) tokens, so the gain's gradient is
        # partial per rank; megatron's finalize_model_grads all-reduces params tagged like this over TP
        self.weight.sequence_parallel = bool(getattr(config, "sequence_parallel", False))


def _tp(pg_collection) -> tuple[int, int]:
    g = pg_collection.tp
    return g.size(), g.rank()


class _Mixer(MegatronModule):
    """Shared by both mixers: the CP context, TP coordinates and the global positions of the shard."""
    token_mixing = True
    cp_aware = True  # attention goes through dist_attn.dispatch only

    def __init__(self, config, model_cfg: ModelConfig, cp: CPContext, layer_number: int, kind: str,
                 pg_collection):
        super().__init__(config=config)
        # megatron numbers layers from 1 over the whole model (pipeline offset included)
        assert model_cfg.layer_types[layer_number - 1] == kind, \
            f"layer {layer_number} built as {kind!r}, pattern says {model_cfg.layer_types[layer_number - 1]!r}"
        self.model_cfg, self.cp, self.layer_number = model_cfg, cp, layer_number
        self.tp_group = pg_collection.tp
        self.tp_size, self.tp_rank = _tp(pg_collection)
        self._pos: dict = {}

    def _positions(self, s_local: int, device) -> torch.Tensor:
        """Global positions ``[S/P]`` of this rank's tokens: a function of the CP layout only, equal
        to what :func:`dist_attn.data.sharding.shard_batch` hands to HybridLM."""
        key = (s_local, str(device))
        if key not in self._pos:
            p = self.cp.world_size
            self._pos[key] = position_ids(s_local * p, self.cp.rank, p, self.cp.layout, device=device)
        return self._pos[key]

    def _column(self, out_features: int):
        return tensor_parallel.ColumnParallelLinear(
            self.config.hidden_size, out_features, config=self.config, init_method=self.config.init_method,
            bias=False, gather_output=False, tp_group=self.tp_group)

    def _row(self, in_features: int):
        return tensor_parallel.RowParallelLinear(
            in_features, self.config.hidden_size, config=self.config,
            init_method=self.config.output_layer_init_method, bias=False, input_is_parallel=True,
            skip_bias_add=True, tp_group=self.tp_group)


class SoftmaxMixer(_Mixer):
    """Gated GQA softmax attention with RoPE (HybridLM's ``SoftmaxAttention``) on megatron layouts.

    ``[s, b, d] -> linear_qkvg -> q [b, s, Hq/T, D], k/v [b, s, Hkv/T, D]`` -> RoPE at global
    positions -> ``dispatch.softmax_attention`` (the configured CP strategy) -> head-wise gate
    ``o_h · sigmoid(x w_h)`` -> ``[s, b, Hq/T·D] -> linear_proj`` (row-parallel, sums over T).
    """
    KIND = "F"  # pattern letter

    def __init__(self, config, model_cfg: ModelConfig, cp: CPContext, layer_number: int = 1,
                 pg_collection=None, **_megatron_kwargs):
        super().__init__(config, model_cfg, cp, layer_number, "F", pg_collection)
        m = model_cfg
        self.hd, self.r = m.softmax_head_dim, m.n_heads // m.kv_heads
        self.groups = m.kv_heads // self.tp_size        # local KV groups
        self.hq = self.groups * self.r                  # local query heads
        self.gated = m.gated_attention
        per_group = (self.r + 2) * self.hd + (self.r if self.gated else 0)
        self.linear_qkvg = self._column(m.kv_heads * per_group)
        self.linear_proj = self._row(m.n_heads * self.hd)

    def forward(self, hidden_states, attention_mask=None, cu_seqlens=None, **_unused):
        mixed, _ = self.linear_qkvg(hidden_states)       # [s, b, G·per_group] (SP: gathered over TP)
        s, b = mixed.shape[:2]
        mixed = mixed.view(s, b, self.groups, -1)
        sizes = [self.r * self.hd, self.hd, self.hd] + ([self.r] if self.gated else [])
        parts = torch.split(mixed, sizes, dim=-1)
        q = parts[0].reshape(s, b, self.hq, self.hd).transpose(0, 1)   # [b, s, Hq/T, D]
        k, v = parts[1].transpose(0, 1), parts[2].transpose(0, 1)       # [b, s, Hkv/T, D]
        gate = parts[3].reshape(s, b, self.hq).transpose(0, 1) if self.gated else None  # [b, s, Hq/T]
        o = softmax_mix(q, k, v.contiguous(), position_ids=self._positions(s, hidden_states.device),
                        theta=self.model_cfg.rope_theta, cp=self.cp, gate=gate,
                        cu_seqlens=cu_seqlens, window_size=self.model_cfg.window_size)  # [b, s, Hq/T, D]
        o = o.transpose(0, 1).reshape(s, b, self.hq * self.hd)              # [s, b, Hq/T·D]
        return self.linear_proj(o)                                          # (out [s, b, d], None)


class LinearMixer(_Mixer):
    """Decayed linear attention (HybridLM's ``LinearAttention``) on megatron layouts.

    ``[s, b, d] -> linear_qkvg -> silu(q), silu(k), v [b, s, H/T, D]`` ->
    ``dispatch.linear_attention`` with this rank's slice of the per-head decay -> RMSNorm over D ->
    elementwise gate -> ``linear_proj``. The output norm's gain (D values shared by all heads) is
    replicated over T while each rank normalises different heads, so its gradient is partial per
    rank: it enters the graph through megatron's ``copy_to_tensor_model_parallel_region`` (identity
    forward, all-reduce over T backward), which makes the replicas' gradients equal and complete.
    """
    KIND = "L"  # pattern letter

    def __init__(self, config, model_cfg: ModelConfig, cp: CPContext, layer_number: int = 1,
                 pg_collection=None, **_megatron_kwargs):
        super().__init__(config, model_cfg, cp, layer_number, "L", pg_collection)
        m = model_cfg
        self.hd, self.h = m.lin_head_dim, m.lin_heads // self.tp_size
        self.linear_qkvg = self._column(4 * m.lin_heads * self.hd)
        self.out_norm = RMSNorm(self.hd, m.norm_eps)
        self.linear_proj = self._row(m.lin_heads * self.hd)
        lo = self.tp_rank * self.h
        decay = decay_schedule(m.lin_heads, m.linear_decay_min, m.linear_decay_max)[lo:lo + self.h]
        self.register_buffer("log_decay", decay, persistent=False)  # [H/T], a function of the config

    def _norm_weight(self) -> torch.Tensor:
        w = self.out_norm.weight
        if self.tp_size == 1:
            return w
        return tensor_parallel.copy_to_tensor_model_parallel_region(w, group=self.tp_group)

    def forward(self, hidden_states, attention_mask=None, cu_seqlens=None, **_unused):
        mixed, _ = self.linear_qkvg(hidden_states)                      # [s, b, H/T·4D] (SP: gathered)
        s, b = mixed.shape[:2]
        q, k, v, g = (t.transpose(0, 1) for t in mixed.view(s, b, self.h, 4 * self.hd).split(self.hd, dim=-1))
        # [b, s, H/T, D] each; the output norm's gain is the TP-reduced one (see the class docstring)
        o = linear_mix(q.contiguous(), k.contiguous(), v.contiguous(), g, decay=self.log_decay.float(),
                       norm_weight=self._norm_weight(), eps=self.out_norm.eps, cp=self.cp, cu_seqlens=cu_seqlens)
        o = o.transpose(0, 1).reshape(s, b, self.h * self.hd)           # [s, b, H/T·D]
        return self.linear_proj(o)


class _HeadParams:
    """Mixin: per-head parameters split over TP (dim 0), marked so, and saved as TP shards."""
    TP_PARAMS: tuple = ()

    def _head_param(self, name: str, *shape: int) -> None:
        p = torch.nn.Parameter(torch.empty(*shape))  # values come from the HybridLM weights
        tensor_parallel.set_tensor_model_parallel_attributes(p, True, 0, 1)
        self.register_parameter(name, p)

    def _norm_weight(self) -> torch.Tensor:
        """The output norm's gain, replicated over TP: identity forward, all-reduce over TP backward."""
        w = self.out_norm.weight
        if self.tp_size == 1:
            return w
        return tensor_parallel.copy_to_tensor_model_parallel_region(w, group=self.tp_group)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.utils import (ensure_metadata_has_dp_cp_group,
                                                     make_sharded_tensors_for_checkpoint)
        out = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        own = {name: getattr(self, name) for name in self.TP_PARAMS}
        out.update(make_sharded_tensors_for_checkpoint(own, prefix, {name: 0 for name in own}, sharded_offsets,
                                                       tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"]))
        return out


class GatedLinearMixer(_HeadParams, _Mixer):
    """Gated linear attention (HybridLM's ``GatedLinearAttention``, ``G``) on megatron layouts.

    ``[s, b, d] -> linear_qkvga -> q, k, v, gate [b, s, H/T, D], a [b, s, H/T]`` -> g = mamba_gate(a)
    with this rank's ``A_log, dt_bias`` -> ``linear_mix`` (per-token gate, no fixed decay) -> ``linear_proj``.
    """
    KIND = "G"  # pattern letter
    TP_PARAMS = ("A_log", "dt_bias")

    def __init__(self, config, model_cfg: ModelConfig, cp: CPContext, layer_number: int = 1,
                 pg_collection=None, **_megatron_kwargs):
        super().__init__(config, model_cfg, cp, layer_number, "G", pg_collection)
        m = model_cfg
        self.hd, self.h = m.lin_head_dim, m.lin_heads // self.tp_size
        self.linear_qkvga = self._column(m.lin_heads * (4 * self.hd + 1))
        self._head_param("A_log", self.h)
        self._head_param("dt_bias", self.h)
        self.out_norm = RMSNorm(self.hd, m.norm_eps)
        self.linear_proj = self._row(m.lin_heads * self.hd)

    def forward(self, hidden_states, attention_mask=None, cu_seqlens=None, **_unused):
        mixed, _ = self.linear_qkvga(hidden_states)                     # [s, b, H/T·(4D+1)]
        s, b = mixed.shape[:2]
        d = self.hd
        mixed = mixed.transpose(0, 1).reshape(b, s, self.h, 4 * d + 1)  # [b, s, H/T, 4D+1]
        q, k, v, gate, a = mixed.split([d, d, d, d, 1], dim=-1)
        g = mamba_gate(a.squeeze(-1), self.A_log, self.dt_bias)         # [b, s, H/T] fp32
        o = linear_mix(q.contiguous(), k.contiguous(), v.contiguous(), gate, decay=None, g=g,
                       norm_weight=self._norm_weight(), eps=self.out_norm.eps, cp=self.cp, cu_seqlens=cu_seqlens)
        o = o.transpose(0, 1).reshape(s, b, self.h * d)                 # [s, b, H/T·D]
        return self.linear_proj(o)


class DeltaMixer(_HeadParams, _Mixer):
    """Gated DeltaNet (HybridLM's ``GatedDeltaNet``, ``D``) on megatron layouts.

    ``[s, b, d] -> linear_qkvgab -> q, k [b, s, H/T, Dk], v, gate [b, s, H/T, Dv], a, b [b, s, H/T]`` ->
    ``delta_mix`` with this rank's conv filters, ``A_log`` and ``dt_bias`` (conv + SiLU, L2 norms, beta,
    gate, the delta rule through ``dispatch``, gated RMSNorm) -> ``[s, b, H/T·Dv] -> linear_proj``.
    """
    KIND = "D"  # pattern letter
    TP_PARAMS = ("conv_weight", "A_log", "dt_bias")

    def __init__(self, config, model_cfg: ModelConfig, cp: CPContext, layer_number: int = 1,
                 pg_collection=None, **_megatron_kwargs):
        super().__init__(config, model_cfg, cp, layer_number, "D", pg_collection)
        m = model_cfg
        self.dk, self.dv, self.h = m.d_head_dim, m.d_v_head_dim, m.d_heads // self.tp_size
        self.linear_qkvgab = self._column(m.d_heads * (2 * self.dk + 2 * self.dv + 2))
        self._head_param("conv_weight", self.h, 2 * self.dk + self.dv, m.conv_size)
        self._head_param("A_log", self.h)
        self._head_param("dt_bias", self.h)
        self.out_norm = RMSNorm(self.dv, m.norm_eps)
        self.linear_proj = self._row(m.d_heads * self.dv)

    def forward(self, hidden_states, attention_mask=None, cu_seqlens=None, **_unused):
        mixed, _ = self.linear_qkvgab(hidden_states)                    # [s, b, H/T·(2Dk+2Dv+2)]
        s, b = mixed.shape[:2]
        dk, dv = self.dk, self.dv
        mixed = mixed.transpose(0, 1).reshape(b, s, self.h, -1)         # [b, s, H/T, 2Dk+2Dv+2]
        q, k, v, gate, a, beta_logit = mixed.split([dk, dk, dv, dv, 1, 1], dim=-1)
        o = delta_mix(q, k, v, a.squeeze(-1), beta_logit.squeeze(-1), gate, conv_weight=self.conv_weight,
                      a_log=self.A_log, dt_bias=self.dt_bias, norm_weight=self._norm_weight(),
                      eps=self.out_norm.eps, cp=self.cp, cu_seqlens=cu_seqlens)   # [b, s, H/T, Dv]
        o = o.transpose(0, 1).reshape(s, b, self.h * dv)                # [s, b, H/T·Dv]
        return self.linear_proj(o)


MIXERS = {"L": LinearMixer, "G": GatedLinearMixer, "D": DeltaMixer, "F": SoftmaxMixer}


def layer_spec(kind: str, model_cfg: ModelConfig, cp: CPContext) -> ModuleSpec:
    """One megatron ``TransformerLayer``: our norm and mixer, megatron's SwiGLU MLP and residuals."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=MegatronRMSNorm,
            self_attention=ModuleSpec(module=MIXERS[kind], params={"model_cfg": model_cfg, "cp": cp}),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=MegatronRMSNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
                linear_fc1=tensor_parallel.ColumnParallelLinear, linear_fc2=tensor_parallel.RowParallelLinear)),
            mlp_bda=get_bias_dropout_add))


def stage_layers(config, vp_stage, pp_rank: int) -> tuple[int, int]:
    """(first global layer index, number of layers) of one (virtual) pipeline stage, 0-based."""
    return (get_transformer_layer_offset(config, vp_stage, pp_rank),
            get_num_layers_to_build(config, vp_stage, pp_rank))


def block_spec(config, model_cfg: ModelConfig, cp: CPContext, vp_stage, pp_rank: int):
    """The layers of one (virtual) stage, each typed by its global index in ``model_cfg.layer_types``."""
    first, n = stage_layers(config, vp_stage, pp_rank)
    specs = [layer_spec(model_cfg.layer_types[first + i], model_cfg, cp) for i in range(n)]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=MegatronRMSNorm)


# the HybridLM <-> megatron weight mapping (re-exported: its historical home)
from dist_attn.parallel._megatron_weights import (  # noqa: E402,F401
    hybridlm_to_megatron_state_dict, megatron_to_hybridlm_state_dict)
