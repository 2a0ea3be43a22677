"""The small frozen object a model carries instead of globals: which CP group, layout and strategies.

    cp = CPContext(group=cp_group, layout="zigzag", softmax_strategy="zigzag_ring", linear_strategy="lasp2")

``group=None`` with ``world_size == 1`` means no context parallelism: layers call the local kernels.
For ``usp`` the two sub-groups come from :func:`dist_attn.groups.make_usp_groups` and are carried here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from dist_attn.layout import check_layout

SOFTMAX_STRATEGIES = ("zigzag_ring", "ulysses", "usp", "allgather")
LINEAR_STRATEGIES = ("lasp2", "ulysses")


@dataclass(frozen=True)
class CPContext:
    group: Any = None                      # torch ProcessGroup of the CP ranks (None: no CP)
    layout: str = "zigzag"                 # token layout, one per model: "zigzag" | "contiguous"
    softmax_strategy: str = "zigzag_ring"  # see SOFTMAX_STRATEGIES
    linear_strategy: str = "lasp2"         # see LINEAR_STRATEGIES
    ulysses_group: Optional[Any] = None    # usp only: the Ulysses (inner) sub-group
    ring_group: Optional[Any] = None       # usp only: the ring (outer) sub-group
    backend: str = "auto"                  # local kernel backend: "auto" | "triton" | "torch"

    def __post_init__(self):
        check_layout(self.layout, "CPContext.layout")
        if self.softmax_strategy not in SOFTMAX_STRATEGIES:
            raise ValueError(f"CPContext.softmax_strategy: expected one of {SOFTMAX_STRATEGIES}, got "
                             f"{self.softmax_strategy!r}. Fix: pick one of them (zigzag_ring is the default).")
        if self.linear_strategy not in LINEAR_STRATEGIES:
            raise ValueError(f"CPContext.linear_strategy: expected one of {LINEAR_STRATEGIES}, got "
                             f"{self.linear_strategy!r}. Fix: pick one of them (lasp2 is the default).")
        if self.softmax_strategy == "usp" and self.group is not None and \
                (self.ulysses_group is None or self.ring_group is None):
            raise ValueError("CPContext: expected ulysses_group and ring_group for softmax_strategy='usp', got "
                             "None. Fix: build them with dist_attn.groups.make_usp_groups(cp_group, ulysses_degree).")

    @property
    def world_size(self) -> int:
        if self.group is None:
            return 1
        import torch.distributed as dist
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        if self.group is None:
            return 0
        import torch.distributed as dist
        return dist.get_rank(self.group)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1
