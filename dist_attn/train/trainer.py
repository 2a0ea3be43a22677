"""The training loop: validate, build the engine, step, log, checkpoint, resume.

    summary = Trainer(cfg, run_dir).run()      # cfg: dist_attn.train.config.TrainConfig

The trainer knows engines only through the contract of :mod:`dist_attn.train.engine` (the class
comes from :func:`dist_attn.engines.engine_class`, by ``backend.name``): no engine-specific branch.
Per step t (0-based; ``step`` in logs and checkpoints counts completed steps):

1. this rank's micro-batches of global batch t: rows of the batch are split over DP replicas and
   micro-steps, each sequence over the CP ranks (``shard_batch``, the plan's layout);
2. ``engine.train_step`` minimises the global per-token mean loss of the batch (however the labels
   fall on ranks and micro-steps) and returns its StepStats, reduced over the job;
3. a non-finite loss stops the job naming the step and the last good checkpoint;
4. loss, recall accuracy, lr, grad norm, throughput, MFU, CP comm bytes and memory are logged
   every ``log_every`` steps; a checkpoint is committed every ``ckpt_every`` steps and at the end;
5. every ``eval_every`` steps (and at the last), ``val_loss`` and ``val_ppl`` = exp(val_loss) on the
   first ``eval_batches`` batches of the validation stream (``engine.eval_step``, no gradient), logged
   in the same row. The stream is fixed, so the numbers at a step do not depend on restarts.

Packed documents (``data.documents=true``): each micro-batch is one packed row with its global
``cu_seqlens`` (CPU), passed by the engines to ``HybridLM(ids, pos, cu_seqlens=cu)``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict
from datetime import timedelta

import torch
import torch.distributed as dist

from dist_attn.comm import CommRecorder
from dist_attn.engines import engine_class
from dist_attn.plan import ParallelPlan, RankCoords
from dist_attn.train.checkpoint import Checkpointer, find_resume
from dist_attn.train.config import TrainConfig, resolve_vocab, validate
from dist_attn.train.telemetry import Telemetry

log = logging.getLogger("dist_attn.train")

def set_collective_timeout(timeout_s: float) -> int:
    """Give every process group of this process the same timeout: the world group, the DP/CP/USP groups
    and the ones DeepSpeed made. ``new_group`` does not inherit ``init_process_group``'s timeout (torch
    gives sub-groups 30 min on gloo, 10 min on NCCL), so a rank that died or hangs would otherwise keep
    the others waiting that long inside a CP collective. Returns the number of groups set."""
    from torch.distributed import distributed_c10d as c10d
    timeout = timedelta(seconds=timeout_s)
    groups = list(c10d._world.pg_map)  # torch has no public list of groups
    for pg in groups:
        c10d._set_pg_timeout(timeout, pg)
    return len(groups)


class NonFiniteLossError(RuntimeError):
    """The loss became nan/inf; the message names the step and the checkpoint to resume from."""


class BatchSource:
    """This rank's micro-batches of global batch ``t``: ``[(input_ids, labels, position_ids)]``, or with
    packed documents (``data.documents=true``) ``[(input_ids, labels, position_ids, cu_seqlens)]``.

    The global batch holds ``micro_batch * grad_accum * dp`` sequences; micro-step m of replica d
    takes rows ``[(m*dp + d) * micro_batch, ...)``, so the global batch does not depend on how it is
    split over replicas and micro-steps (DP=2 sees the same data as DP=1 with twice the batch).

    Packed documents: a micro-batch's B rows arrive as ONE packed row ``[1, B·S]``
    (:class:`~dist_attn.data.packing.PackedBatch`): positions restart at each document, labels are -100
    at every document end, and ``cu_seqlens`` (global offsets over the packed row) stays on the CPU,
    identical on every CP rank -- the host-sync-free form the strategies plan with.

    ``validation=True``: the fixed validation stream (sequential windows of ``data.val_path`` or the
    held-out file; for MQAR a fixed seed), batch i = ``micro_batches(i)`` for i < ``eval_batches``.
    """
    VAL_SEED = 0x5EED  # MQAR's validation stream: fixed, whatever trainer.seed

    def __init__(self, cfg: TrainConfig, plan: ParallelPlan, coords: RankCoords, device: torch.device,
                 validation: bool = False):
        from dist_attn.data.sharding import shard_batch, shard_packed
        self.shard_batch, self.shard_packed = shard_batch, shard_packed
        self.cfg, self.plan, self.coords, self.device = cfg, plan, coords, device
        d, t = cfg.data, cfg.trainer
        self.is_mqar, self.documents = d.name == "mqar", bool(d.documents)
        if self.is_mqar:
            from dist_attn.data.mqar import MQARDataset
            self.data = MQARDataset(vocab_size=d.vocab_size, seq_len=d.seq_len, num_kv_pairs=d.num_kv_pairs,
                                    num_queries=d.num_queries, seed=self.VAL_SEED if validation else t.seed)
        elif validation:
            from dist_attn.data.packing import validation_dataset
            self.data = validation_dataset(d.path, d.seq_len, val_path=d.val_path, documents=self.documents,
                                           dtype=d.dtype)
        else:
            from dist_attn.data.packing import open_dataset
            self.data = open_dataset(d.path, d.seq_len, documents=self.documents, dtype=d.dtype, seed=t.seed)

    def micro_batches(self, step: int, count: int | None = None) -> list:
        """``count`` (default ``grad_accum``) micro-batches of global batch ``step``."""
        t, p, c = self.cfg.trainer, self.plan, self.coords
        count = t.grad_accum if count is None else count
        out = []
        for m in range(count):
            # rows [(m*dp + d) * B, (m*dp + d + 1) * B) of the step's global batch
            batch = self.data.get_batch(step, t.micro_batch, dp_rank=m * p.dp + c.dp, dp_size=count * p.dp)
            if self.documents:
                ids, labels, pos, cu = self.shard_packed(batch, c.cp, p.cp, p.layout)
                out.append((ids.to(self.device), labels.to(self.device), pos.to(self.device), cu))  # cu: CPU
            else:
                ids, labels, pos = self.shard_batch(*batch, c.cp, p.cp, p.layout)
                out.append((ids.to(self.device), labels.to(self.device), pos.to(self.device)))
        return out


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: str):
        self.cfg = cfg = resolve_vocab(cfg)  # model.vocab_size=auto -> the data's vocabulary
        if int(os.environ.get("RANK", "0")) != 0:  # one voice: other ranks report warnings and errors only
            logging.getLogger().setLevel(logging.WARNING)
        self.plan = self.dims = plan = validate(cfg)  # before any process group: fails on every rank alike
        self.dp = plan.dp
        engine_cls = engine_class(cfg.backend.name)
        self.timeout_s = float(cfg.trainer.timeout_s)
        engine_cls.init_distributed(self.timeout_s)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        box = [os.path.abspath(run_dir)]
        dist.broadcast_object_list(box, src=0)  # ranks may have resolved ${now:} a second apart
        self.run_dir = box[0]
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) \
            if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.engine = engine_cls.build(cfg, plan, self.device)  # groups, model, optimizer (collective)
        self.cp = self.engine.cp
        if self.rank == 0:
            log.info("%s", self.engine.describe())
        set_collective_timeout(self.timeout_s)  # our groups and the engine's exist now
        self.data = BatchSource(cfg, plan, self.engine.coords, self.device)
        self.val = BatchSource(cfg, plan, self.engine.coords, self.device, validation=True) \
            if cfg.trainer.eval_every else None
        layout = dict(backend=cfg.backend.name, dp=plan.dp, tp=plan.tp, cp=plan.cp, pp=plan.pp, vpp=plan.vpp,
                      zero_stage=cfg.backend.zero_stage, model=asdict(cfg.model))
        # what makes two runs "the same experiment" for trainer.resume=auto across run directories
        self.experiment = json.loads(json.dumps(dict(layout=layout, data=asdict(cfg.data), seed=cfg.trainer.seed)))
        self.ckpt = Checkpointer(self.run_dir, self.engine, layout, keep=cfg.trainer.keep_ckpts,
                                 experiment=self.experiment)
        self.telemetry = Telemetry(self.run_dir, self.device, tensorboard=cfg.trainer.tensorboard,
                                   peak_tflops=cfg.trainer.peak_tflops)
        self.flops_per_token = cfg.model.flops_per_token(cfg.data.seq_len)
        self.tokens_per_step = cfg.trainer.micro_batch * cfg.trainer.grad_accum * plan.dp * cfg.data.seq_len
        self.step = 0
        self.last_ckpt: str | None = None
        self._resumed = False

    # ------------------------------------------------------------------ one step
    def _fail_non_finite(self, applied: bool) -> None:
        step = self.step + 1
        if not applied:  # the update was not applied: the state in memory is the last good one
            self.last_ckpt = self.ckpt.save(self.step)
        where = f"resume with trainer.resume={self.last_ckpt}" if self.last_ckpt else "no checkpoint was written"
        raise NonFiniteLossError(
            f"trainer: the loss became nan/inf at step {step} "
            f"({'after' if applied else 'before'} its update was applied). Last good checkpoint: "
            f"{self.last_ckpt or 'none'} ({where}). Fix: lower trainer.lr or raise warmup_steps, keep "
            f"backend.grad_clip > 0, or use backend.precision=fp32 to rule out overflow.")

    def train_step(self) -> dict:
        batches = self.data.micro_batches(self.step)
        self.telemetry.step_begin()  # peak memory of this step (peak_mem_mb)
        with CommRecorder() as rec:
            st = self.engine.train_step(batches)
        self.telemetry.step_end()
        if not st.applied or not math.isfinite(st.loss):
            self._fail_non_finite(applied=st.applied)
        acc = st.recall_correct / st.recall_total if self.data.is_mqar and st.recall_total else None
        return dict(loss=st.loss, recall_acc=acc, comm_sent_bytes=rec.total_sent, comm_recv_bytes=rec.total_recv,
                    comm_by_kind=dict(rec.sent))

    def evaluate(self) -> dict:
        """Validation loss and perplexity over ``trainer.eval_batches`` fixed micro-batches (batch i
        of the validation stream, sharded like training), through the engine's ``eval_step`` (no
        gradient; the same numbers on every rank)."""
        batches = [self.val.micro_batches(i, count=1)[0] for i in range(self.cfg.trainer.eval_batches)]
        st = self.engine.eval_step(batches)
        return dict(val_loss=st.loss, val_ppl=math.exp(min(st.loss, 700.0)), val_tokens=st.n_tokens)

    # ------------------------------------------------------------------ the loop
    def resume(self) -> None:
        """Load the checkpoint named by ``trainer.resume`` (collective; once; run() calls it)."""
        if self._resumed:
            return
        self._resumed = True
        t = self.cfg.trainer
        box = [find_resume(t.resume, t.out_dir, self.run_dir, self.experiment) if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            self.step = self.ckpt.load(box[0])
            self.last_ckpt = box[0]
            self.telemetry.rewind(self.step)  # a failed attempt's rows past the checkpoint are redone
            if self.rank == 0:
                log.info("resumed from %s at step %d", box[0], self.step)

    def run(self) -> dict:
        t = self.cfg.trainer
        self.resume()
        bar = None
        if self.rank == 0 and t.progress:
            from tqdm import tqdm
            bar = tqdm(total=t.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        losses, window_t, window_n, record = [], 0.0, 0, {}
        try:
            while self.step < t.steps:
                t0 = time.perf_counter()
                out = self.train_step()
                dt = time.perf_counter() - t0
                self.step += 1
                window_t, window_n = window_t + dt, window_n + 1
                losses.append(out["loss"])
                if bar is not None:
                    acc = "" if out["recall_acc"] is None else f" acc={out['recall_acc']:.3f}"
                    bar.set_postfix_str(f"loss={out['loss']:.4f}{acc}", refresh=False)
                    bar.update(1)
                evals = {}
                if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.steps):
                    evals = self.evaluate()
                if self.step % t.log_every == 0 or self.step == t.steps or evals:
                    tps = self.tokens_per_step * window_n / window_t
                    record = self.telemetry.log(dict(
                        step=self.step, loss=out["loss"], recall_acc=out["recall_acc"], lr=self.engine.lr,
                        grad_norm=self.engine.grad_norm, tokens_per_s=tps, step_time_s=window_t / window_n,
                        mfu=self.telemetry.mfu(self.flops_per_token, tps),
                        comm_sent_bytes=out["comm_sent_bytes"], comm_recv_bytes=out["comm_recv_bytes"],
                        comm_by_kind=out["comm_by_kind"], **evals))
                    window_t, window_n = 0.0, 0
                if t.ckpt_every and (self.step % t.ckpt_every == 0 or self.step == t.steps):
                    self.last_ckpt = self.ckpt.save(self.step)
        finally:
            if bar is not None:
                bar.close()
            self.telemetry.close()
        return dict(run_dir=self.run_dir, steps=self.step, losses=losses, last=record,
                    metrics=self.telemetry.metrics_path, tensorboard=self.telemetry.tb_dir,
                    checkpoint=self.last_ckpt)
