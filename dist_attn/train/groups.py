"""Process groups of a DP x CP (x PP) training job.

Rank layout (CP fastest, so the ranks of one CP group are neighbours, i.e. on one node first)::

    global_rank = (pp_rank * dp + dp_rank) * cp + cp_rank

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

import os
import socket
from dataclasses import dataclass, field
from typing import Any, Optional

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    cp: int
    pp: int = 1

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.pp

    def rank(self, pp: int, dp: int, cp: int) -> int:
        return (pp * self.dp + dp) * self.cp + cp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """global rank -> (pp_rank, dp_rank, cp_rank)."""
        cp = rank % self.cp
        dp = (rank // self.cp) % self.dp
        return rank // (self.cp * self.dp), dp, cp

    def cp_ranks(self, pp: int, dp: int) -> list[int]:
        return [self.rank(pp, dp, c) for c in range(self.cp)]

    def dp_ranks(self, pp: int, cp: int) -> list[int]:
        return [self.rank(pp, d, cp) for d in range(self.dp)]

    def replica_ranks(self, pp: int) -> list[int]:
        return [self.rank(pp, d, c) for d in range(self.dp) for c in range(self.cp)]


@dataclass
class TrainGroups:
    """This rank's coordinates and process groups (``None`` for a group of size 1 where noted)."""
    dims: ParallelDims
    rank: int
    pp_rank: int
    dp_rank: int
    cp_rank: int
    cp_group: Any = None              # None when cp == 1
    dp_group: Any = None
    replica_group: Any = None         # DP x CP of this stage
    ulysses_group: Optional[Any] = None
    ring_group: Optional[Any] = None
    ranks: dict = field(default_factory=dict)  # name -> this rank's member list (for logs and tests)


def ensure_launcher_env() -> None:
    """A plain ``python -m launchers.train`` (no torchrun) is a world of one: give it the environment a
    launcher would (rank 0 of 1, a free local port) so every backend initialises the same way."""
    if "RANK" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")


def build_groups(dims: ParallelDims, ulysses_degree: int = 0) -> TrainGroups:
    """Create every group of the job (collective: call on all ranks, after init_process_group)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    assert world == dims.world_size, f"dims {dims} do not match the world size {world} (validate first)"
    pp_r, dp_r, cp_r = dims.coords(rank)
    g = TrainGroups(dims, rank, pp_r, dp_r, cp_r)

    def make(rank_lists: list[list[int]], name: str):
        mine = None
        for ranks in rank_lists:
            pg = dist.new_group(ranks)
            if rank in ranks:
                mine = pg
                g.ranks[name] = ranks
        return mine

    cp_lists = [dims.cp_ranks(p, d) for p in range(dims.pp) for d in range(dims.dp)]
    g.cp_group = make(cp_lists, "cp") if dims.cp > 1 else None
    g.dp_group = make([dims.dp_ranks(p, c) for p in range(dims.pp) for c in range(dims.cp)], "dp")
    g.replica_group = make([dims.replica_ranks(p) for p in range(dims.pp)], "replica")
    if ulysses_degree and dims.cp > 1:
        from dist_attn.groups import make_usp_groups
        for ranks in cp_lists:  # every rank, every CP group, one order: new_group is world-collective
            uly, ring = make_usp_groups(ranks, ulysses_degree)
            if uly is not None:
                g.ulysses_group, g.ring_group = uly, ring
    return g
