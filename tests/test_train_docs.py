"""Training on packed documents (``data.documents=true``) with evaluation, end to end on gloo CPU processes.

A small corpus (JSON Lines, long-tailed document lengths from a seed) goes through
``dist_attn.data.prepare`` (byte tokenizer, EOS after every document, 10 % held out), then the trainer
runs with ``model.vocab_size=auto`` and ``trainer.eval_every``:

* the model: a packed row of two documents gives the logits of each document run alone (RoPE positions
  restart, no attention or linear state across the boundary);
* CP=1 reference; a resume from its step-2 checkpoint reproduces its losses and its ``val_loss`` at
  step 4 exactly (the validation stream does not depend on restarts);
* CP=2 (zigzag ring + LASP-2), a DeepSpeed pipeline (pp=2: cu_seqlens carried through the stages),
  megatron CP=2, and CP=4 give the reference's per-step losses and validation losses (fp32, rtol 1e-4).
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from tests.dist import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
RTOL = 1e-4
WORDS = ("the model reads long documents and short notes; every token attends inside its own document "
         "while the ring passes keys and values between ranks").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A token file with 400 documents of 1..~300 bytes (lognormal lengths) and its held-out file."""
    from dist_attn.data.prepare import prepare
    d = tmp_path_factory.mktemp("docs")
    rng = np.random.default_rng(0)
    with open(d / "docs.jsonl", "w") as f:
        for _ in range(400):
            n = max(1, int(rng.lognormal(2.0, 1.0)))
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS, n))}) + "\n")
    out = str(d / "tokens.bin")
    prepare([str(d / "docs.jsonl")], out, val_fraction=0.1, seed=0)
    assert os.path.exists(out + ".val")
    return out


def _cfg(path, overrides, out_dir):
    from hydra import compose, initialize_config_dir
    from dist_attn.train.config import register_configs, to_train_config
    register_configs()
    common = [f"trainer.steps={STEPS}", "trainer.warmup_steps=1", "trainer.log_every=1", "trainer.ckpt_every=0",
              "trainer.micro_batch=4", "trainer.tensorboard=false", "trainer.progress=false", "data=memmap",
              f"data.path={path}", "data.documents=true", "data.seq_len=32", "model.vocab_size=auto",
              "trainer.eval_every=2", "trainer.eval_batches=2", f"trainer.out_dir={out_dir}"]
    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
        return to_train_config(compose("train", overrides=common + overrides))


def _rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _runs(rank, world, path, out_dir, runs):
    """Train each (name, overrides); return name -> {losses, val: {step: val_loss}}."""
    from dist_attn.train.trainer import Trainer
    out = {}
    for name, overrides in runs:
        summary = Trainer(_cfg(path, overrides, out_dir), os.path.join(out_dir, name)).run()
        rows = _rows(summary["run_dir"])
        val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
        if rank == 0:
            for r in rows:
                if "val_loss" in r:
                    assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-12)
                    assert r["val_tokens"] > 0
        out[name] = dict(losses=summary["losses"], val=val, steps=[r["step"] for r in rows])
    return out


def _reference(rank, world, path, out_dir):
    ref = _runs(rank, world, path, out_dir, [("ref", ["trainer.ckpt_every=2"])])
    ckpt = os.path.join(out_dir, "ref", "checkpoints", "step_00000002")
    ref.update(_runs(rank, world, path, out_dir, [("resumed", [f"trainer.resume={ckpt}"])]))
    return ref


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    return run_distributed(_reference, 1, corpus, str(tmp_path_factory.mktemp("ref")), timeout=300)[0]


def test_packed_row_equals_documents_alone():
    """HybridLM on one packed row [doc A | doc B] with cu_seqlens and restarting positions equals the
    model on each document alone: RoPE uses the given positions, nothing crosses the boundary."""
    from dist_attn.model.config import ModelConfig
    from dist_attn.model.hybrid import HybridLM
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(vocab_size=40, d_model=32, n_layers=4, n_heads=4, pattern="LLFF")).double()
    a, b = torch.randint(0, 40, (1, 13)), torch.randint(0, 40, (1, 22))
    pos = torch.cat([torch.arange(13), torch.arange(22)]).unsqueeze(0)
    cu = torch.tensor([0, 13, 35], dtype=torch.int32)
    packed = model(torch.cat([a, b], 1), pos, cu_seqlens=cu)
    alone = torch.cat([model(a, torch.arange(13)), model(b, torch.arange(22))], 1)
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-10)
    shifted = model(torch.cat([a, b], 1), torch.arange(35).unsqueeze(0), cu_seqlens=cu)
    torch.testing.assert_close(shifted, alone, rtol=1e-9, atol=1e-9)  # RoPE is relative: same inside docs


def test_eval_is_logged_and_deterministic_across_restarts(reference):
    ref, res = reference["ref"], reference["resumed"]
    assert sorted(ref["val"]) == [2, 4] and ref["steps"] == [1, 2, 3, 4]
    assert ref["losses"][0] > 4.0  # ~ln(257) at the start: a real vocabulary, not MQAR's 16
    assert res["losses"] == pytest.approx(ref["losses"][2:], rel=1e-6, abs=0)
    assert res["val"][4] == ref["val"][4]  # bit-identical: same weights, same fixed validation batches


# one 4-rank launch: every case sees the reference's global batches (4 rows per step; evaluation covers the
# same 8 validation windows: eval_batches x micro_batch x dp = 8)
RUNS = [
    ("cp4_ring_contiguous", ["parallel.cp=4", "parallel.layout=contiguous"]),
    ("dp2_cp2_ring_lasp2", ["parallel.cp=2", "trainer.micro_batch=2"]),
    ("pp2_cp2_pipeline", ["parallel=pipeline", "parallel.cp=2", "trainer.micro_batch=2", "trainer.grad_accum=2",
                          "trainer.eval_batches=4"]),
    ("megatron_dp2_cp2_allgather", ["backend=megatron", "parallel.cp=2", "parallel.softmax_cp=allgather",
                                    "trainer.micro_batch=2"]),
]


@pytest.fixture(scope="module")
def parallel(corpus, tmp_path_factory):
    return run_distributed(_runs, 4, corpus, str(tmp_path_factory.mktemp("four")), RUNS, timeout=420)[0]


@pytest.mark.parametrize("name", [n for n, _ in RUNS])
def test_parallel_documents_match_cp1(parallel, reference, name):
    got, want = parallel[name], reference["ref"]
    assert len(got["losses"]) == STEPS
    for i, (g, w) in enumerate(zip(got["losses"], want["losses"])):
        assert math.isfinite(g) and abs(g - w) <= RTOL * abs(w), f"{name} step {i + 1}: {g} vs CP=1 {w}"
    assert sorted(got["val"]) == [2, 4]
    for step in (2, 4):
        assert got["val"][step] == pytest.approx(want["val"][step], rel=RTOL), (name, step)


def test_cost_model_counts_only_surviving_work_and_ring_bytes():
    """Window 256 over N=8192, P=4 zigzag: the ring still sends 2 of its 3 blocks (d = 1 and P-1), as
    its host plan does; all-gather and Ulysses move every byte; every strategy's FLOPs shrink by the
    bottleneck rank's visible pairs. Documents inside one zigzag chunk: the ring sends nothing."""
    from dist_attn.cost_model import AttnShape, strategy_cost
    from dist_attn.documents import doc_cost
    n, p, kw = 8192, 4, dict(profile="h100", gpus_per_node=8)
    dense = AttnShape(n, 8, 8, 64)
    block = 2 * (n // p) * 8 * 64 * 2  # K and V of one rank, bf16
    for shape in (AttnShape(n, 8, 8, 64, window_size=256), AttnShape(n, 8, 8, 64, cu_seqlens=tuple(range(0, n + 1, 512)))):
        dc = doc_cost(shape.cu_seqlens, shape.window_size, p, "zigzag", seq_len=n, block_bytes=block)
        ring = strategy_cost("zigzag_ring", shape, p, **kw)
        assert ring.fwd.sent["p2p"] == max(dc["ring_bytes_fwd"])
        frac = max(dc["pairs"]) / max(doc_cost(None, None, p, "zigzag", seq_len=n)["pairs"])
        for name in ("zigzag_ring", "allgather", "ulysses"):
            full, masked = strategy_cost(name, dense, p, **kw), strategy_cost(name, shape, p, **kw)
            assert masked.fwd.flops == pytest.approx(full.fwd.flops * frac)
            assert masked.time_s < full.time_s
            if name != "zigzag_ring":
                assert masked.fwd.sent == full.fwd.sent
    assert strategy_cost("zigzag_ring", AttnShape(n, 8, 8, 64, window_size=256), p, **kw).fwd.sent["p2p"] == \
        2 * block  # d = 1 and d = P-1


def test_one_override_switches_the_main_job_to_packed_real_text(tmp_path, monkeypatch):
    """`data=pydocs`: the standard library's docstrings as packed documents (built on first use, held-out
    split), vocab from the meta, evaluation on; the config validates for the main job's CP=2."""
    from hydra import compose, initialize_config_dir
    from dist_attn.data import builtin
    from dist_attn.data.packing import DocumentDataset
    from dist_attn.train.config import register_configs, to_train_config, validate
    monkeypatch.setattr(builtin, "MAX_CHARS", 200_000)  # a slice of the corpus keeps the test fast
    register_configs()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
        cfg = to_train_config(compose("train", overrides=["data=pydocs", f"trainer.out_dir={tmp_path}"]))
    d = cfg.data
    assert d.documents and d.path == str(tmp_path / "data" / "pydocs.bin") and os.path.exists(d.path + ".val")
    assert cfg.model.vocab_size == 257 and cfg.trainer.eval_every > 0
    cfg.parallel.cp = 2
    assert validate(cfg, world_size=2).cp == 2
    batch = DocumentDataset(d.path, d.seq_len).get_batch(0, 4)
    assert batch.cu_seqlens.numel() > 5  # several documents per packed row
    text = bytes(t for t in batch.input_ids[0, :200].tolist() if t < 256).decode("utf-8", "replace")
    assert sum(c.isalpha() for c in text) > 100  # English prose, not noise
