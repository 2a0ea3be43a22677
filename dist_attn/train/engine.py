"""The engine contract: what the trainer asks of a training engine (DeepSpeed, megatron-core, ...).

    cls = dist_attn.engines.engine_class(cfg.backend.name)   # the one place that imports an adapter
    cls.check_options(cfg, plan)           # before any process group: ValueError (expected / got / fix)
    cls.init_distributed(timeout_s)        # torch.distributed from the launcher's env (or a world of one)
    engine = cls.build(cfg, plan, device)  # groups, model (HybridLM weights under cfg.trainer.seed), optimizer
    stats = engine.train_step(batches)     # one optimizer step -> StepStats, reduced over the whole job
    ev = engine.eval_step(batches)         # no gradient, no update -> EvalStats, reduced over the whole job
    engine.save(path, {"step": 10}); engine.load(path); engine.lr; engine.grad_norm

``batches`` is this rank's list of ``grad_accum`` micro-batches ``(input_ids [B, S/P], labels [B, S/P],
position_ids)``, each sequence sharded over the CP group in ``plan.layout``
(:func:`dist_attn.data.sharding.shard_batch`); every TP rank and pipeline stage gets the same list.
With packed documents a micro-batch is ``(input_ids [1, N/P], labels, position_ids, cu_seqlens)``
(:func:`dist_attn.data.sharding.shard_packed`, N = B·S): ``cu_seqlens`` the GLOBAL document offsets
``[0, ..., N]`` on the CPU, the same on every rank; the engine hands it to the model's every attention
layer (:func:`unpack` reads either form).

Loss and statistics contract (the same for every engine): the step minimises the global per-token
mean cross entropy over every labelled token of the step's global batch (all DP replicas, CP shards
and micro-batches), however the labels fall on ranks; ``StepStats`` is that mean, the token count,
the greedy next-token hits over the labelled tokens (MQAR recall), the global gradient norm before
clipping and the step's learning rate, identical on every rank. ``applied`` is False when the loss
was not finite and the update was skipped (the state in memory is the last good one).

This module is low-level on purpose: adapters import it (and :func:`lr_at`,
:func:`ensure_launcher_env`), and it imports nothing of the trainer, the config or any adapter.
"""
from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

IGNORE_INDEX = -100  # labels that do not count (dist_attn.data.mqar.IGNORE_INDEX)


@dataclass(frozen=True)
class StepStats:
    """One optimizer step, reduced over the job (the same numbers on every rank)."""
    loss: float
    """Global per-token mean cross entropy of the step's batch (nan/inf if it was not finite)."""
    n_tokens: int
    """Labelled tokens of the global batch."""
    recall_correct: int
    """Labelled tokens whose greedy prediction is the label (MQAR recall hits)."""
    recall_total: int
    grad_norm: float
    """Global gradient norm before clipping (nan when the engine kept none)."""
    lr: float
    """Learning rate this step's update used."""
    applied: bool
    """False: the loss was not finite and the update was skipped."""


@dataclass(frozen=True)
class EvalStats:
    """One evaluation pass (no gradient), reduced over the job (the same numbers on every rank)."""
    loss: float
    """Global per-token mean cross entropy over the labelled tokens of every batch."""
    n_tokens: int
    recall_correct: int
    recall_total: int


def unpack(micro_batch) -> tuple:
    """``(input_ids, labels, position_ids[, cu_seqlens])`` -> ``(input_ids, labels, position_ids,
    cu_seqlens or None)``."""
    ids, labels, pos, *docs = micro_batch
    assert len(docs) <= 1, f"a micro-batch has 3 or 4 entries, got {3 + len(docs)}"
    return ids, labels, pos, (docs[0] if docs else None)


@runtime_checkable
class Engine(Protocol):
    """A training engine behind the trainer; see the module docstring for the contract."""
    name: ClassVar[str]
    plan: Any            # dist_attn.plan.ParallelPlan, resolved
    coords: Any          # dist_attn.plan.RankCoords of this rank
    cp: Any              # dist_attn.context.CPContext the model's mixers use

    @classmethod
    def check_options(cls, cfg, plan) -> None:
        """Raise ValueError on options this engine cannot run (local; before any process group)."""

    @classmethod
    def init_distributed(cls, timeout_s: float) -> None:
        """Initialise torch.distributed (no-op if it is up)."""

    @classmethod
    def build(cls, cfg, plan, device) -> "Engine":
        """Collective: groups, model, optimizer and schedule of ``cfg`` (a TrainConfig) under ``plan``."""

    def train_step(self, batches: list) -> StepStats: ...

    def eval_step(self, batches: list) -> EvalStats:
        """Forward only over ``batches`` (any number; pipelines: through the stages), no gradient."""

    def save(self, path: str, client_state: dict) -> None: ...

    def load(self, path: str) -> dict: ...

    @property
    def lr(self) -> float: ...

    @property
    def grad_norm(self) -> float: ...

    def describe(self) -> str: ...


def lr_at(t, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based), the same for every engine::

        lr(t) = lr * t / W                                            for t <= W (linear warmup)
        lr(t) = min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2,  p = (t - W) / (T - W), clamped to 1

    with W = ``t.warmup_steps`` and T = max(``t.steps``, W + 1): megatron-core's
    ``OptimizerParamScheduler`` 'cosine' style, which the megatron engine uses directly and the
    DeepSpeed engine reproduces as a torch ``LambdaLR`` (DeepSpeed's own WarmupCosineLR starts the
    cosine one step early). ``t``: anything with lr, min_lr, warmup_steps, steps (a TrainerConfig)."""
    w = t.warmup_steps
    if w > 0 and step <= w:
        return t.lr * step / w
    p = min(1.0, (step - w) / (max(t.steps, w + 1) - w))
    return t.min_lr + (t.lr - t.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


def ensure_launcher_env() -> None:
    """A plain ``python -m launchers.train`` (no torchrun) is a world of one: give it the environment a
    launcher would (rank 0 of 1, a free local port) so every engine initialises the same way."""
    if "RANK" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")


def world_size_from_env() -> int:
    """World size before any process group exists: torch.distributed if up, else the launcher's env."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))
