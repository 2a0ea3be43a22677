"""The one DeepSpeed adapter: :class:`DeepSpeedEngine` implements :class:`dist_attn.train.engine.Engine`.

Nothing else in the project imports ``deepspeed`` (imported on first use, so checking a config's
options does not load it); only :mod:`dist_attn.engines` names this module.

How DP x CP reaches DeepSpeed. Every rank of a pipeline stage holds a full parameter replica, so
the group DeepSpeed must reduce gradients over (and ZeRO partition over) is DP x CP:

* no pipeline: the CP group is handed over as DeepSpeed's *sequence-parallel* group through an
  ``mpu`` (:class:`_SequenceParallelMpu`). ZeRO 0-2 then all-reduce over DP x CP and divide by DP:
  the CP ranks' partial gradients are summed, the replicas averaged. ZeRO-3 needs two fixes, as
  DeepSpeed 0.19.8 converts an existing module over ``mpu.get_data_parallel_group()`` (DP only:
  CP ranks would neither partition nor reduce) and its reduce-scatter divides by the whole group:
  we convert the module over DP x CP ourselves (``zero.Init(module=...)``) and expect DP x CP.
* pipeline: the ``PipelineModule`` topology is ``pipe x data`` with ``data = DP x CP``; DeepSpeed
  divides by DP x CP.

:attr:`DeepSpeedEngine.grad_divisor` is that divisor. :meth:`DeepSpeedEngine.train_step` scales each
rank's summed loss by ``grad_divisor * grad_accum / N`` (N = labelled tokens of the global batch, one
all-reduce), so the reduced gradient is that of the global per-token mean, however the labels fall
on ranks and micro-steps (the engine contract).

CPU. DeepSpeed 0.19.8 picks its CPU accelerator when no GPU is visible (``DS_ACCELERATOR=cpu`` is
set here to skip the probing) and uses gloo unless oneCCL bindings are installed; ZeRO 0-3, bf16
and pipelines run on CPU with a torch ``AdamW`` passed as client optimizer
(``zero_allow_untested_optimizer``). The JIT-compiled shared-memory op is switched off (below).

Gradient norm. For ZeRO 0 in fp32 DeepSpeed clips with its own ``clip_grad_norm_``, which drops
the norm and, under a pipeline, counts only the first stage's parameters. There we disable its
clipping and clip in a pre-step hook of the optimizer with torch's ``get_total_norm`` (summed over
the stages) and ``clip_grads_with_norm_``, recording the norm where the engine reads it.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import torch
import torch.distributed as dist

from dist_attn.checks import fail
from dist_attn.context import CPContext
from dist_attn.data.mqar import recall_accuracy
from dist_attn.model.hybrid import HybridLM
from dist_attn.train.engine import IGNORE_INDEX, EvalStats, StepStats, ensure_launcher_env, lr_at, unpack
from dist_attn.train.groups import build_groups

_DS = None


def _deepspeed():
    """Import DeepSpeed once, quietly, on its CPU accelerator when there is no GPU."""
    global _DS
    if _DS is None:
        # DeepSpeed probes the C compiler (libaio etc.) at import through setuptools' distutils loggers,
        # which Hydra's INFO root logger would print: not our user's concern.
        logging.getLogger("compilers").setLevel(logging.WARNING)
        if "DS_ACCELERATOR" not in os.environ:
            os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
        import deepspeed
        deepspeed.utils.logger.setLevel(logging.ERROR)
        # DeepSpeed JIT-compiles a shared-memory all-reduce op (C++, needs a compiler) when it wraps a CPU
        # process group; only its *inference* all-reduce uses it, so training never needs it: mark it
        # unavailable and DeepSpeed uses the plain torch.distributed collectives.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        _DS = deepspeed
    return _DS


CKPT_TAG = "ds"


def init_distributed(timeout_s: float = 600.0) -> None:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU). A plain
    ``python -m launchers.train`` gets a world of one on a free local port."""
    deepspeed = _deepspeed()
    if dist.is_available() and dist.is_initialized():  # e.g. the test harness made the group
        # DeepSpeed insists on the launcher's env; a group made without a launcher is one node
        for key, value in (("RANK", dist.get_rank()), ("WORLD_SIZE", dist.get_world_size()),
                           ("LOCAL_RANK", dist.get_rank())):
            os.environ.setdefault(key, str(value))
        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
        return
    ensure_launcher_env()
    from datetime import timedelta
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=timedelta(seconds=timeout_s))


class _SequenceParallelMpu:
    """DeepSpeed's ``mpu`` protocol: data = DP, sequence = CP, sequence-data = DP x CP, no tensor
    parallelism (a group of this rank alone, so DeepSpeed's norm all-reduces are no-ops)."""

    def __init__(self, groups, self_group):
        self.g, self.self_group = groups, self_group

    def get_data_parallel_group(self):
        return self.g.dp_group

    def get_data_parallel_rank(self):
        return self.g.coords.dp

    def get_data_parallel_world_size(self):
        return self.g.plan.dp

    def get_sequence_parallel_group(self):
        return self.g.cp_group if self.g.cp_group is not None else self.self_group

    def get_sequence_parallel_rank(self):
        return self.g.coords.cp

    def get_sequence_parallel_world_size(self):
        return self.g.plan.cp

    def get_sequence_data_parallel_group(self):
        return self.g.replica_group

    def get_sequence_data_parallel_rank(self):
        return dist.get_rank(self.g.replica_group)

    def get_sequence_data_parallel_world_size(self):
        return self.g.plan.dp * self.g.plan.cp

    def get_model_parallel_group(self):
        return self.self_group

    def get_model_parallel_rank(self):
        return 0

    def get_model_parallel_world_size(self):
        return 1


def _self_group():
    """A process group holding only this rank (collective: every rank creates every one)."""
    mine = None
    for r in range(dist.get_world_size()):
        g = dist.new_group([r])
        if r == dist.get_rank():
            mine = g
    return mine


def ds_config(cfg, plain_fp32_zero0: bool) -> dict:
    """The DeepSpeed JSON config of a :class:`~dist_attn.train.config.TrainConfig`."""
    t, b = cfg.trainer, cfg.backend
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": 0.0 if plain_fp32_zero0 else b.grad_clip,
        "zero_optimization": {"stage": b.zero_stage},
        "bf16": {"enabled": b.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """A DeepSpeed engine (plain or pipelined) behind the engine contract (:mod:`dist_attn.train.engine`).

    ``model`` is a :class:`~dist_attn.model.hybrid.HybridLM` built with this rank's CP context;
    ``groups`` the :class:`~dist_attn.train.groups.TrainGroups` of the job's plan. :meth:`build` makes
    both from a config and a plan.
    """
    name = "deepspeed"

    # ------------------------------------------------------------------ the contract's class methods
    @classmethod
    def check_options(cls, cfg, plan) -> None:
        """DeepSpeed's own rules (local; before any process group)."""
        m, b = cfg.model, cfg.backend
        if plan.tp > 1:
            fail("parallel.tp", "1 with backend=deepspeed (tensor parallelism is the megatron backend's)", plan.tp,
                 "use backend=megatron for tensor parallelism, or parallel.tp=1")
        if getattr(cfg.trainer, "loss_chunk", 0) and b.zero_stage == 3:
            fail("trainer.loss_chunk", "0 with backend.zero_stage=3 (the chunked loss reads the output weight "
                 "outside the head module's forward, where ZeRO-3 has not gathered it)", cfg.trainer.loss_chunk,
                 "use backend.zero_stage <= 2, or trainer.loss_chunk=0")
        if plan.vpp is not None:
            fail("parallel.vpp", "null with backend=deepspeed (interleaved 1F1B is the megatron backend's)",
                 plan.vpp, "set parallel.vpp=null, or use backend=megatron with pipeline stages")
        if plan.pp > 1:
            if b.zero_stage > 1:
                fail("backend.zero_stage", "0 or 1 with pipeline parallelism (DeepSpeed pipelines do not shard "
                     "gradients or parameters)", b.zero_stage, "use backend.zero_stage=1 or parallel.pp=1")
            stages = m.n_layers + 2  # embedding, blocks, head
            if plan.pp > stages:
                fail("parallel.pp", f"at most {stages} stages (embedding + {m.n_layers} blocks + head)", plan.pp,
                     "use fewer pipeline stages")
            if m.tie_embeddings:
                fail("model.tie_embeddings", "False with pipeline parallelism (embedding and head sit on "
                     "different stages)", True, "set model.tie_embeddings=false or parallel.pp=1")

    @classmethod
    def init_distributed(cls, timeout_s: float = 600.0) -> None:
        init_distributed(timeout_s)

    @classmethod
    def build(cls, cfg, plan, device) -> "DeepSpeedEngine":
        """Collective: the job's groups, ``HybridLM(cfg.model)`` under ``cfg.trainer.seed`` (the same
        initial weights on every rank) and the DeepSpeed engine around it."""
        g = build_groups(plan)
        cp = CPContext.from_plan(plan, g.cp_group, g.ulysses_group, g.ring_group)
        torch.manual_seed(cfg.trainer.seed)
        t = cfg.trainer  # activation recomputation per block (dist_attn.model.hybrid, "Memory")
        model = HybridLM(cfg.model, cp).set_memory(getattr(t, "recompute", "none"), getattr(t, "offload", False))
        return cls(model.to(device), cfg, g)

    # ------------------------------------------------------------------ construction
    def __init__(self, model, cfg, groups):
        deepspeed = _deepspeed()
        from deepspeed.pipe import PipelineModule
        from deepspeed.runtime.pipe.topology import PipeDataParallelTopology
        self.cfg, self.groups, self.plan, self.coords = cfg, groups, groups.plan, groups.coords
        self.cp = model.cp
        self.device = next(model.parameters()).device
        plan = self.plan
        self.pipeline = plan.pp > 1
        b = cfg.backend
        self._norm_hook = b.zero_stage == 0 and b.precision == "fp32"
        self._loss_fn: Callable | None = None
        t = cfg.trainer
        # trainer.loss_chunk: the last stage hands the normed hidden states to a chunked loss
        self._model, self._chunk = model, getattr(t, "loss_chunk", 0)
        if self.pipeline:
            topo = PipeDataParallelTopology(num_pp=plan.pp, num_dp=plan.dp * plan.cp)
            module = PipelineModule(layers=model.pipeline_layers(return_hidden=self._chunk > 0), topology=topo,
                                    loss_fn=self._pipe_loss, partition_method="parameters")
            mpu = None
            self.grad_divisor = plan.dp * plan.cp
        else:
            module, mpu = model, _SequenceParallelMpu(groups, _self_group())
            self.grad_divisor = plan.dp
        config = ds_config(cfg, self._norm_hook)
        if b.zero_stage == 3 and not self.pipeline:
            # DeepSpeed converts a module to ZeRO-3 parameters over mpu.get_data_parallel_group(),
            # i.e. DP without CP; convert it ourselves over DP x CP. Its ZeRO-3 reduce-scatter then
            # averages over all DP x CP ranks (it does not apply the sequence-parallel factor there).
            deepspeed.zero.Init(module=module, data_parallel_group=groups.replica_group,
                                config_dict_or_path=config, mpu=mpu)
            self.grad_divisor = plan.dp * plan.cp
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        # the schedule of dist_attn.train.engine.lr_at (shared with the megatron engine), as a client
        # scheduler: DeepSpeed steps it with the optimizer and keeps its state in checkpoints
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_at(t, step) / t.lr)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=opt, lr_scheduler=sched, config=config, mpu=mpu)
        if self._norm_hook:
            clip = b.grad_clip
            pipe_group = self.engine.grid.get_pipe_parallel_group() if self.pipeline else None

            def _clip_and_record(optimizer, *_):
                params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                # ||g||^2 of the whole model = sum over pipeline stages of this stage's ||g||^2;
                # gradients are already reduced over DP x CP, so no other group enters
                norm = torch.nn.utils.get_total_norm([p.grad for p in params])
                if pipe_group is not None:
                    sq = norm.pow(2)
                    dist.all_reduce(sq, group=pipe_group)
                    norm = sq.sqrt()
                if clip > 0:
                    torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
                optimizer._global_grad_norm = float(norm)  # where the engine reads the norm from
            opt.register_step_pre_hook(_clip_and_record)

    def describe(self) -> str:
        return f"deepspeed zero={self.cfg.backend.zero_stage} {self.plan.describe()}"

    # ------------------------------------------------------------------ stepping
    @property
    def is_last_stage(self) -> bool:
        return not self.pipeline or self.engine.is_last_stage()

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def _pipe_loss(self, logits, labels):
        return self._loss_fn(logits, labels)

    def _loss_fn_for(self, scale: float, stats: torch.Tensor) -> Callable:
        """``loss_fn(logits, labels)``: this shard's summed CE times ``scale``; accumulates
        (loss_sum, n_tokens, recall hits, recall total) into ``stats``."""
        def loss_fn(logits, labels):  # logits: the normed hidden states under trainer.loss_chunk
            if self._chunk:
                loss_sum, n_tok, correct = self._model.loss_chunked(logits, labels, self._chunk)
                total = n_tok
            else:
                loss_sum, n_tok = HybridLM.loss_sum(logits, labels)
                with torch.no_grad():
                    correct, total = recall_accuracy(logits, labels)
            with torch.no_grad():
                stats.add_(torch.stack([loss_sum.detach().double(), n_tok.double(), correct.double(),
                                        total.double()]))
            return loss_sum * scale
        return loss_fn

    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        """Collective: is the loss finite on every rank (checked before each backward)?"""
        bad = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0], device=self.device)
        dist.all_reduce(bad)
        return bad.item() == 0

    def _pipe_batches(self, batches: list):
        """The pipeline's data: ``((input_ids, position_ids[, cu_seqlens]), labels)`` per micro-batch.
        Packed documents: ``cu_seqlens`` travels through every stage inside the activation tuple, which
        DeepSpeed sends with the shapes of the first micro-batch it ever saw, so it is padded to the
        fixed length N + 1 (N = packed row length) with N: empty trailing documents, which the
        strategies accept (``dist_attn.documents``)."""
        out = []
        for mb in batches:
            ids, labels, pos, cu = unpack(mb)
            if cu is None:
                out.append(((ids, pos), labels))
                continue
            n = ids.shape[1] * self.plan.cp
            padded = torch.full((n + 1,), n, dtype=torch.int32)
            padded[:cu.numel()] = cu
            out.append(((ids, pos, padded), labels))
        return out

    def _forward(self, mb) -> tuple:
        """``(logits, labels)`` of one micro-batch on the plain (non-pipelined) engine."""
        ids, labels, pos, cu = unpack(mb)
        docs = {} if cu is None else {"cu_seqlens": cu}
        if self._chunk:
            docs["return_hidden"] = True
        return self.engine(ids, pos, **docs), labels

    @torch.no_grad()
    def eval_step(self, batches: list) -> EvalStats:
        """Forward only (no gradient, no update) over ``batches``; pipelines run DeepSpeed's inference
        schedule (``eval_batch``). Loss statistics reduced over the job, as in :meth:`train_step`."""
        stats = torch.zeros(4, dtype=torch.float64, device=self.device)
        self._loss_fn = loss_fn = self._loss_fn_for(1.0, stats)
        if self.pipeline:
            self.engine.eval_batch(data_iter=iter(self._pipe_batches(batches)), num_micro_batches=len(batches))
            self.engine.module.train()  # eval_batch leaves the module in eval mode
        else:
            was_training = self.engine.module.training
            self.engine.module.eval()
            try:
                for mb in batches:
                    loss_fn(*self._forward(mb))
            finally:
                self.engine.module.train(was_training)
        dist.all_reduce(stats)  # pipelines: only the last stage has non-zero stats
        loss_sum, n_tok, correct, total = stats.tolist()
        return EvalStats(loss=loss_sum / max(n_tok, 1.0), n_tokens=int(n_tok), recall_correct=int(correct),
                         recall_total=int(total))

    def train_step(self, batches: list) -> StepStats:
        """One optimizer step over this rank's ``batches`` (``grad_accum`` tuples ``(input_ids,
        labels, position_ids[, cu_seqlens])``); see the engine contract. Without pipelining a non-finite
        loss is caught (collectively) before its backward and the update is skipped (``applied=False``);
        a pipeline reports it after the step."""
        n_local = sum(int((mb[1] != IGNORE_INDEX).sum()) for mb in batches)
        n_global = torch.tensor([float(n_local)], device=self.device)
        dist.all_reduce(n_global)  # every pipeline stage counted the same data: divide by pp
        n_tokens = max(n_global.item() / self.plan.pp, 1.0)
        scale = self.grad_divisor * self.cfg.trainer.grad_accum / n_tokens
        stats = torch.zeros(4, dtype=torch.float64, device=self.device)
        self._loss_fn = loss_fn = self._loss_fn_for(scale, stats)
        lr = self.lr
        if self.pipeline:
            self.engine.train_batch(data_iter=iter(self._pipe_batches(batches)))
        else:
            for mb in batches:
                loss = loss_fn(*self._forward(mb))
                if not self._finite_everywhere(loss):
                    return StepStats(loss=float("nan"), n_tokens=int(n_tokens), recall_correct=0, recall_total=0,
                                     grad_norm=float("nan"), lr=lr, applied=False)
                self.engine.backward(loss)
                self.engine.step()
        dist.all_reduce(stats)  # pipelines: only the last stage has non-zero stats
        loss_sum, n_tok, correct, total = stats.tolist()
        return StepStats(loss=loss_sum / max(n_tok, 1.0), n_tokens=int(n_tok), recall_correct=int(correct),
                         recall_total=int(total), grad_norm=self.grad_norm, lr=lr, applied=True)

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    @property
    def grad_norm(self) -> float:
        """Global gradient norm of the last step before clipping (nan if the engine kept none)."""
        n = self.engine.get_global_grad_norm()
        return float("nan") if n is None else float(n)

    @property
    def global_steps(self) -> int:
        return int(self.engine.global_steps)

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str, client_state: dict) -> None:
        """Collective: model, optimizer (ZeRO partitions), LR schedule and ``client_state``."""
        self.engine.save_checkpoint(path, tag=CKPT_TAG, client_state=client_state, save_latest=False)

    def load(self, path: str) -> dict:
        """Collective: restore what :meth:`save` wrote; returns the client state."""
        load_path, client_state = self.engine.load_checkpoint(
            path, tag=CKPT_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            fail(f"checkpoint {path}", f"a DeepSpeed checkpoint under tag {CKPT_TAG!r}", "none",
                 "pass a directory written by this trainer (checkpoints/step_*)")
        return client_state or {}


# ---------------------------------------------------------------------------- export (no process group)

def export_state_dict(path: str, model_cfg, layout: dict) -> dict:
    """The HybridLM state dict of a checkpoint this engine saved in ``path`` (``checkpoints/step_N``), in
    one process, without a process group. ZeRO 1-3: the fp32 master weights, merged from every DP x CP
    rank's partition by DeepSpeed's ``zero_to_fp32``; ZeRO 0: the module's weights (the training dtype).
    Pipelines: one ``layer_XX-model_00-model_states.pt`` per stage layer, in the order of
    :meth:`HybridLM.pipeline_layers` (embedding, blocks, head)."""
    _deepspeed()
    import glob
    ckpt = os.path.join(path, CKPT_TAG)
    if not os.path.isdir(ckpt):
        fail(f"export {path}", f"a DeepSpeed checkpoint directory {ckpt}", "nothing there",
             "pass a checkpoint written by backend=deepspeed (checkpoints/step_N)")
    if layout.get("zero_stage", 0) >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        sd = get_fp32_state_dict_from_zero_checkpoint(path, tag=CKPT_TAG)
        if layout.get("pp", 1) > 1:  # a pipeline's names are per layer: "<layer index>.<name>"
            sd = _pipeline_names(sd, model_cfg)
        return sd
    if layout.get("pp", 1) > 1:
        sd = {}
        for f in sorted(glob.glob(os.path.join(ckpt, "layer_*-model_states.pt"))):
            idx = int(os.path.basename(f).split("-")[0].split("_")[1])
            sd.update({f"{idx}.{k}": v for k, v in torch.load(f, map_location="cpu", weights_only=False).items()})
        return _pipeline_names(sd, model_cfg)
    states = torch.load(os.path.join(ckpt, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    return dict(states["module"])


def _pipeline_names(sd: dict, model_cfg) -> dict:
    """``"<pipeline layer index>.<name>"`` -> HybridLM names: 0 is ``embed``, 1..n the blocks, n+1 ``head``."""
    n = model_cfg.n_layers
    out = {}
    for key, value in sd.items():
        idx, name = key.split(".", 1)
        idx = int(idx)
        prefix = "embed." if idx == 0 else "head." if idx == n + 1 else f"blocks.{idx - 1}."
        out[prefix + name] = value
    return out
