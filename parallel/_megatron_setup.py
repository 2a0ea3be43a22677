"""Setup half of the megatron-core adapter: sizes, process groups, the model (see ``parallel/megatron.py``).

Private to ``parallel/``: import the public names from :mod:`dist_attn.parallel.megatron`.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from types import SimpleNamespace
from typing import Any, Optional

import torch
import torch.distributed as dist

from dist_attn.context import LINEAR_STRATEGIES, SOFTMAX_STRATEGIES, CPContext
from dist_attn.layout import LAYOUTS
from dist_attn.model.config import ModelConfig
from dist_attn.train.groups import ensure_launcher_env
from dist_attn.parallel._megatron_cpu import megatron_device_shim

with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": expected, we use neither
    warnings.simplefilter("ignore")
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

from dist_attn.parallel._megatron_layers import block_spec, hybridlm_to_megatron_state_dict, stage_layers  # noqa: E402


def _fail(where: str, expected: str, got: Any, fix: str) -> None:
    raise ValueError(f"{where}: expected {expected}, got {got!r}. Fix: {fix}")

# ---------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class MegatronParallel:
    """Parallel sizes and CP strategies of a megatron run (DP is derived: world / (tp·pp·cp))."""
    tp: int = 1
    """Tensor-parallel size T: heads, MLP width and vocabulary split over T ranks."""
    pp: int = 1
    """Pipeline stages."""
    cp: int = 1
    """Context-parallel size P: ranks sharing one sequence (our strategies)."""
    vpp: Optional[int] = None
    """Virtual stages per pipeline rank (interleaved 1F1B); None or 1: plain 1F1B. Needs pp > 1."""
    layout: str = "zigzag"
    softmax_cp: str = "zigzag_ring"
    linear_cp: str = "lasp2"
    ulysses_degree: int = 0
    """usp only: Ulysses degree U dividing cp."""
    kernel_backend: str = "auto"
    distributed_optimizer: bool = True
    """Shard the optimizer state over DP x CP (megatron's distributed optimizer)."""
    precision: str = "fp32"
    """fp32 | bf16 (bf16 weights and activations, fp32 main weights and gradients)."""

    @classmethod
    def from_train_config(cls, cfg) -> "MegatronParallel":
        """From a :class:`~dist_attn.train.config.TrainConfig`; ``parallel.tp`` / ``parallel.vpp`` and
        ``backend.distributed_optimizer`` are read if the schema has them (defaults 1 / None / True)."""
        p, b = cfg.parallel, cfg.backend
        return cls(tp=getattr(p, "tp", 1), pp=p.pp, cp=p.cp, vpp=getattr(p, "vpp", None), layout=p.layout,
                   softmax_cp=p.softmax_cp, linear_cp=p.linear_cp, ulysses_degree=p.ulysses_degree,
                   kernel_backend=p.kernel_backend, precision=b.precision,
                   distributed_optimizer=getattr(b, "distributed_optimizer", True))

    @property
    def virtual(self) -> int:
        return self.vpp or 1

@dataclass(frozen=True)
class MegatronTrainSettings:
    """Optimizer and schedule: AdamW, linear warmup then cosine decay to ``min_lr`` at ``steps``."""
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 0
    steps: int = 1000
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    @classmethod
    def from_train_config(cls, cfg) -> "MegatronTrainSettings":
        t = cfg.trainer
        return cls(lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, steps=t.steps,
                   weight_decay=t.weight_decay, betas=tuple(t.betas), grad_clip=cfg.backend.grad_clip)

def _positive(where: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        _fail(where, "a positive integer", v, f"set {where} >= 1")

def validate_megatron(model_cfg: Optional[ModelConfig], par: MegatronParallel, world_size: int) -> int:
    """Check every size against the world (and the model, if given) before any collective; return DP."""
    for name in ("tp", "pp", "cp"):
        _positive(f"MegatronParallel.{name}", getattr(par, name))
    t, pp, cp, v = par.tp, par.pp, par.cp, par.virtual
    if par.vpp is not None:
        _positive("MegatronParallel.vpp", par.vpp)
        if par.vpp > 1 and pp < 2:
            _fail("MegatronParallel.vpp", "None or 1 without pipelining (pp=1)", par.vpp,
                  "set pp >= 2 for interleaved virtual stages, or vpp=None")
    if world_size % (t * pp * cp) != 0:
        _fail("MegatronParallel tp * pp * cp", f"a divisor of the world size {world_size}",
              f"tp={t} * pp={pp} * cp={cp} = {t * pp * cp}",
              "launch a multiple of tp*pp*cp processes (DP is the quotient) or change the sizes")
    if par.layout not in LAYOUTS:
        _fail("MegatronParallel.layout", f"one of {LAYOUTS}", par.layout, "use zigzag")
    if par.softmax_cp not in SOFTMAX_STRATEGIES:
        _fail("MegatronParallel.softmax_cp", f"one of {SOFTMAX_STRATEGIES}", par.softmax_cp, "use zigzag_ring")
    if par.linear_cp not in LINEAR_STRATEGIES:
        _fail("MegatronParallel.linear_cp", f"one of {LINEAR_STRATEGIES}", par.linear_cp, "use lasp2")
    if par.precision not in ("fp32", "bf16"):
        _fail("MegatronParallel.precision", "fp32 | bf16", par.precision, "use fp32 or bf16")
    u = {"ulysses": cp, "usp": par.ulysses_degree}.get(par.softmax_cp, 1) if cp > 1 else 1  # Ulysses degree
    if cp > 1 and par.softmax_cp == "usp" and (not isinstance(u, int) or u < 1 or cp % u != 0):
        _fail("MegatronParallel.ulysses_degree", f"a divisor of cp={cp} for softmax_cp=usp", u,
              "set ulysses_degree=U with U | cp (Ulysses inside a node, ring over cp/U)")
    if model_cfg is None:
        return world_size // (t * pp * cp)
    m = model_cfg
    if m.n_layers % (pp * v) != 0:
        _fail("ModelConfig.n_layers", f"a multiple of pp * vpp = {pp * v} (megatron splits layers evenly)",
              m.n_layers, "change n_layers, pp or vpp")
    types = set(m.layer_types)
    tp_checks = []
    if "F" in types:
        tp_checks += [("n_heads", m.n_heads, "softmax heads are split over TP"),
                      ("n_kv_heads", m.kv_heads, "KV groups are split over TP")]
    if "L" in types:
        tp_checks.append(("linear_heads", m.lin_heads, "linear heads are split over TP"))
    tp_checks += [("vocab_size", m.vocab_size, "the vocabulary is split over TP (no padding: it would change "
                   "the softmax)"), ("ffn_hidden", m.ffn_dim, "the MLP width is split over TP")]
    for name, value, why in tp_checks:
        if value % t != 0:
            _fail(f"ModelConfig.{name}", f"a multiple of tp={t} ({why})", value, f"change {name} or tp")
    # head-sharding CP strategies work on the H/T heads local to a TP rank
    if "F" in types and u > 1:
        hq, hkv = m.n_heads // t, m.kv_heads // t
        if hq % u != 0 or (hkv % u != 0 and u % hkv != 0):
            _fail("ModelConfig.n_heads / n_kv_heads", f"per-TP-rank heads Hq/T={hq} divisible by the Ulysses "
                  f"degree {u} and Hkv/T={hkv} dividing it or divisible by it", (m.n_heads, m.kv_heads),
                  "change the heads, tp, or use softmax_cp=zigzag_ring / allgather")
    if cp > 1 and "L" in types and par.linear_cp == "ulysses" and (m.lin_heads // t) % cp != 0:
        _fail("ModelConfig.linear_heads", f"per-TP-rank linear heads H/T={m.lin_heads // t} divisible by cp={cp} "
              "for linear_cp=ulysses", m.lin_heads, "change linear_heads or tp, or use linear_cp=lasp2")
    return world_size // (t * pp * cp)

# ---------------------------------------------------------------------------- process groups

@dataclass
class MegatronGroups:
    """This rank's coordinates, megatron's groups and the :class:`CPContext` our mixers use."""
    par: MegatronParallel
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
        return self.pp_rank == self.par.pp - 1

    @property
    def dims(self) -> SimpleNamespace:
        """``dims.dp / .cp / .pp / .tp``: what the trainer's ``BatchSource`` reads from its groups."""
        return SimpleNamespace(dp=self.dp, cp=self.par.cp, pp=self.par.pp, tp=self.par.tp)

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

def init_megatron(par: MegatronParallel, model_cfg: Optional[ModelConfig] = None, seed: int = 0,
                  timeout_s: float = 600.0) -> MegatronGroups:
    """Initialise torch.distributed (if needed) and megatron's model-parallel groups; seed every rank.

    Collective. Validation (with ``model_cfg``) runs first, so a bad size raises on every rank alike.
    Re-initialising (a new ``par`` in the same processes) destroys megatron's previous groups.
    Seeding: ``torch.manual_seed(seed)`` on every rank (the HybridLM init that the model loads is
    drawn from it); on GPU also megatron's ``model_parallel_cuda_manual_seed`` (its CUDA RNG tracker,
    used by megatron's dropout and activation recompute). On CPU the tracker is not created (it
    needs CUDA RNG states); nothing in this backend draws from it (no dropout, no recompute).
    """
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    dp = validate_megatron(model_cfg, par, world)
    _init_torch_distributed(timeout_s)
    with megatron_device_shim():
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=par.tp, pipeline_model_parallel_size=par.pp,
            virtual_pipeline_model_parallel_size=par.vpp if par.virtual > 1 else None,
            context_parallel_size=par.cp, distributed_timeout_minutes=max(1, int(timeout_s // 60)),
            # on CPU every group is gloo already; megatron's extra gloo groups would be duplicates
            create_gloo_process_groups=torch.cuda.is_available())
        ps = parallel_state
        cp_group = ps.get_context_parallel_group() if par.cp > 1 else None
        uly = ring = None
        if par.softmax_cp == "usp" and par.cp > 1:
            uly, ring = _usp_groups(cp_group, par.ulysses_degree)
        cp = CPContext(group=cp_group, layout=par.layout, softmax_strategy=par.softmax_cp,
                       linear_strategy=par.linear_cp, ulysses_group=uly, ring_group=ring,
                       backend=par.kernel_backend)
        g = MegatronGroups(
            par=par, dp=dp, tp_rank=ps.get_tensor_model_parallel_rank(),
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
    return g

# ---------------------------------------------------------------------------- model

def transformer_config(model_cfg: ModelConfig, par: MegatronParallel) -> TransformerConfig:
    """Megatron's config for the parts it runs (sizes, SwiGLU, no bias, no dropout, per-token loss)."""
    m, cuda = model_cfg, torch.cuda.is_available()
    bf16 = par.precision == "bf16"
    return TransformerConfig(
        num_layers=m.n_layers, hidden_size=m.d_model, num_attention_heads=m.n_heads,
        num_query_groups=m.kv_heads, kv_channels=m.softmax_head_dim, ffn_hidden_size=m.ffn_dim,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        normalization="RMSNorm", layernorm_epsilon=m.norm_eps, hidden_dropout=0.0, attention_dropout=0.0,
        bias_dropout_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        tensor_model_parallel_size=par.tp, pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vpp if par.virtual > 1 else None,
        context_parallel_size=par.cp, cp_comm_type=None, sequence_parallel=False,
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

def build_megatron_model(model_cfg: ModelConfig, groups: MegatronGroups, *, hybrid_state_dict: dict | None = None,
                         seed: int | None = None) -> list:
    """This rank's model chunks: one ``GPTModel`` per virtual stage (one without interleaving).

    Weights: ``hybrid_state_dict`` (a HybridLM state dict), else ``HybridLM(model_cfg)`` built under
    ``torch.manual_seed(seed)`` (the current RNG state if ``seed`` is None). Chunks are on the
    current device, not yet wrapped in DDP (see :class:`MegatronBackend`).
    """
    from dist_attn.model.hybrid import HybridLM
    par = groups.par
    model_cfg.validate()
    validate_megatron(model_cfg, par, dist.get_world_size())  # local: raises on every rank alike
    config = transformer_config(model_cfg, par)
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
            if par.precision == "bf16":
                c.bfloat16()
    return chunks
