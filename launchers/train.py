"""Checkout shim over :mod:`dist_attn.cli` (the ``dist-attn-train`` console script): the same Hydra
entry point and overrides, so ``python -m launchers.train`` and ``torchrun -m launchers.train`` work from
a repository checkout.

    python -m launchers.train                                    # 1 process, CP=1, tiny model, MQAR
    torchrun --nproc_per_node 2 -m launchers.train parallel.cp=2 # 2 processes, CP=2 (CPU: gloo)
"""
from dist_attn.cli import main

if __name__ == "__main__":
    main()
