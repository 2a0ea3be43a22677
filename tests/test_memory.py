"""Long-context memory features: activation recomputation, chunked loss, sequence parallelism, telemetry.

* ``trainer.recompute`` selective / full (with host offload) give the losses and gradients of ``none``
  (fp32), on one process and under CP=2 (ring + LASP-2, all-gather + Ulysses linear: the recomputed
  blocks replay their communication in backward), in the DeepSpeed engine (plain CP=2 and a 2-stage
  pipeline) and in the megatron engine (CP=2, TP=2 with sequence parallelism, PP=2).
* ``trainer.loss_chunk`` (a chunk that does not divide the tokens) equals the unchunked loss: values
  and every gradient against an fp64 full-logits cross entropy, and in both engines.
* ``parallel.sp=true`` (megatron, TP=2) gives the losses of ``sp=false``.
* Config errors (unknown mode, negative chunk, offload without full, sp without TP) raise before any
  process group exists; ``peak_mem_mb`` is logged.

Runtime: ~30 s on 2 cores (one gloo launch of 2 processes per engine, many cases inside each).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.dist import run_distributed
from tests.utils import assert_close

CFG = dict(vocab_size=64, d_model=64, n_layers=4, pattern="LLLF", n_heads=4, n_kv_heads=2, head_dim=32,
           linear_heads=2, max_seq_len=256)
MODES = [("selective", False), ("full", False), ("full", True)]  # (recompute, offload)


def _model(cp=None, dtype=torch.float32):
    from dist_attn.context import CPContext
    from dist_attn.model.config import ModelConfig
    from dist_attn.model.hybrid import HybridLM
    torch.manual_seed(0)
    return HybridLM(ModelConfig(**CFG), cp or CPContext()).to(dtype)


def _batch(s=52, b=2):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CFG["vocab_size"], (b, s), generator=g)
    labels = torch.randint(0, CFG["vocab_size"], (b, s), generator=g)
    labels[0, :9] = -100  # unlabelled prompt tokens
    return ids, labels, torch.arange(s)


def _loss_and_grads(model, ids, labels, pos, recompute="none", offload=False, chunk=0):
    from dist_attn.model.hybrid import HybridLM
    model.set_memory(recompute, offload)
    model.zero_grad(set_to_none=True)
    if chunk:
        loss, n, hits = model.loss_chunked(model(ids, pos, return_hidden=True), labels, chunk)
    else:
        loss, n = HybridLM.loss_sum(model(ids, pos), labels)
    loss.backward()
    return loss.detach(), {k: p.grad.detach().clone() for k, p in model.named_parameters()}


# ---------------------------------------------------------------------------- one process

@pytest.mark.parametrize("recompute,offload", MODES)
def test_recompute_matches_none(recompute, offload):
    model = _model()
    batch = _batch()
    ref_loss, ref_grads = _loss_and_grads(model, *batch)
    loss, grads = _loss_and_grads(model, *batch, recompute=recompute, offload=offload)
    assert_close("loss", ref_loss, loss)
    for k in ref_grads:
        assert_close(k, ref_grads[k], grads[k])


def test_loss_chunk_matches_fp64_full_logits():
    """Chunk 17 over 2 x 52 tokens (no divisor): loss, hits and every gradient vs fp64 full logits."""
    import torch.nn.functional as F
    model64, model = _model(dtype=torch.float64), _model()
    ids, labels, pos = _batch()
    logits = model64(ids, pos)
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
    ref.backward()
    mask = labels != -100
    ref_hits = ((logits.argmax(-1) == labels) & mask).sum()
    for recompute in ("none", "full"):
        model.set_memory(recompute)
        model.zero_grad(set_to_none=True)
        loss, n, hits = model.loss_chunked(model(ids, pos, return_hidden=True), labels, 17)
        loss.backward()
        assert n == mask.sum() and hits == ref_hits
        assert_close("loss", ref, loss)
        for (k, p), p64 in zip(model.named_parameters(), model64.parameters()):
            assert_close(k, p64.grad, p.grad)


def test_pipeline_layers_with_hidden_head_feed_the_chunked_loss():
    model = _model()
    ids, labels, pos = _batch()
    x = (ids, pos)
    for stage in model.pipeline_layers(return_hidden=True):
        x = stage(x)
    assert torch.equal(x, model(ids, pos, return_hidden=True))
    assert torch.equal(model.head.out(x), model(ids, pos))


def _train_cfg(**trainer):
    from dist_attn.model.config import ModelConfig
    from dist_attn.train.config import DataConfig, ParallelConfig, TrainConfig, TrainerConfig
    from dist_attn.train.config import BackendConfig
    par = trainer.pop("parallel", {})
    backend = trainer.pop("backend", {})
    return TrainConfig(model=ModelConfig(**CFG), parallel=ParallelConfig(**par), backend=BackendConfig(**backend),
                       data=DataConfig(seq_len=32), trainer=TrainerConfig(**trainer))


@pytest.mark.parametrize("trainer,needle", [
    (dict(recompute="some"), "trainer.recompute"),
    (dict(loss_chunk=-1), "trainer.loss_chunk"),
    (dict(offload=True, recompute="selective"), "trainer.offload"),
    (dict(parallel=dict(sp=True)), "parallel.sp"),
    # S/P = 34/2 = 17 tokens per CP rank cannot split over tp=2 (contiguous layout allows an odd S/P)
    (dict(parallel=dict(tp=2, cp=2, sp=True, layout="contiguous"), backend=dict(name="megatron")), "data.seq_len"),
    (dict(loss_chunk=8, backend=dict(zero_stage=3)), "trainer.loss_chunk"),
    (dict(offload=True, recompute="full", backend=dict(name="megatron")), "trainer.offload"),
])
def test_config_errors_before_any_process_group(trainer, needle):
    import torch.distributed as dist
    from dist_attn.train.config import validate
    cfg = _train_cfg(**trainer)
    world = cfg.parallel.tp * cfg.parallel.cp
    if needle == "data.seq_len":
        cfg.data.seq_len = 34
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        validate(cfg, world_size=world)
    assert not dist.is_initialized()


def test_sp_defaults_on_with_tp():
    from dist_attn.plan import ParallelPlan
    from dist_attn.train.config import ParallelConfig
    assert ParallelPlan.from_config(ParallelConfig(tp=2), 2).sp
    assert not ParallelPlan.from_config(ParallelConfig(tp=2, sp=False), 2).sp
    assert not ParallelPlan.from_config(ParallelConfig(), 1).sp


def test_telemetry_peak_mem(tmp_path):
    from dist_attn.train.telemetry import Telemetry
    tel = Telemetry(str(tmp_path), torch.device("cpu"), tensorboard=False)
    tel.step_begin()
    x = torch.ones(64 << 20, dtype=torch.uint8).add_(1)  # 64 MiB touched during the step
    del x
    peak = tel.step_end()
    row = tel.log(dict(step=1, loss=1.0))
    tel.close()
    assert row["peak_mem_mb"] == round(peak, 2) and peak > 64
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        assert json.loads(f.readline())["peak_mem_mb"] == row["peak_mem_mb"]


# ---------------------------------------------------------------------------- CP=2 and DeepSpeed

def _cp_model_cases(rank, world):
    """The plain model under CP=2 for two strategy pairs: every mode's loss and gradients (summed over
    the CP ranks) against the single-process model on the whole sequence."""
    import torch.distributed as dist
    from dist_attn.context import CPContext
    from dist_attn.data.sharding import shard_batch
    ids, labels, pos = _batch(s=48)
    full = _model()
    ref_loss, ref_grads = _loss_and_grads(full, ids, labels, pos)
    out = []
    for softmax, linear in (("zigzag_ring", "lasp2"), ("allgather", "ulysses")):
        cp = CPContext(group=dist.group.WORLD, layout="zigzag", softmax_strategy=softmax, linear_strategy=linear)
        model = _model(cp)
        i, lab, p = shard_batch(ids, labels, rank, world, "zigzag")
        for recompute, offload, chunk in [("none", False, 0), *[(r, o, 0) for r, o in MODES], ("full", False, 7)]:
            loss, grads = _loss_and_grads(model, i, lab, p, recompute, offload, chunk)
            dist.all_reduce(loss)
            for g in grads.values():
                dist.all_reduce(g)
            worst = max(((grads[k] - ref_grads[k]).abs().max() / ref_grads[k].abs().max().clamp(min=1e-6)).item()
                        for k in ref_grads)
            out.append((softmax, recompute, offload, chunk, abs(loss.item() - ref_loss.item()) / ref_loss.item(),
                        worst))
    return out


def _ds_cases(rank, world):
    """DeepSpeed engine, 2 steps each: CP=2 and a 2-stage pipeline, every mode vs none."""
    from dist_attn.engines import engine_class
    from dist_attn.train.config import validate
    from dist_attn.train.trainer import BatchSource
    engine_class("deepspeed").init_distributed(300.0)  # DeepSpeed's view of the harness's process group
    out = {}
    runs = [("cp2", dict(parallel=dict(cp=2)), m) for m in
            [dict(), dict(recompute="selective"), dict(recompute="full", loss_chunk=7)]]
    runs += [("pp2", dict(parallel=dict(pp=2)), m) for m in [dict(), dict(recompute="full", loss_chunk=5)]]
    for name, base, mem in runs:
        cfg = _train_cfg(steps=2, micro_batch=2, grad_accum=2, warmup_steps=0, **base, **mem)
        plan = validate(cfg, world_size=world)
        engine = engine_class("deepspeed").build(cfg, plan, torch.device("cpu"))
        data = BatchSource(cfg, plan, engine.coords, torch.device("cpu"))
        stats = [engine.train_step(data.micro_batches(t)) for t in range(2)]
        out.setdefault(name, []).append((mem, [(s.loss, s.grad_norm, s.recall_correct) for s in stats]))
    return out


def test_cp2_and_deepspeed_modes_match_none():
    model_cases, ds = run_distributed(_both, 2, timeout=300)[0]
    for softmax, recompute, offload, chunk, dloss, dgrad in model_cases:
        assert dloss < 1e-5 and dgrad < 1e-4, (softmax, recompute, offload, chunk, dloss, dgrad)
    for name, runs in ds.items():
        (_, ref), *others = runs
        for mem, got in others:
            for (l0, g0, c0), (l1, g1, c1) in zip(ref, got):
                assert abs(l1 - l0) <= 1e-5 * abs(l0) and abs(g1 - g0) <= 1e-4 * abs(g0) and c0 == c1, \
                    (name, mem, ref, got)


def _both(rank, world):
    return _cp_model_cases(rank, world), _ds_cases(rank, world)


# ---------------------------------------------------------------------------- megatron

# (group, plan sizes, memory settings); the first run of a group is its reference
MEGATRON_RUNS = [("cp2", dict(cp=2), m) for m in [dict(), dict(recompute="selective"),
                                                  dict(recompute="full", loss_chunk=7)]]
MEGATRON_RUNS += [("tp2", dict(tp=2), dict()), ("tp2", dict(tp=2, sp=True), dict()),
                  ("tp2", dict(tp=2, sp=True), dict(recompute="selective", loss_chunk=5)),
                  ("tp2", dict(tp=2), dict(recompute="full", loss_chunk=5))]
MEGATRON_RUNS += [("pp2", dict(pp=2), m) for m in [dict(), dict(recompute="full", loss_chunk=6)]]


def _megatron_cases(rank, world, runs=None):
    from dist_attn.data.mqar import MQARDataset
    from dist_attn.data.sharding import shard_batch
    from dist_attn.model.config import ModelConfig
    from dist_attn.parallel import megatron as M
    from dist_attn.plan import ParallelPlan
    cfg = ModelConfig(**{**CFG, "linear_heads": 4})
    data = MQARDataset(vocab_size=CFG["vocab_size"], seq_len=32, num_kv_pairs=4)
    out = {}
    runs = MEGATRON_RUNS if runs is None else runs
    for name, plan_kw, mem in runs:
        plan = ParallelPlan.build(world, **plan_kw)
        groups = M.init_megatron(plan, cfg, seed=0)
        engine = M.MegatronEngine(cfg, groups, M.MegatronTrainSettings(lr=1e-3, warmup_steps=0, steps=4, **mem),
                                  seq_len=32, micro_batch=2, seed=0)
        steps = []
        for t in range(2):
            mbs = []
            for m in range(2):
                ids, labels = data.get_batch(t, 2, dp_rank=m, dp_size=2)
                mbs.append(shard_batch(ids, labels, groups.cp_rank, plan.cp, plan.layout))
            s = engine.train_step(mbs)
            steps.append((s.loss, s.grad_norm, s.recall_correct))
        out.setdefault(name, []).append(((plan_kw, mem), steps))
    return out


def test_megatron_modes_and_sequence_parallel_match_none():
    out = run_distributed(_megatron_cases, 2, timeout=300)[0]
    for name, runs in out.items():
        (_, ref), *others = runs
        for what, got in others:
            for (l0, g0, c0), (l1, g1, c1) in zip(ref, got):
                assert abs(l1 - l0) <= 1e-5 * abs(l0) and abs(g1 - g0) <= 1e-4 * abs(g0) and c0 == c1, \
                    (name, what, ref, got)
