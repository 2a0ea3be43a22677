"""The one megatron-core adapter: :class:`MegatronEngine` implements :class:`dist_attn.train.engine.Engine`.

Nothing else in the project imports ``megatron``; this module and its private helpers are the whole
contact surface: ``parallel/_megatron_setup.py`` (sizes and their validation, process groups, model
building), ``parallel/_megatron_layers.py`` (our mixers inside megatron's layers),
``parallel/_megatron_weights.py`` (the HybridLM weight mapping), ``parallel/_megatron_cpu.py`` (the CPU
path). Import everything from here; only :mod:`dist_attn.engines` names this module. The trainer sees :class:`MegatronEngine` (``build``
from a config and plan); tests and scripts can build one piece by piece::

    plan = ParallelPlan.build(8, tp=2, pp=2, cp=2, vpp=2, softmax_cp="zigzag_ring", linear_cp="lasp2")
    groups = init_megatron(plan, model_cfg, seed=0)         # torch.distributed + megatron groups
    engine = MegatronEngine(model_cfg, groups, MegatronTrainSettings(lr=1e-3, steps=400), seq_len=S,
                            micro_batch=B, seed=0)          # weights: HybridLM(model_cfg) under seed 0
    stats = engine.train_step(micro_batches)                # [(ids, labels, pos)] of this (dp, cp) rank
    engine.save(path, {"step": 10}); engine.load(path)      # megatron dist_checkpointing, atomic

What megatron provides: ``GPTModel`` (embedding, ``TransformerBlock``, SwiGLU ``MLP``, vocab-parallel
output layer and cross entropy) with tensor parallelism; the pipeline schedules of
``get_forward_backward_func`` (1F1B, or interleaved with ``vpp`` virtual stages); its
``DistributedDataParallel`` and (distributed) optimizer; ``finalize_model_grads``; the LR schedule;
``dist_checkpointing``. What is ours: the two sequence mixers in every layer's ``self_attention`` slot,
calling :mod:`dist_attn.dispatch` with the configured CP strategy (see ``_megatron_layers``).

Process groups. ``megatron.core.parallel_state`` with order ``tp-cp-ep-dp-pp`` (TP fastest)::

    global_rank = tp_rank + T·(cp_rank + P·(dp_rank + DP·pp_rank))

With T = 1 this is the DeepSpeed trainer's layout (``dist_attn.train.groups``). Megatron's
context-parallel group *is* the CP group of our strategies (megatron-core's own CP needs
TransformerEngine and is never used: no megatron attention runs). Gradients are reduced over
megatron's DP x CP group: the CP ranks hold partial gradients of the same replica (summed), the DP
ranks different data.

Loss normalisation. ``calculate_per_token_loss``: each micro-batch's loss is the *sum* of the
per-token cross entropies of this shard; megatron sums gradients over DP x CP and micro-batches and
``finalize_model_grads`` divides by the all-reduced number of labelled tokens, so the update is that
of the global per-token mean loss -- the same function as :class:`~dist_attn.model.hybrid.HybridLM`
trained on one process, however labels fall on ranks.

Weights. :func:`build_megatron_model` loads a HybridLM state dict through
:func:`hybridlm_to_megatron_state_dict`; by default ``HybridLM(model_cfg)`` built under
``torch.manual_seed(seed)``, i.e. the DeepSpeed backend's initial weights for the same seed, whatever
the parallel sizes. Weight decay applies to every parameter (as the DeepSpeed backend's AdamW).
"""
from __future__ import annotations

import logging
import os
import shutil
import warnings
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist

from dist_attn.checks import fail
from dist_attn.model.config import ModelConfig
from dist_attn.model.hybrid import chunked_loss
from dist_attn.parallel._megatron_cpu import megatron_device_shim
from dist_attn.parallel._megatron_weights import hybridlm_to_megatron_state_dict
from dist_attn.parallel._megatron_setup import (MegatronGroups, MegatronTrainSettings, _init_torch_distributed,
                                                build_megatron_model, hidden_output_layers, init_megatron,
                                                load_hybridlm_weights, transformer_config, validate_megatron,
                                                vocab_parallel_chunk_ce)
from dist_attn.train.engine import IGNORE_INDEX, EvalStats, StepStats, unpack

with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": expected, we use neither
    warnings.simplefilter("ignore")
    from megatron.core import dist_checkpointing, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

logging.getLogger("megatron").setLevel(logging.WARNING)
CKPT_SUBDIR = "megatron"

__all__ = ["MegatronGroups", "MegatronTrainSettings", "MegatronEngine", "validate_megatron",
           "init_megatron", "build_megatron_model", "transformer_config", "hybridlm_to_megatron_state_dict",
           "load_hybridlm_weights", "megatron_device_shim", "describe", "init_distributed"]


def init_distributed(timeout_s: float = 600.0) -> None:
    """torch.distributed from the launcher's environment (torchrun: nccl on GPU, gloo on CPU), or a
    world of one; a no-op if already initialised. Same role as ``dist_attn.parallel.deepspeed.init_distributed``;
    :func:`init_megatron` calls it itself."""
    _init_torch_distributed(timeout_s)


# ---------------------------------------------------------------------------- training

def _vocab_parallel_argmax(logits: torch.Tensor, tp_group) -> torch.Tensor:
    """argmax over the full vocabulary of vocab-parallel ``logits [b, s, V/T]`` -> ``[b, s]`` long."""
    val, idx = logits.max(dim=-1)
    t = dist.get_world_size(tp_group)
    if t == 1:
        return idx
    idx = idx + dist.get_rank(tp_group) * logits.shape[-1]
    both = torch.stack([val.float(), idx.float()])               # [2, b, s]; ids < 2^24 are exact in fp32
    out = torch.empty((t * 2, *both.shape[1:]), dtype=both.dtype, device=both.device)
    dist.all_gather_into_tensor(out, both, group=tp_group)
    out = out.view(t, *both.shape)                               # [T, 2, b, s]
    best = out[:, 0].argmax(dim=0, keepdim=True)                 # first rank wins ties, like argmax
    return out[:, 1].gather(0, best).squeeze(0).long()


class MegatronEngine:
    """A megatron-core training engine behind the engine contract (:mod:`dist_attn.train.engine`).

    ``train_step(micro_batches)`` runs one optimizer step over this rank's micro-batches (a list of
    ``(input_ids [B, S/P], labels [B, S/P], position_ids)``, ``grad_accum`` of them, sharded over CP
    with ``groups.cp.layout``; every TP rank and pipeline stage gets the same list) and returns the
    step's :class:`~dist_attn.train.engine.StepStats`, reduced over the whole job. ``applied`` is False
    when the loss was not finite: the optimizer step was skipped, so the state in memory is the last
    good one (the trainer saves it and stops).
    """
    name = "megatron"

    # ------------------------------------------------------------------ the contract's class methods
    @classmethod
    def check_options(cls, cfg, plan) -> None:
        """Megatron's own rules (local; before any process group): no ZeRO, sizes over TP/PP/VPP."""
        if cfg.backend.zero_stage != 0:
            fail("backend.zero_stage", "0 with backend=megatron (ZeRO is DeepSpeed's; megatron shards the "
                 "optimizer with backend.distributed_optimizer)", cfg.backend.zero_stage, "set backend.zero_stage=0")
        if getattr(cfg.trainer, "offload", False):
            fail("trainer.offload", "false with backend=megatron (host offload is the DeepSpeed engine's; megatron "
                 "recomputes with trainer.recompute)", True, "set trainer.offload=false or backend=deepspeed")
        validate_megatron(cfg.model, plan)

    @classmethod
    def init_distributed(cls, timeout_s: float = 600.0) -> None:
        init_distributed(timeout_s)

    @classmethod
    def build(cls, cfg, plan, device=None) -> "MegatronEngine":
        """Collective: megatron's TP/PP/CP/DP groups and GPTModel chunks with the weights of
        ``HybridLM(cfg.model)`` under ``cfg.trainer.seed`` (the DeepSpeed engine's initial weights)."""
        groups = init_megatron(plan, cfg.model, seed=cfg.trainer.seed, timeout_s=float(cfg.trainer.timeout_s))
        seq_len, micro_batch = cfg.data.seq_len, cfg.trainer.micro_batch
        if getattr(cfg.data, "documents", False):  # packed documents: one row of micro_batch x seq_len tokens
            seq_len, micro_batch = seq_len * micro_batch, 1
        return cls(cfg.model, groups, MegatronTrainSettings.from_train_config(cfg), seq_len=seq_len,
                   micro_batch=micro_batch, seed=cfg.trainer.seed)

    # ------------------------------------------------------------------ construction
    def __init__(self, model_cfg: ModelConfig, groups: MegatronGroups, settings: MegatronTrainSettings, *,
                 seq_len: int, micro_batch: int, hybrid_state_dict: dict | None = None, seed: int | None = None):
        self.model_cfg, self.groups, self.settings = model_cfg, groups, settings
        self.plan, self.cp = groups.plan, groups.cp
        self.seq_len, self.micro_batch = seq_len, micro_batch
        par = settings
        self.chunks = build_megatron_model(model_cfg, groups, precision=settings.precision,
                                           hybrid_state_dict=hybrid_state_dict, seed=seed,
                                           recompute=settings.recompute)
        with megatron_device_shim():
            config = self.chunks[0].config
            ddp_config = DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, overlap_grad_reduce=False, overlap_param_gather=False,
                use_distributed_optimizer=par.distributed_optimizer, check_for_nan_in_grad=False)
            wrapped = [Float16Module(config, c) if par.precision == "bf16" else c for c in self.chunks]
            # only the first chunk buckets its gradients (megatron's convention for virtual stages)
            self.model = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=c,
                                                  disable_bucketing=i > 0) for i, c in enumerate(wrapped)]
            s = settings
            opt_config = OptimizerConfig(
                optimizer="adam", lr=s.lr, min_lr=s.min_lr, weight_decay=s.weight_decay, adam_beta1=s.betas[0],
                adam_beta2=s.betas[1], adam_eps=s.eps, clip_grad=s.grad_clip, bf16=par.precision == "bf16",
                params_dtype=config.params_dtype, use_distributed_optimizer=par.distributed_optimizer)
            # config_overrides={}: decay every parameter (megatron's default exempts norms and biases)
            self.optimizer = get_megatron_optimizer(opt_config, self.model, config_overrides={},
                                                    use_gloo_process_groups=torch.cuda.is_available())
            self.scheduler = OptimizerParamScheduler(
                self.optimizer, init_lr=0.0, max_lr=s.lr, min_lr=s.min_lr, lr_warmup_steps=s.warmup_steps,
                lr_decay_steps=max(s.steps, s.warmup_steps + 1), lr_decay_style="cosine",
                start_wd=s.weight_decay, end_wd=s.weight_decay, wd_incr_steps=max(s.steps, 1),
                wd_incr_style="constant")
            config.finalize_model_grads_func = finalize_model_grads
            config.grad_scale_func = self.optimizer.scale_loss
            syncs = [m.no_sync for m in self.model]
            config.no_sync_func = syncs[0] if len(syncs) == 1 else syncs
        self.last_grad_norm = float("nan")
        # trainer.loss_chunk: the last stage's output layer hands its hidden states to a chunked loss
        self._loss_chunk = settings.loss_chunk
        self._out_layers = hidden_output_layers(self.chunks) if settings.loss_chunk else []
        self._stats: Optional[torch.Tensor] = None
        # packed documents reach megatron's layers as its ``packed_seq_params``; our mixers take the
        # global offsets as ``cu_seqlens``: hand them over at every mixer call (the offsets stay on the CPU)
        for chunk in self.chunks:
            for mod in chunk.modules():
                if getattr(type(mod), "cp_aware", False):
                    mod.register_forward_pre_hook(_packed_to_cu_seqlens, with_kwargs=True)

    @property
    def coords(self):
        return self.groups.coords

    def describe(self) -> str:
        return describe(self.groups)

    # ------------------------------------------------------------------ one step
    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def grad_norm(self) -> float:
        return self.last_grad_norm

    @property
    def is_last_stage(self) -> bool:
        return self.groups.is_last_stage

    def layer_kinds(self) -> list:
        """``[[(global layer index, pattern letter "L" | "G" | "D" | "F"), ...] per chunk]`` as built on this rank."""
        return [[(layer.layer_number - 1, type(layer.self_attention).KIND)
                 for layer in c.decoder.layers] for c in self.chunks]

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, S/P, V]`` (gathered over TP) of this rank's CP shard; without pipelining only.
        ``position_ids`` must be the layout's (``shard_batch``): the mixers derive the same ones."""
        if self.plan.pp > 1:
            fail("MegatronEngine.forward", "pp=1 (a pipelined model has no single forward)", self.plan.pp,
                 "evaluate through train-time metrics, or build a pp=1 backend")
        with megatron_device_shim():
            logits = self.model[0](input_ids, position_ids, None)          # [B, S/P, V/T]
            return tensor_parallel.gather_from_tensor_model_parallel_region(logits, group=self.groups.tp_group)

    def _loss(self, labels: torch.Tensor, logits: torch.Tensor):
        """Last stage: ``logits [b, s, V/T]`` -> (summed CE of the labelled tokens, their count, stats)."""
        mask = labels != IGNORE_INDEX
        layer = self._out_layers[-1] if self._out_layers else None
        if layer is not None and layer.dist_attn_hidden:  # logits: the hidden states [b, s, d]
            loss_sum, _, correct = chunked_loss(logits, layer.dist_attn_weight, labels, self._loss_chunk,
                                                IGNORE_INDEX, partial(vocab_parallel_chunk_ce,
                                                                      tp_group=self.groups.tp_group))
        else:
            with torch.no_grad():
                pred = _vocab_parallel_argmax(logits, self.groups.tp_group)
                correct = ((pred == labels) & mask).sum()
            # megatron's vocab-parallel CE: log-sum-exp over the T vocabulary slices, fp32
            per_token = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.clamp(min=0))  # [b, s]
            loss_sum = (per_token * mask).sum()
        n = mask.sum().to(torch.int)
        if self.groups.tp_rank == 0:  # every TP rank computed the same numbers: count them once
            self._stats += torch.stack([loss_sum.detach().double(), n.double(), correct.double(),
                                        mask.sum().double()])
        return loss_sum, n, {"loss_sum": loss_sum.detach()}

    def _forward_step(self, data_iterator, model):
        ids, labels, pos, cu = unpack(next(data_iterator))
        packed = None if cu is None else PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
        # first stage embeds ids; later stages read the received activations (every stage has cu_seqlens)
        out = model(ids, pos, None, packed_seq_params=packed)
        return out, partial(self._loss, labels)

    def eval_step(self, micro_batches: list) -> EvalStats:
        """Forward only over ``micro_batches`` (any number; pipelines run megatron's forward-only
        schedule), no gradient; loss statistics reduced over the job as in :meth:`train_step`."""
        if not micro_batches:
            fail("MegatronEngine.eval_step", "at least one micro-batch", 0, "set trainer.eval_batches >= 1")
        device = next(self.model[0].parameters()).device
        self._stats = torch.zeros(4, dtype=torch.float64, device=device)
        for m in self.model:
            m.eval()
        try:
            with megatron_device_shim(), torch.no_grad():
                iters = [iter(micro_batches) for _ in self.model]
                get_forward_backward_func()(
                    forward_step_func=self._forward_step, data_iterator=iters if len(iters) > 1 else iters[0],
                    model=self.model if len(self.model) > 1 else self.model[0], num_microbatches=len(micro_batches),
                    seq_length=self.seq_len, micro_batch_size=self.micro_batch, forward_only=True)
        finally:
            for m in self.model:
                m.train()
        stats = self._stats
        dist.all_reduce(stats)  # only the last stage's TP rank 0 contributed
        loss_sum, n_tok, correct, total = stats.tolist()
        return EvalStats(loss=loss_sum / max(n_tok, 1.0), n_tokens=int(n_tok), recall_correct=int(correct),
                         recall_total=int(total))

    def train_step(self, micro_batches: list) -> StepStats:
        par = self.plan
        if not micro_batches:
            fail("MegatronEngine.train_step", "at least one micro-batch", 0, "pass trainer.grad_accum >= 1 batches")
        n_micro = len(micro_batches)
        if par.virtual > 1 and n_micro < par.pp:
            fail("MegatronEngine.train_step", f"at least pp={par.pp} micro-batches with virtual stages (megatron's "
                 "interleaved schedule groups pp micro-batches per virtual stage)", n_micro,
                 "raise trainer.grad_accum to pp or more")
        ids0 = micro_batches[0][0]
        if ids0.shape[0] != self.micro_batch or ids0.shape[1] * par.cp != self.seq_len:
            fail("MegatronEngine.train_step", f"micro-batches of [micro_batch={self.micro_batch}, "
                 f"seq_len/cp={self.seq_len // par.cp}] tokens", tuple(ids0.shape),
                 "shard each batch with dist_attn.data.sharding.shard_batch over the CP group")
        device = next(self.model[0].parameters()).device
        self._stats = torch.zeros(4, dtype=torch.float64, device=device)
        with megatron_device_shim():
            for m in self.model:
                m.zero_grad_buffer()
            self.optimizer.zero_grad()
            iters = [iter(micro_batches) for _ in self.model]  # each virtual stage walks the same batches
            for layer in self._out_layers:
                layer.dist_attn_hidden = True  # chunked loss in training (evaluation: plain logits)
            try:
                get_forward_backward_func()(
                    forward_step_func=self._forward_step, data_iterator=iters if len(iters) > 1 else iters[0],
                    model=self.model if len(self.model) > 1 else self.model[0], num_microbatches=n_micro,
                    seq_length=self.seq_len, micro_batch_size=self.micro_batch, forward_only=False)
            finally:
                for layer in self._out_layers:
                    layer.dist_attn_hidden = False
            stats = self._stats
            dist.all_reduce(stats)  # only the last stage's TP rank 0 contributed
            finite = bool(torch.isfinite(stats).all())
            applied = False
            lr = self.lr
            if finite:
                applied, grad_norm, _ = self.optimizer.step()
                self.last_grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
                if applied:
                    self.scheduler.step(increment=1)
        loss_sum, n_tok, correct, total = stats.tolist()
        return StepStats(loss=loss_sum / max(n_tok, 1.0), n_tokens=int(n_tok), recall_correct=int(correct),
                         recall_total=int(total), grad_norm=self.last_grad_norm, lr=lr, applied=bool(applied))

    # ------------------------------------------------------------------ checkpoints
    def _sharded_state_dict(self, is_loading: bool) -> dict:
        # non_homogeneous_layers: one key per layer (megatron otherwise stacks layer i's tensors into one
        # [num_layers, ...] tensor, impossible with linear and softmax layers of different shapes).
        # dp_reshardable: every rank writes its own optimizer shard, no gather (megatron's training
        # default; this method's own default, fully_sharded_model_space, is rejected by 0.16.1).
        meta = {"non_homogeneous_layers": True, "distrib_optim_sharding_type": "dp_reshardable"}
        sd = {}
        for i, chunk in enumerate(self.chunks):
            sd["model" if len(self.chunks) == 1 else f"model{i}"] = chunk.sharded_state_dict(metadata=dict(meta))
        sd["optimizer"] = self.optimizer.sharded_state_dict(sd, is_loading=is_loading, metadata=dict(meta))
        sd["scheduler"] = self.scheduler.state_dict()
        return sd

    def save(self, path: str, client_state: dict | None = None) -> str:
        """Collective: model, optimizer state (sharded as megatron's distributed optimizer keeps it),
        LR schedule and ``client_state`` into ``path/megatron``, with megatron's ``dist_checkpointing``.

        Atomic: written to ``path/.tmp-megatron`` and renamed by rank 0 after every rank finished, so
        ``path/megatron`` is either complete or absent. Returns the directory written."""
        final, tmp = os.path.join(path, CKPT_SUBDIR), os.path.join(path, f".tmp-{CKPT_SUBDIR}")
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        with megatron_device_shim():
            sd = self._sharded_state_dict(is_loading=False)
            sd["client_state"] = dict(client_state or {})
            dist_checkpointing.save(sd, tmp)
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
        dist.barrier()
        return final

    @staticmethod
    def _torch_adam() -> bool:
        """True when megatron wraps torch's Adam (no TransformerEngine / Apex), the case the two
        checkpoint fixes below are for; their fused optimizers keep ``step`` in the param groups."""
        from megatron.core.optimizer import distrib_optimizer
        return not distrib_optimizer.HAVE_APEX_OR_TE

    def _materialise_optimizer_state(self) -> None:
        """Give every parameter an Adam state (zeros, step 0) before a load: without TransformerEngine
        or Apex, megatron's distributed optimizer reads ``step`` from the torch optimizer's per-parameter
        state when it builds the state dict to load into, and a fresh optimizer has none. The values are
        all replaced by the checkpoint's."""
        if not self._torch_adam():
            return
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = opt.optimizer
            for group in inner.param_groups:
                for p in group["params"]:
                    if not inner.state[p]:
                        inner.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                          "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}

    def _restore_adam_steps(self) -> None:
        """Without TransformerEngine or Apex, megatron 0.16.1 persists Adam's step count only in the
        optimizer's param groups (``group["step"]``); the per-parameter ``state["step"]`` is a
        non-persistent object that loads as whatever this process held. Copy the saved count back,
        or the bias correction of the next update would use the wrong step."""
        if not self._torch_adam():
            return
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = opt.optimizer
            for group in inner.param_groups:
                if group.get("step") is None:
                    continue
                for p in group["params"]:
                    if "step" in inner.state[p]:
                        inner.state[p]["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)

    def load(self, path: str) -> dict:
        """Collective: restore what :meth:`save` wrote under ``path``; returns the client state."""
        ckpt = os.path.join(path, CKPT_SUBDIR)
        if not os.path.isdir(ckpt):
            fail("MegatronEngine.load", f"a megatron checkpoint directory {ckpt}", "nothing there",
                 "pass a directory written by MegatronEngine.save (checkpoints/step_N)")
        with megatron_device_shim(), torch.no_grad():  # megatron copies into views of the parameters
            self._materialise_optimizer_state()
            sd = dist_checkpointing.load(self._sharded_state_dict(is_loading=True), ckpt)
            for i, chunk in enumerate(self.chunks):
                missing, _ = chunk.load_state_dict(sd["model" if len(self.chunks) == 1 else f"model{i}"], strict=False)
                missing = [k for k in missing if not k.endswith("_extra_state")]
                assert not missing, f"checkpoint {ckpt} lacks {missing}"  # dist_checkpointing loads every key
            self.optimizer.load_state_dict(sd["optimizer"])
            self._restore_adam_steps()
            self.scheduler.load_state_dict(sd["scheduler"])
        return dict(sd.get("client_state", {}))


def _packed_to_cu_seqlens(module, args, kwargs):
    """Forward pre-hook of our mixers: megatron's ``packed_seq_params`` -> the mixer's ``cu_seqlens``."""
    packed = kwargs.get("packed_seq_params")
    if packed is not None and kwargs.get("cu_seqlens") is None:
        kwargs["cu_seqlens"] = packed.cu_seqlens_q
    return args, kwargs


def describe(groups: MegatronGroups) -> str:
    """One line for logs: sizes and this rank's coordinates."""
    p = groups.plan
    return (f"megatron tp={p.tp} pp={p.pp}{f' vpp={p.vpp}' if p.virtual > 1 else ''} cp={p.cp} dp={groups.dp} | "
            f"rank tp={groups.tp_rank} pp={groups.pp_rank} cp={groups.cp_rank} dp={groups.dp_rank} | "
            f"softmax={p.softmax_cp} linear={p.linear_cp} layout={p.layout}")


# ---------------------------------------------------------------------------- export

def export_state_dict(path: str, model_cfg: ModelConfig, layout: dict) -> dict:
    """The HybridLM state dict of a checkpoint :meth:`MegatronEngine.save` wrote under ``path``, whatever
    its TP/PP/VPP/CP/DP sizes: a world-of-one megatron model (tp = pp = cp = 1) requests every weight
    from ``dist_checkpointing``, which reassembles the TP shards and pipeline stages by their global
    keys; the weights then go through :func:`megatron_to_hybridlm_state_dict`. Needs a process group:
    initialises a gloo world of one when none exists (a CLI process)."""
    from dist_attn.parallel._megatron_weights import megatron_to_hybridlm_state_dict
    from dist_attn.plan import ParallelPlan
    ckpt = os.path.join(path, CKPT_SUBDIR)
    if not os.path.isdir(ckpt):
        fail(f"export {path}", f"a megatron checkpoint directory {ckpt}", "nothing there",
             "pass a checkpoint written by backend=megatron (checkpoints/step_N)")
    if dist.is_initialized() and dist.get_world_size() != 1:
        fail("megatron export", "a world of one process (the export reassembles every shard itself)",
             dist.get_world_size(), "run python -m launchers.export in a single process")
    plan = ParallelPlan.build(1, softmax_cp="zigzag_ring", linear_cp="lasp2")
    groups = init_megatron(plan, model_cfg, seed=0)
    (chunk,) = build_megatron_model(model_cfg, groups, precision=layout.get("precision", "fp32"))
    meta = {"non_homogeneous_layers": True, "distrib_optim_sharding_type": "dp_reshardable"}
    with megatron_device_shim(), torch.no_grad():
        sd = dist_checkpointing.load({"model": chunk.sharded_state_dict(metadata=meta)}, ckpt)
        chunk.load_state_dict(sd["model"], strict=False)
    own = {k: v.detach().cpu() for k, v in chunk.state_dict().items() if not k.endswith("_extra_state")}
    return megatron_to_hybridlm_state_dict(own, model_cfg)
