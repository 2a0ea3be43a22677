"""Setup half of the megatron-core adapter: sizes, process groups, the model (see ``parallel/megatron.py``).

Private to ``parallel/``: import the public names from :mod:`dist_attn.parallel.megatron`.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from dist_attn.checks import fail
from dist_attn.context import CPContext
from dist_attn.model.config import ModelConfig
from dist_attn.plan import ParallelPlan, RankCoords
from dist_attn.train.engine import ensure_launcher_env
from dist_attn.parallel._megatron_cpu import megatron_device_shim

with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": expected, we use neither
    warnings.simplefilter("ignore")
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

from dist_attn.parallel._megatron_layers import block_spec, stage_layers  # noqa: E402
from dist_attn.parallel._megatron_weights import hybridlm_to_megatron_state_dict  # noqa: E402


# ---------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class MegatronTrainSettings:
    """Optimizer, schedule and precision: AdamW, linear warmup then cosine decay to ``min_lr`` at
    ``steps`` (:func:`dist_attn.train.engine.lr_at`). Sizes and strategies are the plan's."""
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 0
    steps: int = 1000
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    precision: str = "fp32"
    """fp32 | bf16 (bf16 weights and activations, fp32 main weights and gradients)."""
    distributed_optimizer: bool = True
    """Shard the optimizer state over DP x CP (megatron's distributed optimizer)."""
    recompute: str = "none"
    """none | selective | full: megatron's activation recompute, see :data:`RECOMPUTE_OPTIONS`."""
    loss_chunk: int = 0
    """0 | N: vocab-parallel cross entropy over chunks of N local tokens (see MegatronEngine._loss)."""

    @classmethod
    def from_train_config(cls, cfg) -> "MegatronTrainSettings":
        t, b = cfg.trainer, cfg.backend
        return cls(lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, steps=t.steps,
                   weight_decay=t.weight_decay, betas=tuple(t.betas), grad_clip=b.grad_clip,
                   precision=b.precision, distributed_optimizer=b.distributed_optimizer,
                   recompute=getattr(t, "recompute", "none"), loss_chunk=getattr(t, "loss_chunk", 0))


# trainer.recompute -> megatron-core 0.16 TransformerConfig options. megatron's selective default,
# "core_attn", recomputes its own core attention, which this project's mixers replace (the layer's
# self_attention slot holds them whole): our selective is megatron's "mlp" (the SwiGLU MLP with its
# fc1 output and activation, recomputed from the pre-MLP norm's output), the bulk of what HybridLM's
# selective mode recomputes. Its "layernorm" module (the two pre-norms' outputs dropped and rebuilt)
# is added only with TransformerEngine: in 0.16.1 ``CheckpointWithoutOutput()`` sets
# ``fp8 = (fp8 is not None)``, always True, and then reads TransformerEngine's FP8 state, a NameError
# without it. full: every layer (uniform, 1 layer per unit) keeps its input only and runs again in
# backward, CP communication included (all CP ranks run the same schedule, so collectives match).
def _have_te() -> bool:
    import importlib.util
    return importlib.util.find_spec("transformer_engine") is not None


RECOMPUTE_OPTIONS = {
    "none": {},
    "selective": dict(recompute_granularity="selective",
                      recompute_modules=["layernorm", "mlp"] if _have_te() else ["mlp"]),
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
}


def validate_megatron(model_cfg: Optional[ModelConfig], plan: ParallelPlan) -> int:
    """Megatron's own size rules for a (self-validated) plan and, if given, the model, before any
    collective; returns DP. Layers split evenly over pp * vpp (virtual) stages; heads, vocabulary and
    MLP width over TP; the heads of a TP rank over each layer type's Ulysses degree (the plan's rule)."""
    if not plan.resolved:
        fail("parallel.softmax_cp / linear_cp", "resolved strategies (not auto) for megatron",
             (plan.softmax_cp, plan.linear_cp), "resolve them with ParallelPlan.resolve_auto first")
    if model_cfg is None:
        return plan.dp
    m, t = model_cfg, plan.tp
    if m.n_layers % (plan.pp * plan.virtual) != 0:
        fail("ModelConfig.n_layers", f"a multiple of pp * vpp = {plan.pp * plan.virtual} (megatron splits layers "
             "evenly)", m.n_layers, "change n_layers, pp or vpp")
    plan.check_model(m, prefix="ModelConfig.")  # heads over TP, then over the Ulysses degrees
    for name, value, why in (("vocab_size", m.vocab_size, "the vocabulary is split over TP (no padding: it would "
                              "change the softmax)"), ("ffn_hidden", m.ffn_dim, "the MLP width is split over TP")):
        if value % t != 0:
            fail(f"ModelConfig.{name}", f"a multiple of tp={t} ({why})", value, f"change {name} or tp")
    return plan.dp

# ---------------------------------------------------------------------------- process groups

@dataclass
class MegatronGroups:
    """This rank's coordinates, megatron's groups and the :class:`CPContext` our mixers use."""
    plan: ParallelPlan
    dp: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    cp: CPContext
    cp_group: Any = None
    dp_group: Any = None                    # DP only (the ranks holding the same CP shard)
    dp_cp_group: Any = None                 # gradients are reduced over it
    tp_group: Any = None
    pp_group: Any = None
    ranks: dict = field(default_factory=dict)

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.plan.pp - 1

    @property
    def coords(self) -> RankCoords:
        return RankCoords(tp=self.tp_rank, cp=self.cp_rank, dp=self.dp_rank, pp=self.pp_rank)

def _init_torch_distributed(timeout_s: float) -> None:
    """torch.distributed from the launcher's environment (torchrun), or a world of one."""
    if dist.is_initialized():
        return
    ensure_launcher_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                            timeout=timedelta(seconds=timeout_s))

def _usp_groups(cp_group, ulysses_degree: int):
    """Ulysses / ring sub-groups of every CP group, created in one order on every rank."""
    from dist_attn.groups import make_usp_groups
    mine = sorted(dist.get_process_group_ranks(cp_group))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    found = (None, None)
    for ranks in sorted({tuple(r) for r in every}):
        u, r = make_usp_groups(list(ranks), ulysses_degree)
        if u is not None:
            found = (u, r)
    return found

def init_megatron(plan: ParallelPlan, model_cfg: Optional[ModelConfig] = None, seed: int = 0,
                  timeout_s: float = 600.0) -> MegatronGroups:
    """Initialise torch.distributed (if needed) and megatron's model-parallel groups; seed every rank.

    Collective. Validation (with ``model_cfg``) runs first, so a bad size raises on every rank alike.
    Re-initialising (a new ``plan`` in the same processes) destroys megatron's previous groups.
    Seeding: ``torch.manual_seed(seed)`` on every rank (the HybridLM init that the model loads is
    drawn from it); on GPU also megatron's ``model_parallel_cuda_manual_seed`` (its CUDA RNG tracker,
    used by megatron's dropout and activation recompute). On CPU the tracker gets empty named states
    (it needs CUDA RNG states; nothing in this backend draws from it: no dropout), and megatron's
    recompute saves and restores only the CPU RNG state there (see ``_megatron_cpu``).
    """
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if plan.world_size != world:
        fail("ParallelPlan.world_size", f"the world size {world}", plan.world_size,
             "build the plan for the processes launched (ParallelPlan.build(world_size, ...))")
    dp = validate_megatron(model_cfg, plan)
    _init_torch_distributed(timeout_s)
    with megatron_device_shim():
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=plan.tp, pipeline_model_parallel_size=plan.pp,
            virtual_pipeline_model_parallel_size=plan.vpp if plan.virtual > 1 else None,
            context_parallel_size=plan.cp, distributed_timeout_minutes=max(1, int(timeout_s // 60)),
            # on CPU every group is gloo already; megatron's extra gloo groups would be duplicates
            create_gloo_process_groups=torch.cuda.is_available())
        ps = parallel_state
        cp_group = ps.get_context_parallel_group() if plan.cp > 1 else None
        uly = ring = None
        if plan.usp_degree:
            uly, ring = _usp_groups(cp_group, plan.usp_degree)
        cp = CPContext.from_plan(plan, cp_group, uly, ring)
        g = MegatronGroups(
            plan=plan, dp=dp, tp_rank=ps.get_tensor_model_parallel_rank(),
            pp_rank=ps.get_pipeline_model_parallel_rank(), cp_rank=ps.get_context_parallel_rank(),
            dp_rank=ps.get_data_parallel_rank(), cp=cp, cp_group=cp_group, dp_group=ps.get_data_parallel_group(),
            dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
            tp_group=ps.get_tensor_model_parallel_group(), pp_group=ps.get_pipeline_model_parallel_group())
        for name, grp in (("tp", g.tp_group), ("pp", g.pp_group), ("cp", cp_group), ("dp", g.dp_group),
                          ("dp_cp", g.dp_cp_group)):
            g.ranks[name] = dist.get_process_group_ranks(grp) if grp is not None else [dist.get_rank()]
        torch.manual_seed(seed)
        if torch.cuda.is_available():
            tensor_parallel.model_parallel_cuda_manual_seed(seed)
        else:
            # the tracker's named states, empty: sequence parallelism forks the model-parallel state
            # around the (zero-probability) embedding dropout; the shim makes CUDA RNG get/set no-ops
            from megatron.core.tensor_parallel import random as mrandom
            mrandom.get_cuda_rng_tracker().set_states({name: torch.empty(0, dtype=torch.uint8) for name in (
                mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, mrandom._DATA_PARALLEL_RNG_TRACKER_NAME,
                mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME)})
    return g

# ---------------------------------------------------------------------------- model

def transformer_config(model_cfg: ModelConfig, plan: ParallelPlan, precision: str = "fp32",
                       recompute: str = "none") -> TransformerConfig:
    """Megatron's config for the parts it runs (sizes, SwiGLU, no bias, no dropout, per-token loss),
    sequence parallelism from ``plan.sp`` and activation recompute (:data:`RECOMPUTE_OPTIONS`)."""
    m, cuda, par = model_cfg, torch.cuda.is_available(), plan
    if recompute not in RECOMPUTE_OPTIONS:
        fail("trainer.recompute", f"one of {tuple(RECOMPUTE_OPTIONS)}", repr(recompute), "use none, selective or full")
    bf16 = precision == "bf16"
    return TransformerConfig(
        num_layers=m.n_layers, hidden_size=m.d_model, num_attention_heads=m.n_heads,
        num_query_groups=m.kv_heads, kv_channels=m.softmax_head_dim, ffn_hidden_size=m.ffn_dim,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        normalization="RMSNorm", layernorm_epsilon=m.norm_eps, hidden_dropout=0.0, attention_dropout=0.0,
        bias_dropout_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        tensor_model_parallel_size=par.tp, pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vpp if par.virtual > 1 else None,
        context_parallel_size=par.cp, cp_comm_type=None, sequence_parallel=getattr(par, "sp", False),
        **RECOMPUTE_OPTIONS[recompute],
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        calculate_per_token_loss=True, use_cpu_initialization=not cuda,
        perform_initialization=False,  # the weights come from HybridLM, see build_megatron_model
        init_method_std=m.init_std)

def _unwrap(chunk):
    while hasattr(chunk, "module") and not isinstance(chunk, GPTModel):
        chunk = chunk.module
    return chunk

def _mark_tensor_parallel(chunk) -> None:
    """Tag TP-sharded weights as megatron's initialisers would: with ``perform_initialization=False``
    megatron-core 0.16.1 skips ``set_tensor_model_parallel_attributes``, and without the tag the
    gradient norm (hence clipping) counts a sharded weight on TP rank 0 only."""
    dims = ((tensor_parallel.ColumnParallelLinear, 0), (tensor_parallel.RowParallelLinear, 1),
            (tensor_parallel.VocabParallelEmbedding, 0))
    for module in chunk.modules():
        for cls, dim in dims:
            w = getattr(module, "weight", None)
            if isinstance(module, cls) and isinstance(w, torch.nn.Parameter) and \
                    not getattr(w, "tensor_model_parallel", False):
                tensor_parallel.set_tensor_model_parallel_attributes(w, True, dim, 1)


def load_hybridlm_weights(chunks: list, hybrid_sd: dict, model_cfg: ModelConfig) -> None:
    """Copy a HybridLM state dict into this rank's megatron chunks (strict: every key must match)."""
    for chunk in chunks:
        m = _unwrap(chunk)
        first, n = m._dist_attn_layers
        sd = hybridlm_to_megatron_state_dict(
            hybrid_sd, model_cfg, tp_rank=parallel_state.get_tensor_model_parallel_rank(),
            tp_size=parallel_state.get_tensor_model_parallel_world_size(), first_layer=first, num_layers=n,
            pre_process=m.pre_process, post_process=m.post_process,
            share_embeddings=m.share_embeddings_and_output_weights)
        own = {k for k, _ in m.state_dict().items() if not k.endswith("_extra_state")}
        assert own == set(sd), f"weight map mismatch: missing {sorted(own - set(sd))}, extra {sorted(set(sd) - own)}"
        m.load_state_dict(sd, strict=False)

def build_megatron_model(model_cfg: ModelConfig, groups: MegatronGroups, *, precision: str = "fp32",
                         hybrid_state_dict: dict | None = None, seed: int | None = None,
                         recompute: str = "none") -> list:
    """This rank's model chunks: one ``GPTModel`` per virtual stage (one without interleaving).

    Weights: ``hybrid_state_dict`` (a HybridLM state dict), else ``HybridLM(model_cfg)`` built under
    ``torch.manual_seed(seed)`` (the current RNG state if ``seed`` is None). Chunks are on the
    current device, not yet wrapped in DDP (see :class:`MegatronBackend`).
    """
    from dist_attn.model.hybrid import HybridLM
    par = groups.plan
    model_cfg.validate()
    validate_megatron(model_cfg, par)  # local: raises on every rank alike
    config = transformer_config(model_cfg, par, precision, recompute)
    chunks = []
    with megatron_device_shim():
        for vp in range(par.virtual):
            vp_stage = vp if par.virtual > 1 else None
            first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
            last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
            model = GPTModel(config=config, transformer_layer_spec=block_spec(config, model_cfg, groups.cp, vp_stage,
                                                                               groups.pp_rank),
                             vocab_size=model_cfg.vocab_size, max_sequence_length=model_cfg.max_seq_len,
                             pre_process=first, post_process=last, parallel_output=True,
                             share_embeddings_and_output_weights=model_cfg.tie_embeddings,
                             position_embedding_type="none", vp_stage=vp_stage)
            model._dist_attn_layers = stage_layers(config, vp_stage, groups.pp_rank)
            _mark_tensor_parallel(model)
            chunks.append(model)
        if hybrid_state_dict is None:
            if seed is not None:
                torch.manual_seed(seed)
            hybrid_state_dict = HybridLM(model_cfg).state_dict()
        load_hybridlm_weights(chunks, hybrid_state_dict, model_cfg)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        for c in chunks:
            c.to(device)
            if precision == "bf16":
                c.bfloat16()
    return chunks


# ---------------------------------------------------------------------------- chunked loss (trainer.loss_chunk)

def _hidden_or_logits(layer, input_, weight=None, runtime_gather_output=None, **kwargs):
    """The output layer's forward while ``layer.dist_attn_hidden`` is set: no projection; the hidden
    states ``[s, b, d]`` as the projection would have read them (gathered along the sequence under
    sequence parallelism -- backward: reduce-scatter --, else entering the TP region -- backward:
    all-reduce of the partial d(hidden) of the T vocabulary slices). The weight is kept for the loss."""
    if not getattr(layer, "dist_attn_hidden", False):
        return type(layer).forward(layer, input_, weight=weight, runtime_gather_output=runtime_gather_output,
                                   **kwargs)
    layer.dist_attn_weight = weight if weight is not None else layer.weight  # [V/T, d]
    group = layer.tp_group
    if layer.sequence_parallel:
        return tensor_parallel.gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True,
                                                                    group=group), None
    return _ContiguousGrad.apply(tensor_parallel.copy_to_tensor_model_parallel_region(input_, group=group)), None


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: megatron 0.16.1's all-reduce behind
    ``copy_to_tensor_model_parallel_region`` reduces ``grad.contiguous()`` and returns ``grad``, i.e.
    drops the reduction of a non-contiguous gradient (here: from the loss's ``[b, s, d]`` view)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def hidden_output_layers(chunks: list) -> list:
    """Make the output layer of every chunk holding one (the last pipeline stage) able to hand the
    hidden states to a chunked loss instead of logits (set ``layer.dist_attn_hidden = True``);
    returns those layers. Weights and state dict keys are untouched."""
    import types
    layers = []
    for chunk in chunks:
        m = _unwrap(chunk)
        if m.post_process:
            m.output_layer.forward = types.MethodType(_hidden_or_logits, m.output_layer)
            m.output_layer.dist_attn_hidden = False
            layers.append(m.output_layer)
    return layers


def vocab_parallel_chunk_ce(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int, *,
                            tp_group):
    """One chunk of ``n`` tokens: vocab-parallel logits ``[n, V/T]`` -> (summed CE over the labelled
    tokens, greedy hits); megatron's vocab-parallel cross entropy (log-sum-exp over the T slices)."""
    from dist_attn.parallel.megatron import _vocab_parallel_argmax
    logits = torch.nn.functional.linear(h, weight).float()
    mask = labels != ignore_index
    per_token = tensor_parallel.vocab_parallel_cross_entropy(logits, labels.clamp(min=0))
    with torch.no_grad():
        hits = ((_vocab_parallel_argmax(logits, tp_group) == labels) & mask).sum()
    return (per_token * mask).sum(), hits
