"""Validation of a :class:`~dist_attn.train.config.TrainConfig` (re-exported by :mod:`dist_attn.train.config`).

:func:`validate` checks every size against the world size *before* any process group exists and returns
the job's :class:`~dist_attn.plan.ParallelPlan`, with ``auto`` strategies resolved by the cost model
(:func:`plan_for`); a bad combination fails with a ``ValueError`` (expected / got / fix) on every rank
alike. Engine-specific rules are the engine's ``check_options``.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

from dist_attn.checks import fail
from dist_attn.engines import ENGINES
from dist_attn.plan import ParallelPlan
from dist_attn.train.engine import world_size_from_env

if TYPE_CHECKING:
    from dist_attn.train.config import TrainConfig

AUTO = "auto"  # model.vocab_size=auto, parallel.*_cp=auto
BACKENDS = tuple(ENGINES)
PRECISIONS = ("bf16", "fp32")
DATASETS = ("mqar", "memmap")
RECOMPUTE_MODES = ("none", "selective", "full")
MAX_SOFTMAX_HEAD_DIM = 128  # dist_attn.kernels.flash_attn Triton tiles (head dims are padded to a power of two)


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
