"""Evaluate a training checkpoint: validation loss / perplexity and long-context recall (length x depth).

Same Hydra overrides as training (they rebuild the same model, parallel layout and data), plus
``trainer.resume=auto|PATH`` naming the checkpoint (the trainer's semantics: ``auto`` = the newest
checkpoint of the same experiment under ``trainer.out_dir``; a path = a ``step_*`` directory, a
``checkpoints/`` directory or a run directory), plus the ``--`` options below::

    python -m launchers.eval trainer.resume=auto                              # 1 process
    torchrun --nproc_per_node 2 -m launchers.eval parallel.cp=2 trainer.resume=auto --samples 16
    torchrun --nproc_per_node 2 -m launchers.eval parallel.cp=2 data=memmap data.path=tok.bin \
        model.vocab_size=auto trainer.resume=outputs/run1 --task passkey --lengths 1024,2048,4096

Writes, next to the run (``<run>/eval/step_N/``, or ``--out DIR``): ``eval.json`` (checkpoint, step,
validation loss and perplexity, recall summary), ``recall.json`` and ``recall.png`` (heat map; needs
matplotlib). Recall runs with context parallelism like training (:mod:`dist_attn.eval.recall`); data
parallel replicas split the prompts.

Validation: the training run's validation stream and the engine's ``eval_step`` (the ``val_loss`` /
``val_ppl`` that ``trainer.eval_every`` logs): ``data=memmap``: ``data.val_path``, else the held-out
``PATH.val`` of ``prepare --val-fraction`` (skipped when there is none), sequential windows, the same
every run; ``data=mqar``: a fixed MQAR split (its own seed).
Recall task (``--task auto``): ``mqar`` for an MQAR-trained model, ``passkey`` otherwise.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys

DEPTHS = "0,0.25,0.5,0.75,1"
log = logging.getLogger("dist_attn.eval")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m launchers.eval", description=__doc__.split("\n")[0],
                                epilog="Other arguments are Hydra overrides, as for launchers.train.")
    p.add_argument("--task", default="auto", choices=("auto", "passkey", "mqar"))
    p.add_argument("--lengths", default=None,
                   help="comma-separated context lengths (default: mqar: data.seq_len doubling up to "
                        "model.max_seq_len; passkey: 1K..64K capped by model.max_seq_len)")
    p.add_argument("--depths", default=DEPTHS, help=f"comma-separated needle depths in [0, 1] ({DEPTHS})")
    p.add_argument("--samples", type=int, default=8, help="prompts per (length, depth) cell")
    p.add_argument("--seed", type=int, default=0, help="seed of the recall prompts")
    p.add_argument("--val-batches", type=int, default=None,
                   help="validation micro-batches (default: trainer.eval_batches; 0: skip)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json for passkey text (default: the data's)")
    p.add_argument("--out", default=None, help="output directory (default: <run>/eval/step_N)")
    p.add_argument("--no-png", action="store_true", help="write the JSON only")
    return p.parse_known_args(argv)


def compose(overrides: list):
    """The training config of ``overrides`` (Hydra compose: no run directory, no logging setup)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from dist_attn.train.config import register_configs, to_train_config
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="dist_attn.configs", version_base="1.3"):
        return to_train_config(hydra_compose(config_name="train", overrides=list(overrides)))


def model_forward(engine):
    """``forward(input_ids [B, S/P], position_ids) -> logits [B, S/P, V]`` of a built engine, no grad."""
    import torch

    from dist_attn.checks import fail
    fwd = getattr(engine, "forward", None)  # megatron: gathers the vocabulary over TP
    if callable(fwd):
        return fwd
    if engine.plan.pp == 1 and isinstance(getattr(engine, "module", None), torch.nn.Module):
        module = engine.module.eval()  # deepspeed without a pipeline: the HybridLM itself
        return torch.no_grad()(lambda ids, pos: module(ids, pos))
    fail("launchers.eval", "an engine with a single forward (parallel.pp=1)", f"pp={engine.plan.pp}",
         "evaluate with parallel.pp=1 (any cp/dp/tp); the checkpoint layout must match, so re-export it")


def validation(trainer, opts) -> dict | None:
    """Validation loss / perplexity (and MQAR recall) over the first ``n`` batches of the training run's
    validation stream, through the engine's ``eval_step`` (no gradient, reduced over the job): the
    numbers ``trainer.eval_every`` logs as ``val_loss`` / ``val_ppl`` with ``trainer.eval_batches=n``."""
    from dist_attn.data.memmap import resolve_val_path
    from dist_attn.train.trainer import BatchSource
    cfg = trainer.cfg
    d, n = cfg.data, cfg.trainer.eval_batches if opts.val_batches is None else opts.val_batches
    if n <= 0:
        return None
    if d.name != "mqar" and resolve_val_path(d.path, d.val_path) is None:
        log.warning("no validation stream (no data.val_path and no %s.val): validation loss skipped", d.path)
        return None
    val = trainer.val or BatchSource(cfg, trainer.plan, trainer.engine.coords, trainer.device, validation=True)
    st = trainer.engine.eval_step([val.micro_batches(i, count=1)[0] for i in range(n)])
    out = dict(source=f"mqar seed {BatchSource.VAL_SEED}" if d.name == "mqar" else resolve_val_path(d.path, d.val_path),
               batches=n, sequences=n * cfg.trainer.micro_batch * trainer.plan.dp, seq_len=d.seq_len,
               val_tokens=st.n_tokens, val_loss=st.loss, val_ppl=math.exp(min(st.loss, 700.0)))
    if d.name == "mqar" and st.recall_total:
        out["val_recall_acc"] = st.recall_correct / st.recall_total
    return out


def recall_lengths(cfg, task_name: str, opts) -> list:
    from dist_attn.eval import default_lengths
    if opts.lengths:
        return [int(x) for x in opts.lengths.split(",") if x]
    top = cfg.model.max_seq_len
    if task_name == "mqar":
        out, n = [], cfg.data.seq_len
        while n <= top:
            out.append(n)
            n *= 2
        return out
    return default_lengths(top)


def run_eval(cfg, opts, scratch: str) -> dict:
    """Collective on every rank: build the engine, load the checkpoint, validate, recall, write (rank 0)."""
    import torch.distributed as dist

    from dist_attn.checks import fail
    from dist_attn.eval import evaluate_recall_cp, format_table, make_task, write_results
    from dist_attn.train.trainer import Trainer
    if not cfg.trainer.resume:
        fail("launchers.eval", "trainer.resume=auto or a checkpoint path", repr(cfg.trainer.resume),
             "add trainer.resume=auto (the newest checkpoint of this experiment) or trainer.resume=<run dir>")
    cfg.trainer.tensorboard = False
    trainer = Trainer(cfg, scratch)  # engine (CP groups, model) of the training config; scratch run dir
    trainer.resume()
    cfg = trainer.cfg  # model.vocab_size=auto resolved
    if trainer.last_ckpt is None:
        fail("launchers.eval", f"a checkpoint of this experiment under {cfg.trainer.out_dir}", "none",
             "train first, pass the same overrides as the training run, or trainer.resume=<path>")
    engine, rank = trainer.engine, trainer.rank
    forward = model_forward(engine)
    ckpt = os.path.abspath(trainer.last_ckpt)
    out_dir = opts.out or os.path.join(os.path.dirname(os.path.dirname(ckpt)), "eval", os.path.basename(ckpt))
    val = validation(trainer, opts)

    task_name = opts.task if opts.task != "auto" else ("mqar" if cfg.data.name == "mqar" else "passkey")
    task = make_task(task_name, vocab_size=cfg.model.vocab_size, data_path=cfg.data.path,
                     val_path=cfg.data.val_path,
                     tokenizer=opts.tokenizer, num_kv_pairs=cfg.data.num_kv_pairs,
                     mqar_vocab_size=cfg.data.vocab_size if cfg.data.name == "mqar" else None)
    plan, c = engine.plan, engine.coords
    res = evaluate_recall_cp(forward, engine.cp, task, recall_lengths(cfg, task_name, opts),
                             [float(x) for x in opts.depths.split(",") if x], samples=opts.samples,
                             seed=opts.seed, max_len=cfg.model.max_seq_len, device=trainer.device,
                             dp_rank=c.dp, dp_size=plan.dp, dp_group=getattr(engine.groups, "dp_group", None),
                             progress=rank == 0 and cfg.trainer.progress,
                             meta=dict(checkpoint=ckpt, step=trainer.step, describe=engine.describe()))
    summary = dict(checkpoint=ckpt, step=trainer.step, out_dir=out_dir, validation=val,
                   recall=dict(task=res.task, mean_accuracy=res.to_json()["mean_accuracy"],
                               accuracy_by_length=dict(zip(res.lengths, res.to_json()["accuracy_by_length"]))))
    if rank == 0:
        files = write_results(res, os.path.join(out_dir, "recall"), png=not opts.no_png)
        summary["files"] = files
        with open(os.path.join(out_dir, "eval.json"), "w") as f:
            json.dump(summary, f, indent=1)
        summary["table"] = format_table(res.to_json())
    dist.barrier()
    return summary


def main(argv=None) -> int:
    opts, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    rank0 = int(os.environ.get("RANK", "0")) == 0
    scratch = None
    try:
        cfg = compose(overrides)
        # a scratch run directory for the engine's bookkeeping (the checkpoint's run is never written);
        # hidden, so trainer.resume=auto never looks into it
        scratch = os.path.join(cfg.trainer.out_dir, ".eval-" + os.environ.get("DIST_ATTN_RUN_ID", str(os.getpid())))
        summary = run_eval(cfg, opts, scratch)
    except ValueError as e:  # a configuration or checkpoint mistake: say it plainly, no traceback
        if rank0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if rank0 and scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    if rank0:
        val = summary["validation"]
        if val:
            extra = f", recall {val['val_recall_acc']:.3f}" if "val_recall_acc" in val else ""
            print(f"validation: loss {val['val_loss']:.4f}, perplexity {val['val_ppl']:.3f}{extra} "
                  f"({val['sequences']} sequences of {val['seq_len']})", file=sys.stderr)
        print(f"recall ({summary['recall']['task']['name']}), checkpoint {summary['checkpoint']}:\n"
              f"{summary['table']}\n  written: {summary['out_dir']}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
