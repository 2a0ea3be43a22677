"""Typed training configuration: Hydra structured configs (unknown keys fail) and their validation.

The schema is one dataclass per config group, registered in Hydra's ConfigStore by
:func:`register_configs`; the YAML files under ``configs/`` only pick values and combinations::

    python -m launchers.train model=1b parallel.cp=4 parallel.softmax_cp=ulysses trainer.steps=200

:func:`validate` (:mod:`dist_attn.train.validation`, re-exported here) checks every size against the
world size *before* any process group exists and
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
from dist_attn.model.config import ModelConfig
from dist_attn.train.engine import lr_at, world_size_from_env  # noqa: F401  (re-exported)
from dist_attn.train.validation import (AUTO, BACKENDS, DATASETS, MAX_SOFTMAX_HEAD_DIM,  # noqa: F401 (re-exported)
                                        PRECISIONS, RECOMPUTE_MODES, plan_for, representative_documents, validate)



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
    """CP strategy of the linear (L, G, D) layers: lasp2 (state passing) | ulysses (all-to-all) | auto."""
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
