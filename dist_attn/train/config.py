"""Typed training configuration: Hydra structured configs (unknown keys fail) and their validation.

The schema is one dataclass per config group, registered in Hydra's ConfigStore by
:func:`register_configs`; the YAML files under ``configs/`` only pick values and combinations::

    python -m launchers.train model=1b parallel.cp=4 parallel.softmax_cp=ulysses trainer.steps=200

:func:`validate` checks every size against the world size *before* any process group exists and
returns the job's :class:`~dist_attn.plan.ParallelPlan` (``auto`` strategies resolved into a new plan;
the config itself is never changed), so a bad combination fails with a ``ValueError`` (expected /
got / fix) on every rank alike instead of hanging in the first collective. Engine-specific rules are
the engine's (``check_options`` of the class :func:`dist_attn.engines.engine_class` names).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from dist_attn.checks import fail
from dist_attn.engines import ENGINES
from dist_attn.model.config import ModelConfig
from dist_attn.plan import ParallelPlan
from dist_attn.train.engine import lr_at, world_size_from_env  # noqa: F401  (re-exported)

BACKENDS = tuple(ENGINES)
PRECISIONS = ("bf16", "fp32")
DATASETS = ("mqar", "memmap")
RECOMPUTE_MODES = ("none", "selective", "full")
MAX_SOFTMAX_HEAD_DIM = 128  # dist_attn.kernels.flash_attn Triton tiles (head dims are padded to a power of two)


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
    sp: Optional[bool] = None
    """Sequence parallelism with TP (backend=megatron): norms, residuals and the MLP's elementwise work
    on S/(P·T) tokens per rank (all-gather before the column-parallel projections, reduce-scatter after
    the row-parallel ones). None: on when tp > 1; true needs tp > 1 and (seq_len / cp) % tp == 0."""


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
    documents: bool = False
    """memmap: pack the windows with their document boundaries (``dist_attn.data.packing``): attention
    and linear-attention state stop at every end-of-document token, RoPE positions restart at each
    document, no loss across a boundary. A micro-batch of B rows is one packed row of B·seq_len tokens
    (so micro_batch·seq_len <= model.max_seq_len). Needs a token file with an eos_id (from prepare)."""
    val_path: Optional[str] = None
    """memmap: the validation token file for trainer.eval_every; None: the held-out file ``PATH.val``
    that ``prepare --val-fraction`` wrote beside data.path, if any."""


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
    eval_every: int = 0
    """Validation loss and perplexity every this many steps (and at the last step); 0: never. The
    stream is data.val_path / the held-out file (memmap) or a fixed MQAR split: the same batches at
    every evaluation, whatever the seed, the step or a restart."""
    eval_batches: int = 4
    """Micro-batches (of micro_batch rows per data-parallel replica) per evaluation."""
    progress: bool = True
    """Progress bar on rank 0."""
    recompute: str = "none"
    """Activation recomputation (both engines; see :mod:`dist_attn.model.hybrid` for the details):

    * ``none``: every block keeps all its activations for the backward.
    * ``selective``: each block keeps its input, the mixer's inputs and outputs (projections, the
      attention output with its LSE / the linear states, the output gate and projection), and
      recomputes in backward what is cheap and large: the two RMSNorms and the whole SwiGLU MLP
      (norm2 + gate/up projections, silu, product). No communication is recomputed. Megatron:
      ``recompute_granularity=selective, recompute_modules=[mlp]`` (+ ``layernorm`` when
      TransformerEngine is installed; its ``core_attn`` targets megatron's own attention, which this
      project's mixers replace; see ``parallel/_megatron_setup.py``).
    * ``full``: each block keeps only its input ``[B, S/P, d]``; the whole block (norms, projections,
      attention, MLP) runs again in backward, *including the CP communication* (ring P2P,
      all-gathers, Ulysses all-to-alls, LASP-2 / gated-delta state exchange): every rank of a CP
      group recomputes its blocks in the same order, so the collectives match. Megatron:
      ``recompute_granularity=full, recompute_method=uniform, recompute_num_layers=1``."""
    loss_chunk: int = 0
    """0: off. N > 0: the output projection and cross entropy run over chunks of N tokens of the local
    shard, each chunk's logits recomputed in backward, so the ``[S/P, V]`` logits never exist at once
    (forward and backward); the gradients of the hidden states and of the output weight accumulate
    over the chunks. Both engines (megatron: vocab-parallel over TP), pipeline last stages included;
    not with DeepSpeed ZeRO-3 (the weight is read outside the head's forward)."""
    offload: bool = False
    """With recompute=full: keep each block's saved input in host memory (pinned on GPU, copied without a
    host sync) and bring it back for the block's recomputation. DeepSpeed engine only (plain model)."""
    timeout_s: float = 600.0
    """Seconds any collective (on every process group) may wait before failing: a dead or hung rank
    stops the job instead of stalling it (torch gives sub-groups 30 min by default)."""


AUTO = "auto"  # model.vocab_size=auto


@dataclass
class ModelSchema(ModelConfig):
    """The ``model`` group as Hydra types it: :class:`ModelConfig` whose ``vocab_size`` may also be
    ``"auto"`` (the token file's meta for data=memmap, data.vocab_size for MQAR), resolved by
    :func:`resolve_vocab` (``to_train_config`` and the trainer call it) into a plain int."""
    vocab_size: Any = 256

    def __post_init__(self):
        if self.vocab_size != AUTO:
            self.validate()


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelSchema)
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
            fail(where, f"one of the keys of {schema.__name__}: {sorted(hints)}", "an unknown key",
                 "fix the spelling; see dist_attn/train/config.py for every key and its meaning")
        if is_dataclass(hints[key]):
            _reject_unknown(node[key], hints[key], where)


def to_train_config(cfg) -> TrainConfig:
    """An OmegaConf node (from Hydra) -> plain dataclasses (ModelConfig validates itself on init),
    with ``model.vocab_size=auto`` resolved (:func:`resolve_vocab`)."""
    from omegaconf import OmegaConf
    if not isinstance(cfg, TrainConfig):
        _reject_unknown(cfg, TrainConfig, "")
        cfg = OmegaConf.to_object(cfg)
    return resolve_vocab(cfg)


def resolve_vocab(cfg: TrainConfig) -> TrainConfig:
    """``data.path=builtin:NAME`` -> the token file of that built-in corpus (:mod:`dist_attn.data.builtin`),
    and ``model.vocab_size=auto`` -> the vocabulary of the data: the token file's meta
    (:func:`dist_attn.data.memmap.vocab_size_from_meta`) for data=memmap, ``data.vocab_size`` for
    MQAR. Returns ``cfg`` itself when there is nothing to resolve, else a new config (local, no I/O
    beyond the meta file)."""
    import dataclasses
    if cfg.data.path and str(cfg.data.path).startswith("builtin:"):  # data=pydocs: built on first use
        from dist_attn.data.builtin import PREFIX, builtin_token_file
        path = builtin_token_file(cfg.data.path[len(PREFIX):], cfg.trainer.out_dir)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=path))
    m, d = cfg.model, cfg.data
    if m.vocab_size != AUTO:
        return cfg
    if d.name == "memmap":
        if not d.path or not os.path.exists(d.path):
            fail("model.vocab_size=auto", "data.path naming an existing token file to read the vocabulary from",
                 repr(d.path), "pass data.path=/path/to/tokens.bin (from `python -m dist_attn.data.prepare`)")
        from dist_attn.data.memmap import vocab_size_from_meta
        vocab = vocab_size_from_meta(d.path)
    else:
        vocab = d.vocab_size
    model = dataclasses.replace(m, vocab_size=vocab)  # validates the model with its real vocabulary
    return dataclasses.replace(cfg, model=model)


def _positive(name: str, v, fix: str) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        fail(name, "a positive integer", v, fix)


def _check_backend(cfg: TrainConfig) -> None:
    """Options every engine reads; each engine checks its own rules in ``check_options``."""
    b = cfg.backend
    if b.name not in BACKENDS:
        fail("backend.name", f"one of {BACKENDS}", repr(b.name), "use backend=deepspeed or backend=megatron")
    if b.zero_stage not in (0, 1, 2, 3):
        fail("backend.zero_stage", "0, 1, 2 or 3", b.zero_stage, "pick a ZeRO stage")
    if b.precision not in PRECISIONS:
        fail("backend.precision", f"one of {PRECISIONS}", repr(b.precision), "use bf16 on GPU, fp32 on CPU")
    if b.grad_clip < 0:
        fail("backend.grad_clip", ">= 0", b.grad_clip, "set 0 to disable clipping")


def _check_model(cfg: TrainConfig, plan: ParallelPlan) -> None:
    m = cfg.model
    if "F" in m.layer_types and m.softmax_head_dim > MAX_SOFTMAX_HEAD_DIM:
        fail("model.head_dim", f"at most {MAX_SOFTMAX_HEAD_DIM} (the Triton flash kernel's largest head dim)",
             m.softmax_head_dim, "use more heads: set model.n_heads so that d_model / n_heads <= 128")
    plan.check_model(m)  # heads over TP and over the Ulysses degrees of both layer types


def _check_data(cfg: TrainConfig, plan: ParallelPlan) -> None:
    d, m = cfg.data, cfg.model
    if d.name not in DATASETS:
        fail("data.name", f"one of {DATASETS}", repr(d.name), "use data=mqar or data=memmap")
    _positive("data.seq_len", d.seq_len, "set data.seq_len")
    plan.check_sequence(d.seq_len, "data.seq_len")
    if d.seq_len > m.max_seq_len:
        fail("data.seq_len", f"<= model.max_seq_len={m.max_seq_len}", d.seq_len, "raise model.max_seq_len")
    if d.name == "mqar":
        if d.vocab_size > m.vocab_size:
            fail("data.vocab_size", f"<= model.vocab_size={m.vocab_size}", d.vocab_size,
                 "lower data.vocab_size or raise model.vocab_size")
        from dist_attn.data.mqar import MQARDataset
        MQARDataset(vocab_size=d.vocab_size, seq_len=d.seq_len, num_kv_pairs=d.num_kv_pairs,
                    num_queries=d.num_queries)  # raises ValueError on inconsistent task sizes
    else:
        if not d.path or not os.path.exists(d.path):
            fail("data.path", "an existing token file for data=memmap", repr(d.path),
                 "prepare one with `python -m dist_attn.data.prepare` and pass data.path=/path/to/tokens.bin")
        from dist_attn.data.memmap import TokenDataset, resolve_val_path
        from dist_attn.data.packing import open_dataset
        # checks dtype and size (reads no tokens); with documents also the eos_id of the meta
        vocab = open_dataset(d.path, d.seq_len, documents=d.documents, dtype=d.dtype).vocab_size
        if vocab is not None and vocab > m.vocab_size:
            fail("model.vocab_size", f">= the token file's vocabulary {vocab}", m.vocab_size,
                 f"set model.vocab_size={vocab} (or model.vocab_size=auto)")
        val = resolve_val_path(d.path, d.val_path)  # raises if data.val_path names no file
        if cfg.trainer.eval_every and val is None:
            fail("trainer.eval_every", "a validation token file: data.val_path or the held-out PATH.val beside "
                 "data.path", f"eval_every={cfg.trainer.eval_every} and no {d.path}.val",
                 "prepare with --val-fraction 0.01 (writes PATH.val), pass data.val_path=..., or "
                 "set trainer.eval_every=0")
        if val is not None:
            TokenDataset(val, d.seq_len, d.dtype, sequential=True)  # long enough, same dtype
    if d.documents:
        if d.name != "memmap":
            fail("data.documents", "false with data=mqar (MQAR sequences are single documents)", True,
                 "use data=memmap data.path=... data.documents=true, or data.documents=false")
        n = cfg.trainer.micro_batch * d.seq_len
        if n > m.max_seq_len:
            fail("data.documents=true", f"micro_batch x seq_len <= model.max_seq_len={m.max_seq_len} (a "
                 f"micro-batch is ONE packed row of micro_batch x seq_len tokens)",
                 f"{cfg.trainer.micro_batch} x {d.seq_len} = {n}",
                 f"raise model.max_seq_len to {n}, or lower trainer.micro_batch")
        plan.check_sequence(n, "trainer.micro_batch x data.seq_len (the packed row)")
    w = getattr(m, "window_size", None)
    if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
        fail("model.window_size", "null or an int >= 0 (a query at p sees keys p - W .. p)", repr(w),
             "set e.g. model.window_size=1024, or null for full causal attention")


def _check_trainer(cfg: TrainConfig) -> None:
    t = cfg.trainer
    for name in ("steps", "micro_batch", "grad_accum", "log_every", "keep_ckpts", "eval_batches"):
        _positive(f"trainer.{name}", getattr(t, name), f"set trainer.{name} >= 1")
    if not (t.lr > 0 and 0 <= t.min_lr <= t.lr):
        fail("trainer.lr / trainer.min_lr", "0 <= min_lr <= lr and lr > 0", (t.lr, t.min_lr),
             "set a positive lr and a smaller min_lr")
    if not t.timeout_s > 0:
        fail("trainer.timeout_s", "> 0 seconds", t.timeout_s, "set e.g. trainer.timeout_s=600")
    if t.recompute not in RECOMPUTE_MODES:
        fail("trainer.recompute", f"one of {RECOMPUTE_MODES}", repr(t.recompute),
             "use none, selective (norms + MLP recomputed) or full (whole blocks recomputed)")
    if not isinstance(t.loss_chunk, int) or isinstance(t.loss_chunk, bool) or t.loss_chunk < 0:
        fail("trainer.loss_chunk", "0 (off) or a positive number of tokens per chunk", repr(t.loss_chunk),
             "set e.g. trainer.loss_chunk=4096, or 0 to compute the logits at once")
    if t.offload and t.recompute != "full":
        fail("trainer.offload", "false unless trainer.recompute=full (it offloads the saved block inputs)",
             t.offload, "set trainer.recompute=full or trainer.offload=false")
    if t.warmup_steps < 0:
        fail("trainer.warmup_steps", ">= 0", t.warmup_steps, "set 0 for no warmup")
    if not isinstance(t.eval_every, int) or isinstance(t.eval_every, bool) or t.eval_every < 0:
        fail("trainer.eval_every", "0 (no evaluation) or a positive number of steps", repr(t.eval_every),
             "set e.g. trainer.eval_every=100")
    if t.ckpt_every < 0:
        fail("trainer.ckpt_every", ">= 0", t.ckpt_every, "set 0 for no checkpoints")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        fail("trainer.betas", "two values in [0, 1)", t.betas, "use [0.9, 0.95]")
    if t.resume not in (None, "", "auto") and not os.path.isdir(t.resume):
        fail("trainer.resume", "null, 'auto' or an existing checkpoint / run directory", repr(t.resume),
             "pass the path of a step_* checkpoint or of a run directory holding checkpoints/")


def plan_for(cfg: TrainConfig, world_size: int) -> tuple[ParallelPlan, list[str]]:
    """The job's plan from ``cfg.parallel`` with ``auto`` strategies resolved by the cost model
    (:meth:`ParallelPlan.resolve_auto`; GPUs per node from torchrun's LOCAL_WORLD_SIZE), and the
    one-line reasons of the choices."""
    plan = ParallelPlan.from_config(cfg.parallel, world_size)
    dtype_bytes = 2 if cfg.backend.precision == "bf16" else 4
    plan, why = _resolve_masked_softmax(cfg, plan, dtype_bytes)
    plan, more = plan.resolve_auto(cfg.model, seq_len=cfg.data.seq_len, batch=cfg.trainer.micro_batch,
                                   dtype_bytes=dtype_bytes)
    return plan, why + more


def representative_documents(cfg: TrainConfig) -> Optional[tuple]:
    """The document offsets the cost model plans with for ``data.documents=true``: one packed row of
    micro_batch rows of seq_len tokens, each row cut into documents of the token file's MEAN length
    (meta num_tokens / num_documents; the last piece of a row shorter), a new document at every row
    start as the packing does. None without documents (or without the meta's counts)."""
    d = cfg.data
    if not d.documents or not d.path:
        return None
    from dist_attn.data.memmap import read_meta
    meta = read_meta(d.path) or {}
    if not meta.get("num_documents") or not meta.get("num_tokens"):
        return None
    mean = max(1, round(meta["num_tokens"] / meta["num_documents"]))
    s, offsets = d.seq_len, [0]
    for row in range(cfg.trainer.micro_batch):
        offsets += [row * s + k for k in range(mean, s, mean)] + [(row + 1) * s]
    return tuple(offsets)


def _resolve_masked_softmax(cfg: TrainConfig, plan: ParallelPlan, dtype_bytes: int) -> tuple:
    """``parallel.softmax_cp=auto`` with packed documents or a window: the cost model ranks the softmax
    strategies on the masked work and traffic (:func:`dist_attn.cost_model.choose_softmax_masked`;
    the ring skips blocks and bytes, the others only work). Other cases: unchanged, no reason."""
    m, w = cfg.model, getattr(cfg.model, "window_size", None)
    cu = representative_documents(cfg)
    if plan.softmax_cp != AUTO or plan.cp == 1 or "F" not in m.layer_types or (cu is None and w is None):
        return plan, []
    from dist_attn.cost_model import AttnShape, choose_softmax_masked
    from dist_attn.hardware import detect_gpus_per_node, get_profile
    n, b = (cu[-1], 1) if cu is not None else (cfg.data.seq_len, cfg.trainer.micro_batch)
    shape = AttnShape(n, m.n_heads, m.kv_heads, m.softmax_head_dim, b, dtype_bytes, True, plan.layout,
                      cu_seqlens=cu, window_size=w)
    gpn = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or detect_gpus_per_node()[0] or get_profile("auto").gpus_per_node
    name, u, why = choose_softmax_masked(shape, plan.cp, gpus_per_node=gpn)
    return plan.replace(softmax_cp=name, ulysses_degree=u if name == "usp" else plan.ulysses_degree), [why]


def validate(cfg: TrainConfig, world_size: int | None = None) -> ParallelPlan:
    """Check the whole configuration against ``world_size`` (default: from the launcher's env) and
    return the job's resolved :class:`ParallelPlan` (``plan.dp`` is the data-parallel size). Purely
    local: call it before any process group is created. ``cfg`` is not modified."""
    from dist_attn.engines import engine_class
    world_size = world_size_from_env() if world_size is None else world_size
    if cfg.model.vocab_size == AUTO:
        fail("model.vocab_size", "an int (auto resolved before validation)", "'auto'",
             "pass the config through dist_attn.train.config.to_train_config or resolve_vocab first")
    cfg.model.validate()
    _check_backend(cfg)
    plan, _ = plan_for(cfg, world_size)  # the cost model logs its one-line reasons
    _check_model(cfg, plan)
    _check_data(cfg, plan)
    _check_trainer(cfg)
    engine_class(cfg.backend.name).check_options(cfg, plan)  # the engine's own rules
    return plan
