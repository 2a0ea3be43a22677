"""Train a hybrid (linear + softmax attention) model with context parallelism. Hydra entry point,
installed as the ``dist-attn-train`` console script (same overrides); ``launchers/train.py`` is a shim
over it for checkouts.

    dist-attn-train parallel.cp=1                                # an installed wheel, no checkout
    python -m launchers.train                                    # 1 process, CP=1, tiny model, MQAR
    torchrun --nproc_per_node 2 -m launchers.train parallel.cp=2 # 2 processes, CP=2 (CPU: gloo)
    torchrun --nproc_per_node 8 -m launchers.train model=1b backend=zero1_bf16 data.seq_len=8192 \
        parallel.cp=4 parallel.softmax_cp=usp parallel.ulysses_degree=2 trainer=long
    NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash launchers/torchrun.sh parallel.cp=16   # two nodes
    sbatch --nodes 2 launchers/slurm.sbatch parallel.cp=16 trainer.steps=1000          # Slurm

Config groups live in configs/ (model, parallel, backend, data, trainer; shipped as the package
``dist_attn.configs``); the schema and its docs
are in dist_attn/train/config.py. Outputs go to the Hydra run directory: metrics.jsonl, tb/,
checkpoints/ (resume with trainer.resume=auto or a path).
"""
from __future__ import annotations

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dist_attn.train.config import register_configs, to_train_config

register_configs()


def _say(msg: str, every_rank: bool = False) -> None:
    """Print on rank 0, or on every rank (errors): the first rank to fail must say why before torchrun
    stops the others, and that need not be rank 0 (ranks validate in parallel)."""
    if every_rank or int(os.environ.get("RANK", "0")) == 0:
        print(msg, file=sys.stderr, flush=True)


@hydra.main(config_path="pkg://dist_attn.configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from dist_attn.train.trainer import NonFiniteLossError, Trainer
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        trainer = Trainer(to_train_config(cfg), run_dir)
        trainer.resume()
    except ValueError as e:  # a configuration or checkpoint mistake: say it plainly, no traceback
        _say(f"error: {e}", every_rank=True)
        sys.exit(2)
    try:
        summary = trainer.run()
    except NonFiniteLossError as e:
        _say(f"error: {e}", every_rank=True)
        sys.exit(1)
    last = summary["last"]
    acc = "" if last.get("recall_acc") is None else f", recall accuracy {last['recall_acc']:.3f}"
    _say(f"done: {summary['steps']} steps, final loss {last.get('loss', float('nan')):.4f}{acc}, "
         f"{last.get('tokens_per_s', 0):.0f} tokens/s\n"
         f"  metrics:     {summary['metrics']}\n"
         f"  tensorboard: tensorboard --logdir {summary['tensorboard']}\n"
         f"  checkpoint:  {summary['checkpoint']}")


if __name__ == "__main__":
    main()
