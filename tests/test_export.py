"""Export of training checkpoints (launchers.export / dist_attn.train.checkpoint.export_checkpoint).

One 2-process gloo launch trains the tiny hybrid 2 steps with DeepSpeed (CP=2 zigzag ring + LASP-2,
ZeRO-1: the fp32 masters are partitioned over the 2 ranks) and with megatron (TP=2: every projection
split over the 2 ranks), checkpoints both, and records each engine's own logits on a fixed batch
(gathered over the CP / TP ranks). The checkpoints are then exported in one process and loaded with
``HybridLM.from_pretrained``: its logits (no CP, no TP) equal the engine's to fp32 rounding (the CP
strategy and TP sums add partial results in another order).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.dist import run_distributed
from tests.test_train import FAST, _cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def _no_sp() -> list:
    """Sequence parallelism off where the config has it (its layout of the saved weights is the same)."""
    from dataclasses import fields
    from dist_attn.train.config import ParallelConfig
    return ["parallel.sp=false"] if "sp" in {f.name for f in fields(ParallelConfig)} else []


RUNS = [("ds_cp2_zero1", ["parallel.cp=2", "backend.zero_stage=1"]),
        ("megatron_tp2", ["backend=megatron", "parallel.tp=2"] + _no_sp())]
STEPS = ["trainer.steps=2", "trainer.ckpt_every=2"]


def _batch():
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 16, (2, 32), generator=g)


def _train_and_logits(rank, world, out_dir):
    import multiprocessing
    import torch.distributed as dist
    from dist_attn.data.sharding import shard_batch, unshard_batch
    from dist_attn.train.trainer import Trainer
    # megatron's checkpoint writer starts helper processes, which Python refuses in daemonic processes
    # (the harness's workers); as in tests/test_megatron.py
    multiprocessing.current_process().daemon = False
    out = {}
    ids = _batch()
    for name, overrides in RUNS:
        trainer = Trainer(_cfg(overrides + STEPS, out_dir), os.path.join(out_dir, name))
        summary = trainer.run()
        eng = trainer.engine
        with torch.no_grad():
            if eng.name == "megatron":  # TP=2, CP=1: the engine gathers the vocab slices itself
                logits = eng.forward(ids, torch.arange(ids.shape[1]).expand_as(ids))
            else:  # CP=2: this rank's shard of the sequence, gathered over the CP group
                p, layout = eng.plan.cp, eng.plan.layout
                sid, _, pos = shard_batch(ids, ids, eng.coords.cp, p, layout)
                local = eng.module(sid, pos).contiguous()
                parts = [torch.empty_like(local) for _ in range(p)]
                dist.all_gather(parts, local, group=eng.groups.cp_group)
                logits = unshard_batch(parts, layout)
        out[name] = (logits, summary["checkpoint"])
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    return run_distributed(_train_and_logits, 2, str(out), timeout=300)[0]


def _loaded_logits(model_dir):
    from dist_attn.model import HybridLM
    model = HybridLM.from_pretrained(model_dir)
    ids = _batch()
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1])), model


def test_deepspeed_zero1_cp2_export_matches_the_engine(trained, tmp_path):
    from dist_attn.train.checkpoint import export_checkpoint
    logits, ckpt = trained["ds_cp2_zero1"]
    run_dir = os.path.dirname(os.path.dirname(ckpt))
    export_checkpoint(run_dir, str(tmp_path / "m"))  # a run directory: its newest checkpoint
    got, model = _loaded_logits(str(tmp_path / "m"))
    torch.testing.assert_close(got, logits, rtol=1e-5, atol=1e-5)
    assert not torch.equal(model.embed.tok.weight, _fresh_embedding())  # trained weights, not the init


def _fresh_embedding():
    from dist_attn.model import HybridLM
    cfg = _cfg([], "/tmp").model
    torch.manual_seed(_cfg([], "/tmp").trainer.seed)
    return HybridLM(cfg).embed.tok.weight


def test_megatron_tp2_export_through_the_cli_matches_the_engine(trained, tmp_path):
    logits, ckpt = trained["megatron_tp2"]
    res = subprocess.run([sys.executable, "-m", "launchers.export", "--checkpoint", ckpt, "--out",
                          str(tmp_path / "m")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got, model = _loaded_logits(str(tmp_path / "m"))
    torch.testing.assert_close(got, logits, rtol=1e-5, atol=1e-5)
    import json
    with open(tmp_path / "m" / "config.json") as f:
        cfg = json.load(f)
    assert cfg["source"]["backend"] == "megatron" and cfg["source"]["layout"]["tp"] == 2 and cfg["source"]["step"] == 2
    assert cfg["tokenizer"] is None  # MQAR: no tokenizer


def test_export_errors_name_the_problem(tmp_path):
    from launchers.export import main
    assert main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "m")]) == 2
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "m")])  # --run or --checkpoint is required
