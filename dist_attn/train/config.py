"""Typed training configuration: Hydra structured configs (unknown keys fail) and their validation.

The schema is one dataclass per config group, registered in Hydra's ConfigStore by
:func:`register_configs`; the YAML files under ``configs/`` only pick values and combinations::

    python -m launchers.train model=1b parallel.cp=4 parallel.softmax_cp=ulysses trainer.steps=200

:func:`validate` checks every size against the world size *before* any process group exists, so a
bad combination fails with a ``ValueError`` (expected / got / fix) on every rank alike instead of
hanging in the first collective.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from dist_attn.context import LINEAR_STRATEGIES, SOFTMAX_STRATEGIES
from dist_attn.layout import LAYOUTS, num_chunks
from dist_attn.model.config import ModelConfig

BACKENDS = ("deepspeed", "megatron")
PRECISIONS = ("bf16", "fp32")
DATASETS = ("mqar", "memmap")
MAX_SOFTMAX_HEAD_DIM = 128  # dist_attn.kernels.flash_attn Triton tiles (head dims are padded to a power of two)


def lr_at(t: "TrainerConfig", step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based), the same for every backend::

        lr(t) = lr * t / W                                            for t <= W (linear warmup)
        lr(t) = min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2,  p = (t - W) / (T - W), clamped to 1

    with W = warmup_steps and T = max(steps, W + 1): megatron-core's ``OptimizerParamScheduler``
    'cosine' style, which the megatron backend uses directly and the DeepSpeed backend reproduces as a
    torch ``LambdaLR`` (DeepSpeed's own WarmupCosineLR starts the cosine one step early)."""
    w = t.warmup_steps
    if w > 0 and step <= w:
        return t.lr * step / w
    p = min(1.0, (step - w) / (max(t.steps, w + 1) - w))
    return t.min_lr + (t.lr - t.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


def _fail(field_name: str, expected: str, got: Any, fix: str) -> None:
    raise ValueError(f"{field_name}: expected {expected}, got {got!r}. Fix: {fix}")


@dataclass
class ParallelConfig:
    cp: int = 1
    """Context-parallel size P: ranks sharing one sequence."""
    dp: int = 0
    """Data-parallel size; 0 derives it as world_size / (tp * cp * pp)."""
    pp: int = 1
    """Pipeline stages (DeepSpeed PipelineModule or megatron 1F1B); CP runs inside each stage."""
    tp: int = 1
    """Tensor-parallel size (backend=megatron only): attention heads and MLP split over TP ranks."""
    vpp: Optional[int] = None
    """Virtual pipeline stages per rank (backend=megatron, interleaved 1F1B; needs pp >= 2)."""
    layout: str = "zigzag"
    """Token layout over the CP group: zigzag (balanced causal work) | contiguous."""
    softmax_cp: str = "zigzag_ring"
    """CP strategy of the softmax (F) layers: zigzag_ring | ulysses | usp | allgather | auto (cost model)."""
    linear_cp: str = "lasp2"
    """CP strategy of the linear (L) layers: lasp2 | ulysses | auto (cost model)."""
    ulysses_degree: int = 0
    """usp only: Ulysses degree U (inner, head-sharded); the ring degree is cp / U. Required for usp."""
    kernel_backend: str = "auto"
    """Local kernels: auto (Triton on GPU, torch on CPU) | triton | torch."""


@dataclass
class BackendConfig:
    name: str = "deepspeed"
    """Training engine: deepspeed | megatron (megatron-core GPTModel with this project's attention)."""
    zero_stage: int = 0
    """ZeRO stage 0-3 (pipeline parallelism supports 0-1)."""
    precision: str = "fp32"
    """bf16 (fp32 master weights in the optimizer) | fp32."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    distributed_optimizer: bool = True
    """megatron only: shard the optimizer state over data-parallel ranks (megatron's ZeRO-1)."""


@dataclass
class DataConfig:
    name: str = "mqar"
    """mqar (generated on the fly, recall accuracy logged) | memmap (a flat token file)."""
    seq_len: int = 64
    """Global sequence length S (before CP sharding)."""
    vocab_size: int = 16
    """mqar: vocabulary of the task (<= model.vocab_size): 7 keys and 8 values at 16."""
    num_kv_pairs: int = 4
    """mqar: key-value pairs listed at the start of each sequence."""
    num_queries: Optional[int] = None
    """mqar: keys queried again (None: all of them)."""
    path: Optional[str] = None
    """memmap: path of the token file (see dist_attn.data.prepare)."""
    dtype: Optional[str] = None
    """memmap: uint16 | uint32; None reads it from the file's PATH.json meta."""


@dataclass
class TrainerConfig:
    steps: int = 400
    """Optimizer steps."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    warmup_steps: int = 20
    """Linear warmup from 0 to lr; cosine decay to min_lr afterwards."""
    min_lr: float = 1e-4
    """Learning rate at the last step."""
    weight_decay: float = 0.01
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    micro_batch: int = 16
    """Sequences per data-parallel replica per micro-step (shared by the replica's CP ranks)."""
    grad_accum: int = 1
    """Micro-steps per optimizer step (with pp > 1: micro-batches in the pipeline)."""
    log_every: int = 10
    """Log metrics every this many steps (and at the last step)."""
    ckpt_every: int = 100
    """Checkpoint every this many steps and at the last step; 0: no periodic or final checkpoint
    (a non-finite loss still saves the last good state)."""
    keep_ckpts: int = 2
    """Complete checkpoints kept in the run directory (older ones are deleted after a newer commits)."""
    resume: Optional[str] = None
    """None | "auto" (latest complete checkpoint under out_dir, if any) | a checkpoint or run directory."""
    seed: int = 0
    """Seeds the model init and the data stream (batch t is a function of (seed, t))."""
    out_dir: str = "outputs"
    """Root of the run directories (hydra.run.dir is out_dir/<run id>)."""
    peak_tflops: Optional[float] = None
    """Peak dense TFLOP/s per device for MFU; None: a table lookup on GPU, a rough estimate on CPU."""
    tensorboard: bool = True
    progress: bool = True
    """Progress bar on rank 0."""
    timeout_s: float = 600.0
    """Seconds any collective (on every process group) may wait before failing: a dead or hung rank
    stops the job instead of stalling it (torch gives sub-groups 30 min by default)."""


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def register_configs() -> None:
    """Register the schema so that ``configs/train.yaml`` can list ``train_schema`` first in its
    defaults: every YAML value and command-line override is then type-checked against it."""
    from hydra.core.config_store import ConfigStore
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def _reject_unknown(node, schema, path: str) -> None:
    """Hydra's ``+key=value`` adds keys even to a typed node: refuse any key the schema lacks."""
    import typing
    from dataclasses import is_dataclass
    hints = typing.get_type_hints(schema)
    for key in node.keys():
        where = f"{path}.{key}" if path else str(key)
        if key not in hints:
            _fail(where, f"one of the keys of {schema.__name__}: {sorted(hints)}", "an unknown key",
                  "fix the spelling; see dist_attn/train/config.py for every key and its meaning")
        if is_dataclass(hints[key]):
            _reject_unknown(node[key], hints[key], where)


def to_train_config(cfg) -> TrainConfig:
    """An OmegaConf node (from Hydra) -> plain dataclasses (ModelConfig validates itself on init)."""
    from omegaconf import OmegaConf
    if isinstance(cfg, TrainConfig):
        return cfg
    _reject_unknown(cfg, TrainConfig, "")
    return OmegaConf.to_object(cfg)


def world_size_from_env() -> int:
    """World size before any process group exists: torch.distributed if up, else the launcher's env."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _positive(name: str, v, fix: str) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        _fail(name, "a positive integer", v, fix)


def _check_parallel(cfg: TrainConfig, world_size: int) -> int:
    p = cfg.parallel
    _positive("parallel.cp", p.cp, "set parallel.cp >= 1")
    _positive("parallel.pp", p.pp, "set parallel.pp >= 1")
    if p.dp < 0:
        _fail("parallel.dp", "0 (derived) or a positive integer", p.dp, "set parallel.dp=0")
    _positive("parallel.tp", p.tp, "set parallel.tp >= 1")
    megatron = cfg.backend.name == "megatron"
    if p.tp > 1 and not megatron:
        _fail("parallel.tp", "1 with backend=deepspeed (tensor parallelism is the megatron backend's)", p.tp,
              "use backend=megatron for tensor parallelism, or parallel.tp=1")
    if p.vpp is not None and (not megatron or p.pp < 2 or p.vpp < 1):
        _fail("parallel.vpp", "null, or >= 1 with backend=megatron and parallel.pp >= 2", p.vpp,
              "set parallel.vpp=null, or use backend=megatron with pipeline stages")
    model_par = p.tp * p.cp * p.pp
    dp = p.dp or world_size // model_par
    if dp < 1 or dp * model_par != world_size:
        _fail("parallel.dp * parallel.tp * parallel.cp * parallel.pp", f"the world size {world_size}",
              f"dp={p.dp or 'derived'} * tp={p.tp} * cp={p.cp} * pp={p.pp}",
              f"launch tp*cp*pp*dp processes (e.g. torchrun --nproc_per_node {model_par * max(p.dp, 1)}) or "
              f"change the sizes so that they multiply to {world_size}")
    if p.layout not in LAYOUTS:
        _fail("parallel.layout", f"one of {LAYOUTS}", p.layout, "use zigzag (balanced causal work)")
    if p.softmax_cp not in SOFTMAX_STRATEGIES:
        _fail("parallel.softmax_cp", f"one of {SOFTMAX_STRATEGIES}", p.softmax_cp, "use zigzag_ring")
    if p.linear_cp not in LINEAR_STRATEGIES:
        _fail("parallel.linear_cp", f"one of {LINEAR_STRATEGIES}", p.linear_cp, "use lasp2")
    if p.kernel_backend not in ("auto", "triton", "torch"):
        _fail("parallel.kernel_backend", "one of ('auto', 'triton', 'torch')", p.kernel_backend, "use auto")
    if p.softmax_cp == "usp" and p.cp > 1:
        u = p.ulysses_degree
        if u < 1 or p.cp % u != 0:
            _fail("parallel.ulysses_degree", f"a divisor of parallel.cp={p.cp} for softmax_cp=usp", u,
                  "set parallel.ulysses_degree=U with U dividing cp (Ulysses inside a node, ring over cp/U)")
    return dp


def _check_heads(cfg: TrainConfig) -> None:
    m, p = cfg.model, cfg.parallel
    kinds = set(m.layer_types)
    if "F" in kinds and m.softmax_head_dim > MAX_SOFTMAX_HEAD_DIM:
        _fail("model.head_dim", f"at most {MAX_SOFTMAX_HEAD_DIM} (the Triton flash kernel's largest head dim)",
              m.softmax_head_dim, "use more heads: set model.n_heads so that d_model / n_heads <= 128")
    degree = {"ulysses": p.cp, "usp": p.ulysses_degree}.get(p.softmax_cp, 1) if p.cp > 1 else 1
    if "F" in kinds and degree > 1:
        if m.n_heads % degree != 0:
            _fail("model.n_heads", f"a multiple of the Ulysses degree {degree} (softmax_cp={p.softmax_cp} "
                  f"shards heads)", m.n_heads, "change n_heads, the CP/Ulysses degree, or use zigzag_ring")
        if m.kv_heads % degree != 0 and degree % m.kv_heads != 0:
            _fail("model.n_kv_heads", f"a divisor or multiple of the Ulysses degree {degree} (KV heads are "
                  f"split or replicated)", m.kv_heads, "change n_kv_heads or the Ulysses degree")
    if "L" in kinds and p.linear_cp == "ulysses" and p.cp > 1 and m.lin_heads % p.cp != 0:
        _fail("model.linear_heads", f"a multiple of parallel.cp={p.cp} (linear_cp=ulysses shards heads)",
              m.lin_heads, "change linear_heads or use parallel.linear_cp=lasp2")
    if p.pp > 1:
        stages = m.n_layers + 2  # embedding, blocks, head
        if p.pp > stages:
            _fail("parallel.pp", f"at most {stages} stages (embedding + {m.n_layers} blocks + head)", p.pp,
                  "use fewer pipeline stages")
        if m.tie_embeddings and cfg.backend.name == "deepspeed":
            _fail("model.tie_embeddings", "False with pipeline parallelism (embedding and head sit on "
                  "different stages)", True, "set model.tie_embeddings=false or parallel.pp=1")


def _check_backend(cfg: TrainConfig) -> None:
    b = cfg.backend
    if b.name not in BACKENDS:
        _fail("backend.name", f"one of {BACKENDS}", b.name, "use backend=deepspeed or backend=megatron")
    if b.zero_stage not in (0, 1, 2, 3):
        _fail("backend.zero_stage", "0, 1, 2 or 3", b.zero_stage, "pick a ZeRO stage")
    if b.name == "megatron" and b.zero_stage != 0:
        _fail("backend.zero_stage", "0 with backend=megatron (ZeRO is DeepSpeed's; megatron shards the "
              "optimizer with backend.distributed_optimizer)", b.zero_stage, "set backend.zero_stage=0")
    if cfg.parallel.pp > 1 and b.zero_stage > 1:
        _fail("backend.zero_stage", "0 or 1 with pipeline parallelism (DeepSpeed pipelines do not shard "
              "gradients or parameters)", b.zero_stage, "use backend.zero_stage=1 or parallel.pp=1")
    if b.precision not in PRECISIONS:
        _fail("backend.precision", f"one of {PRECISIONS}", b.precision, "use bf16 on GPU, fp32 on CPU")
    if b.grad_clip < 0:
        _fail("backend.grad_clip", ">= 0", b.grad_clip, "set 0 to disable clipping")


def _check_data(cfg: TrainConfig) -> None:
    d, m, p = cfg.data, cfg.model, cfg.parallel
    if d.name not in DATASETS:
        _fail("data.name", f"one of {DATASETS}", d.name, "use data=mqar or data=memmap")
    _positive("data.seq_len", d.seq_len, "set data.seq_len")
    n = num_chunks(p.cp, p.layout)
    if d.seq_len % n != 0:
        _fail("data.seq_len", f"a multiple of {n} ({p.layout} layout over cp={p.cp})", d.seq_len,
              f"round data.seq_len to a multiple of {n}")
    if d.seq_len > m.max_seq_len:
        _fail("data.seq_len", f"<= model.max_seq_len={m.max_seq_len}", d.seq_len, "raise model.max_seq_len")
    if d.name == "mqar":
        if d.vocab_size > m.vocab_size:
            _fail("data.vocab_size", f"<= model.vocab_size={m.vocab_size}", d.vocab_size,
                  "lower data.vocab_size or raise model.vocab_size")
        from dist_attn.data.mqar import MQARDataset
        MQARDataset(vocab_size=d.vocab_size, seq_len=d.seq_len, num_kv_pairs=d.num_kv_pairs,
                    num_queries=d.num_queries)  # raises ValueError on inconsistent task sizes
    else:
        if not d.path or not os.path.exists(d.path):
            _fail("data.path", "an existing token file for data=memmap", d.path,
                  "prepare one with `python -m dist_attn.data.prepare` and pass data.path=/path/to/tokens.bin")
        from dist_attn.data.memmap import TokenDataset
        vocab = TokenDataset(d.path, d.seq_len, d.dtype).vocab_size  # checks dtype, size; reads no tokens
        if vocab is not None and vocab > m.vocab_size:
            _fail("model.vocab_size", f">= the token file's vocabulary {vocab}", m.vocab_size,
                  f"set model.vocab_size={vocab}")


def _check_trainer(cfg: TrainConfig) -> None:
    t = cfg.trainer
    for name in ("steps", "micro_batch", "grad_accum", "log_every", "keep_ckpts"):
        _positive(f"trainer.{name}", getattr(t, name), f"set trainer.{name} >= 1")
    if not (t.lr > 0 and 0 <= t.min_lr <= t.lr):
        _fail("trainer.lr / trainer.min_lr", "0 <= min_lr <= lr and lr > 0", (t.lr, t.min_lr),
              "set a positive lr and a smaller min_lr")
    if not t.timeout_s > 0:
        _fail("trainer.timeout_s", "> 0 seconds", t.timeout_s, "set e.g. trainer.timeout_s=600")
    if t.warmup_steps < 0:
        _fail("trainer.warmup_steps", ">= 0", t.warmup_steps, "set 0 for no warmup")
    if t.ckpt_every < 0:
        _fail("trainer.ckpt_every", ">= 0", t.ckpt_every, "set 0 for no checkpoints")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        _fail("trainer.betas", "two values in [0, 1)", t.betas, "use [0.9, 0.95]")
    if t.resume not in (None, "", "auto") and not os.path.isdir(t.resume):
        _fail("trainer.resume", "null, 'auto' or an existing checkpoint / run directory", t.resume,
              "pass the path of a step_* checkpoint or of a run directory holding checkpoints/")


def resolve_auto(cfg: TrainConfig) -> list[str]:
    """Replace ``parallel.softmax_cp=auto`` / ``parallel.linear_cp=auto`` by the strategy the cost model
    (:func:`dist_attn.cost_model.choose_strategy`) predicts fastest for this model, sequence, CP size and
    topology; returns the one-line reasons. Deterministic on every rank: GPUs per node come from
    torchrun's LOCAL_WORLD_SIZE (else NVML, else the hardware profile's default)."""
    p, m, d = cfg.parallel, cfg.model, cfg.data
    if "auto" not in (p.softmax_cp, p.linear_cp):
        return []
    from dist_attn.cost_model import choose_strategy
    _positive("parallel.cp", p.cp, "set parallel.cp >= 1")
    common = dict(seq_len=d.seq_len, cp=p.cp, gpus_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or None,
                  dtype_bytes=2 if cfg.backend.precision == "bf16" else 4, batch=cfg.trainer.micro_batch,
                  layout=p.layout)
    reasons = []
    if p.softmax_cp == "auto":
        name, u, why = choose_strategy("softmax", heads=m.n_heads, kv_heads=m.kv_heads,
                                       head_dim=m.softmax_head_dim, **common)
        p.softmax_cp, p.ulysses_degree = name, (u if name == "usp" else p.ulysses_degree)
        reasons.append(why)
    if p.linear_cp == "auto":
        name, _, why = choose_strategy("linear", heads=m.lin_heads, kv_heads=m.lin_heads,
                                       head_dim=m.lin_head_dim, **common)
        p.linear_cp = name
        reasons.append(why)
    return reasons


def validate(cfg: TrainConfig, world_size: int | None = None) -> int:
    """Check the whole configuration against ``world_size`` (default: from the launcher's env), after
    resolving ``auto`` strategies (:func:`resolve_auto`). Purely local: call it before any process group
    is created. Returns the data-parallel size."""
    world_size = world_size_from_env() if world_size is None else world_size
    resolve_auto(cfg)  # logs its one-line reasons (dist_attn.cost_model)
    cfg.model.validate()
    _check_backend(cfg)
    dp = _check_parallel(cfg, world_size)
    _check_heads(cfg)
    _check_data(cfg)
    _check_trainer(cfg)
    if cfg.backend.name == "megatron":  # its own size rules (heads and vocab over TP, layers over stages)
        from dist_attn.parallel.megatron import MegatronParallel, validate_megatron
        validate_megatron(cfg.model, MegatronParallel.from_train_config(cfg), world_size)
    return dp
