"""The training loop: validate, build groups / model / engine, step, log, checkpoint, resume.

    summary = Trainer(cfg, run_dir).run()      # cfg: dist_attn.train.config.TrainConfig

Per step t (0-based; ``step`` in logs and checkpoints counts completed steps):

1. this rank's micro-batches of global batch t: rows of the batch are split over DP replicas and
   micro-steps, each sequence over the CP ranks (``shard_batch``, the model's layout);
2. N = labelled tokens of the whole global batch (one all-reduce), so that each rank's loss
   ``grad_divisor * grad_accum * loss_sum / N`` makes the reduced gradient that of the global
   per-token mean, however the labels fall on ranks and micro-steps;
3. forward, a collective finiteness check (pipelines: after the step), backward, optimizer step;
4. loss, recall accuracy, lr, grad norm, throughput, MFU, CP comm bytes and memory are logged
   every ``log_every`` steps; a checkpoint is committed every ``ckpt_every`` steps and at the end.
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
from dist_attn.context import CPContext
from dist_attn.data.mqar import recall_accuracy
from dist_attn.model.hybrid import HybridLM
from dist_attn.train.checkpoint import Checkpointer, find_resume
from dist_attn.train.config import TrainConfig, validate
from dist_attn.train.groups import ParallelDims, build_groups
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


def load_backend(name: str):
    """Import the engine adapter named by ``backend.name`` (validated beforehand)."""
    if name == "deepspeed":
        from dist_attn.parallel import deepspeed as backend
        return backend
    if name == "megatron":
        from dist_attn.parallel import megatron as backend
        return backend
    raise AssertionError(f"unvalidated backend {name!r}")


class BatchSource:
    """This rank's micro-batches of global batch ``t``: ``[(input_ids, labels, position_ids)]``.

    The global batch holds ``micro_batch * grad_accum * dp`` sequences; micro-step m of replica d
    takes rows ``[(m*dp + d) * micro_batch, ...)``, so the global batch does not depend on how it is
    split over replicas and micro-steps (DP=2 sees the same data as DP=1 with twice the batch).
    """

    def __init__(self, cfg: TrainConfig, groups, device: torch.device):
        from dist_attn.data.sharding import shard_batch
        self.shard_batch, self.cfg, self.g, self.device = shard_batch, cfg, groups, device
        d, t = cfg.data, cfg.trainer
        if d.name == "mqar":
            from dist_attn.data.mqar import MQARDataset
            self.data = MQARDataset(vocab_size=d.vocab_size, seq_len=d.seq_len, num_kv_pairs=d.num_kv_pairs,
                                    num_queries=d.num_queries, seed=t.seed)
        else:
            from dist_attn.data.memmap import TokenDataset
            self.data = TokenDataset(d.path, d.seq_len, d.dtype, seed=t.seed)
        self.is_mqar = d.name == "mqar"

    def micro_batches(self, step: int) -> list:
        t, g = self.cfg.trainer, self.g
        out = []
        for m in range(t.grad_accum):
            # rows [(m*dp + d) * B, (m*dp + d + 1) * B) of the step's global batch
            ids, labels = self.data.get_batch(step, t.micro_batch, dp_rank=m * g.dims.dp + g.dp_rank,
                                              dp_size=t.grad_accum * g.dims.dp)
            ids, labels, pos = self.shard_batch(ids, labels, g.cp_rank, g.dims.cp, self.cfg.parallel.layout)
            out.append((ids.to(self.device), labels.to(self.device), pos.to(self.device)))
        return out


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: str):
        self.cfg = cfg
        if int(os.environ.get("RANK", "0")) != 0:  # one voice: other ranks report warnings and errors only
            logging.getLogger().setLevel(logging.WARNING)
        self.dp = validate(cfg)  # before any process group: a bad config fails on every rank alike
        self.backend_mod = load_backend(cfg.backend.name)
        self.timeout_s = float(cfg.trainer.timeout_s)
        self.backend_mod.init_distributed(timeout_s=self.timeout_s)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        box = [os.path.abspath(run_dir)]
        dist.broadcast_object_list(box, src=0)  # ranks may have resolved ${now:} a second apart
        self.run_dir = box[0]
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) \
            if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        p = cfg.parallel
        self.megatron = cfg.backend.name == "megatron"
        if self.megatron:  # megatron builds its TP/PP/CP/DP groups and the model (GPTModel) itself
            mb = self.backend_mod
            g = self.groups = mb.init_megatron(mb.MegatronParallel.from_train_config(cfg), cfg.model,
                                               seed=cfg.trainer.seed, timeout_s=self.timeout_s)
            self.dims, self.cp = g.dims, g.cp
            self.backend = mb.MegatronBackend.from_train_config(cfg, g)
            if self.rank == 0:
                log.info("%s", mb.describe(g))
        else:
            self.dims = ParallelDims(self.dp, p.cp, p.pp)
            g = self.groups = build_groups(self.dims, p.ulysses_degree if p.softmax_cp == "usp" else 0)
            self.cp = CPContext(group=g.cp_group, layout=p.layout, softmax_strategy=p.softmax_cp,
                                linear_strategy=p.linear_cp, ulysses_group=g.ulysses_group,
                                ring_group=g.ring_group, backend=p.kernel_backend)
            torch.manual_seed(cfg.trainer.seed)  # the same initial weights on every rank
            self.backend = self.backend_mod.DeepSpeedBackend(HybridLM(cfg.model, self.cp).to(self.device), cfg, g)
        set_collective_timeout(self.timeout_s)  # our groups and the engine's exist now
        self.data = BatchSource(cfg, g, self.device)
        layout = dict(backend=cfg.backend.name, dp=self.dims.dp, tp=p.tp, cp=p.cp, pp=p.pp, vpp=p.vpp,
                      zero_stage=cfg.backend.zero_stage, model=asdict(cfg.model))
        # what makes two runs "the same experiment" for trainer.resume=auto across run directories
        self.experiment = json.loads(json.dumps(dict(layout=layout, data=asdict(cfg.data), seed=cfg.trainer.seed)))
        self.ckpt = Checkpointer(self.run_dir, self.backend, layout, keep=cfg.trainer.keep_ckpts,
                                 experiment=self.experiment)
        self.telemetry = Telemetry(self.run_dir, self.device, tensorboard=cfg.trainer.tensorboard,
                                   peak_tflops=cfg.trainer.peak_tflops)
        self.flops_per_token = cfg.model.flops_per_token(cfg.data.seq_len)
        self.tokens_per_step = cfg.trainer.micro_batch * cfg.trainer.grad_accum * self.dp * cfg.data.seq_len
        self.step = 0
        self.last_ckpt: str | None = None
        self._resumed = False

    # ------------------------------------------------------------------ one step
    def _loss_fn(self, scale: float, stats: torch.Tensor):
        def loss_fn(logits, labels):
            loss_sum, n_tok = HybridLM.loss_sum(logits, labels)
            with torch.no_grad():
                stats[0] += loss_sum.detach().float()
                stats[1] += n_tok
                if self.data.is_mqar:
                    correct, total = recall_accuracy(logits, labels)
                    stats[2] += correct
                    stats[3] += total
            return loss_sum * scale
        return loss_fn

    def _check_finite(self, loss: torch.Tensor) -> None:
        bad = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0], device=self.device)
        dist.all_reduce(bad)
        if bad.item() > 0:
            self._fail_non_finite(applied=False)

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

    def _megatron_step(self, batches: list) -> dict:
        """megatron computes the per-token loss itself (logits are split over the vocabulary under TP) and
        returns stats already reduced over the job; a non-finite loss skips the update (applied=False)."""
        with CommRecorder() as rec:
            out = self.backend.train_step(batches)
        if not out["applied"] or not math.isfinite(out["loss"]):
            self._fail_non_finite(applied=bool(out["applied"]))
        total = out["recall_total"]
        return dict(loss=out["loss"], recall_acc=out["recall_correct"] / total if self.data.is_mqar and total else None,
                    comm_sent_bytes=rec.total_sent, comm_recv_bytes=rec.total_recv, comm_by_kind=dict(rec.sent))

    def train_step(self) -> dict:
        batches = self.data.micro_batches(self.step)
        if self.megatron:
            return self._megatron_step(batches)
        n_local = sum(int((lab != -100).sum()) for _, lab, _ in batches)
        n_global = torch.tensor([float(n_local)], device=self.device)
        dist.all_reduce(n_global)  # every pipeline stage counted the same data: divide by pp
        n_tokens = max(n_global.item() / self.dims.pp, 1.0)
        scale = self.backend.grad_divisor * self.cfg.trainer.grad_accum / n_tokens
        stats = torch.zeros(4, dtype=torch.float64, device=self.device)
        with CommRecorder() as rec:
            self.backend.train_step(batches, self._loss_fn(scale, stats), before_backward=self._check_finite)
        dist.all_reduce(stats)  # pipelines: only the last stage has non-zero stats
        loss = stats[0].item() / max(stats[1].item(), 1.0)
        if not math.isfinite(loss):
            self._fail_non_finite(applied=True)
        return dict(loss=loss, recall_acc=stats[2].item() / stats[3].item() if stats[3] > 0 else None,
                     comm_sent_bytes=rec.total_sent, comm_recv_bytes=rec.total_recv,
                     comm_by_kind=dict(rec.sent))

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
                if self.step % t.log_every == 0 or self.step == t.steps:
                    tps = self.tokens_per_step * window_n / window_t
                    record = self.telemetry.log(dict(
                        step=self.step, loss=out["loss"], recall_acc=out["recall_acc"], lr=self.backend.lr,
                        grad_norm=self.backend.grad_norm, tokens_per_s=tps, step_time_s=window_t / window_n,
                        mfu=self.telemetry.mfu(self.flops_per_token, tps),
                        comm_sent_bytes=out["comm_sent_bytes"], comm_recv_bytes=out["comm_recv_bytes"],
                        comm_by_kind=out["comm_by_kind"]))
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
