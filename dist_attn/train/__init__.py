"""Training system: typed configs, the engine contract, DP x CP (x PP) groups, the trainer loop,
telemetry, checkpoints.

Engines implement :class:`dist_attn.train.engine.Engine` in adapters under :mod:`dist_attn.parallel`,
which only :mod:`dist_attn.engines` names; the entry point is ``dist-attn-train`` /
``python -m launchers.train`` (see :mod:`dist_attn.cli` for torchrun, multi-node and Slurm commands).
"""
from dist_attn.train.config import TrainConfig, register_configs, validate

__all__ = ["TrainConfig", "register_configs", "validate"]
