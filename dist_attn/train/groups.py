"""Process groups of a DP x CP (x PP) job built from its :class:`~dist_attn.plan.ParallelPlan`
(the DeepSpeed engine's; megatron builds its own groups with the same rank layout).

Rank layout: the plan's (TP fastest, then CP, DP, PP; tp = 1 here, so the ranks of one CP group are
neighbours, i.e. on one node first)::

    global_rank = cp_rank + P * (dp_rank + DP * pp_rank)

Groups built here, each a list of global ranks:

* ``cp``       -- the ranks sharing one sequence: fixed (pp_rank, dp_rank). Handed to the model
                  through :class:`~dist_attn.context.CPContext`.
* ``dp``       -- the same CP shard of different batches: fixed (pp_rank, cp_rank).
* ``replica``  -- every rank holding a copy of this stage's parameters, DP x CP: fixed pp_rank.
                  Gradients are reduced over it; ZeRO partitions over it.
* ``ulysses`` / ``ring`` (softmax_cp=usp) -- from :func:`dist_attn.groups.make_usp_groups`, called
                  for every CP group: Ulysses groups of U consecutive CP ranks, ring groups strided.

``torch.distributed.new_group`` is collective over the world: every rank creates every group, in
the same order, and keeps the ones it belongs to.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch.distributed as dist

from dist_attn.plan import ParallelPlan, RankCoords


@dataclass
class TrainGroups:
    """This rank's coordinates and process groups (``None`` for a group of size 1 where noted)."""
    plan: ParallelPlan
    rank: int
    coords: RankCoords
    cp_group: Any = None              # None when cp == 1
    dp_group: Any = None
    replica_group: Any = None         # DP x CP of this stage
    ulysses_group: Optional[Any] = None
    ring_group: Optional[Any] = None
    ranks: dict = field(default_factory=dict)  # name -> this rank's member list (for logs and tests)


def build_groups(plan: ParallelPlan) -> TrainGroups:
    """Create every group of the job (collective: call on all ranks, after init_process_group)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    assert world == plan.world_size, f"plan {plan} does not match the world size {world} (validate first)"
    assert plan.tp == 1, "TP groups are the megatron engine's"
    g = TrainGroups(plan, rank, plan.coords(rank))

    def make(rank_lists: list[list[int]], name: str):
        mine = None
        for ranks in rank_lists:
            pg = dist.new_group(ranks)
            if rank in ranks:
                mine = pg
                g.ranks[name] = ranks
        return mine

    cp_lists = plan.group_ranks("cp")
    g.cp_group = make(cp_lists, "cp") if plan.cp > 1 else None
    g.dp_group = make(plan.group_ranks("dp"), "dp")
    g.replica_group = make(plan.group_ranks("dp", "cp"), "replica")
    if plan.usp_degree:
        from dist_attn.groups import make_usp_groups
        for ranks in cp_lists:  # every rank, every CP group, one order: new_group is world-collective
            uly, ring = make_usp_groups(ranks, plan.usp_degree)
            if uly is not None:
                g.ulysses_group, g.ring_group = uly, ring
    return g
