"""``python -m launchers.eval``: a checkpoint trained with CP=2 is evaluated with CP=2 (validation loss and
recall), and the numbers equal a single-process evaluation of the trained weights."""
from __future__ import annotations

import json
import os

import torch

from tests.dist import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
TRAIN = [f"trainer.steps={STEPS}", "trainer.warmup_steps=1", "trainer.log_every=1", f"trainer.ckpt_every={STEPS}",
         "trainer.micro_batch=4", "trainer.tensorboard=false", "trainer.progress=false", "data.seq_len=32",
         "parallel.cp=2"]
EVAL = ["--lengths", "32,64,128", "--depths", "0,0.5,1", "--samples", "3", "--val-batches", "2"]


def _cfg(overrides, out_dir):
    from hydra import compose, initialize_config_dir

    from dist_attn.train.config import register_configs, to_train_config
    register_configs()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
        return to_train_config(compose("train", overrides=TRAIN + [f"trainer.out_dir={out_dir}"] + overrides))


def _train_then_eval(rank, world, out_dir):
    from dist_attn.train.trainer import Trainer
    from launchers.eval import main
    trainer = Trainer(_cfg([], out_dir), os.path.join(out_dir, "run"))
    summary = trainer.run()
    state = {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}
    overrides = TRAIN + [f"trainer.out_dir={out_dir}"]
    rc = main(overrides + ["trainer.resume=auto"] + EVAL)
    rc_null = main(overrides + EVAL)                                           # no trainer.resume
    rc_task = main(overrides + ["trainer.resume=auto", "--task", "passkey"] + EVAL)  # vocabulary 64 < 256 bytes
    return dict(rc=rc, rc_null=rc_null, rc_task=rc_task, ckpt=summary["checkpoint"],
                state={k: v.numpy() for k, v in state.items()} if rank == 0 else None)


def _reference(state, cfg):
    """Single process, full sequences: the trained weights on the launcher's validation batches and prompts."""
    from dist_attn.data import MQARDataset
    from dist_attn.eval import evaluate_recall, make_task
    from dist_attn.model import HybridLM
    from dist_attn.train.trainer import BatchSource
    model = HybridLM(cfg.model)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    d = cfg.data
    ds = MQARDataset(vocab_size=d.vocab_size, seq_len=d.seq_len, num_kv_pairs=d.num_kv_pairs, seed=BatchSource.VAL_SEED)
    loss, n = 0.0, 0
    with torch.no_grad():
        for step in range(2):
            ids, labels = ds.get_batch(step, cfg.trainer.micro_batch)
            s, k = HybridLM.loss_sum(model(ids, torch.arange(d.seq_len)), labels)
            loss, n = loss + float(s), n + int(k)
    task = make_task("mqar", vocab_size=cfg.model.vocab_size, mqar_vocab_size=d.vocab_size)
    rec = evaluate_recall(model, task, [32, 64, 128], [0, 0.5, 1], samples=3).to_json()
    return loss / n, rec


def test_eval_launcher_matches_single_process(tmp_path):
    out = run_distributed(_train_then_eval, 2, str(tmp_path), timeout=300)
    assert all(r["rc"] == 0 and r["rc_null"] == 2 and r["rc_task"] == 2 for r in out), out
    ckpt = out[0]["ckpt"]
    eval_dir = os.path.join(os.path.dirname(os.path.dirname(ckpt)), "eval", os.path.basename(ckpt))
    with open(os.path.join(eval_dir, "eval.json")) as f:
        summary = json.load(f)
    with open(os.path.join(eval_dir, "recall.json")) as f:
        recall = json.load(f)
    assert summary["checkpoint"] == ckpt and summary["step"] == STEPS
    val_loss, ref = _reference(out[0]["state"], _cfg([], str(tmp_path)))
    v = summary["validation"]
    assert abs(v["val_loss"] - val_loss) <= 1e-5 * val_loss, (v["val_loss"], val_loss)
    assert abs(v["val_ppl"] - torch.tensor(val_loss).exp().item()) <= 1e-4 * v["val_ppl"]
    assert recall["correct"] == ref["correct"] and recall["total"] == ref["total"]
    assert recall["lengths"] == [32, 64, 128] and recall["meta"]["cp"] == 2 and recall["meta"]["step"] == STEPS
    assert summary["recall"]["mean_accuracy"] == ref["mean_accuracy"]
    try:
        import matplotlib  # noqa: F401
        assert os.path.getsize(os.path.join(eval_dir, "recall.png")) > 0
    except ImportError:
        pass
    # the scratch run directory of the engine is gone; the checkpoint's run kept its files
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".eval-")]


def test_eval_launcher_needs_a_checkpoint(tmp_path, capsys):
    from launchers.eval import main
    assert main([f"trainer.out_dir={tmp_path}"]) == 2  # refused before any process group
    assert "trainer.resume=auto or a checkpoint path" in capsys.readouterr().err
