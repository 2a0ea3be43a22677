"""Training system: typed configs, DP x CP (x PP) groups, the trainer loop, telemetry, checkpoints.

The engine itself sits behind one adapter (:mod:`dist_attn.parallel.deepspeed`); the entry point is
``python -m launchers.train`` (see its docstring for torchrun, multi-node and Slurm commands).
"""
from dist_attn.train.config import TrainConfig, register_configs, validate

__all__ = ["TrainConfig", "register_configs", "validate"]
