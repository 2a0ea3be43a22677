"""The small frozen object a model carries instead of globals: which CP group, layout and strategies.

    cp = CPContext(group=cp_group, layout="zigzag", softmax_strategy="zigzag_ring", linear_strategy="lasp2")

``group=None`` with ``world_size == 1`` means no context parallelism: layers call the local kernels.
For ``usp`` the two sub-groups come from :func:`dist_attn.groups.make_usp_groups` and are carried here.
An engine builds it from its validated plan: ``CPContext.from_plan(plan, cp_group, ulysses_group, ring_group)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from dist_attn.checks import fail
from dist_attn.layout import check_layout
from dist_attn.plan import KERNEL_BACKENDS, LINEAR_STRATEGIES, SOFTMAX_STRATEGIES

__all__ = ["CPContext", "SOFTMAX_STRATEGIES", "LINEAR_STRATEGIES"]


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
            fail("CPContext.softmax_strategy", f"one of {SOFTMAX_STRATEGIES}", repr(self.softmax_strategy),
                 "pick one of them (zigzag_ring is the default)")
        if self.linear_strategy not in LINEAR_STRATEGIES:
            fail("CPContext.linear_strategy", f"one of {LINEAR_STRATEGIES}", repr(self.linear_strategy),
                 "pick one of them (lasp2 is the default)")
        if self.backend not in KERNEL_BACKENDS:
            fail("CPContext.backend", f"one of {KERNEL_BACKENDS}", repr(self.backend), "use auto")
        if self.softmax_strategy == "usp" and self.group is not None and \
                (self.ulysses_group is None or self.ring_group is None):
            fail("CPContext", "ulysses_group and ring_group for softmax_strategy='usp'", "None",
                 "build them with dist_attn.groups.make_usp_groups(cp_group, ulysses_degree)")

    @classmethod
    def from_plan(cls, plan, group=None, ulysses_group=None, ring_group=None) -> "CPContext":
        """The context of a resolved :class:`~dist_attn.plan.ParallelPlan` and this rank's CP group
        (``None`` when ``plan.cp == 1``) and USP sub-groups."""
        assert plan.resolved, "resolve the plan's auto strategies first"
        return cls(group=group, layout=plan.layout, softmax_strategy=plan.softmax_cp,
                   linear_strategy=plan.linear_cp, ulysses_group=ulysses_group, ring_group=ring_group,
                   backend=plan.kernel_backend)

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
