"""Process sub-groups for 2D (USP) attention: a CP group of P ranks as a U x R grid.

CP rank c (its rank inside the CP group) sits at ring index j and Ulysses index u with ::

    c = j·U + u,        0 <= u < U,  0 <= j < R = P / U

* Ulysses groups (head split, all-to-all, the bandwidth-hungry part): the U *consecutive* CP ranks
  ``{j·U + u : u}`` -- with ranks numbered node by node, a Ulysses group stays inside a node (NVLink).
* Ring groups (sequence split, P2P K/V ring, the part that tolerates slow links): the R ranks
  ``{j·U + u : j}``, strided by U, one per Ulysses group -- they span the nodes.

Inside every sub-group the ranks are ordered by CP rank (torch orders a new group's ranks by global
rank and the CP group's ranks are in global-rank order), so rank u of the Ulysses group and rank j of
the ring group are exactly (u, j) above. :func:`dist_attn.usp.usp_attention` relies on that numbering.

``torch.distributed.new_group`` is a collective over the *whole job*: every process of the default
group must call it, for every new group, in the same order -- including processes that will not be
members. :func:`make_usp_groups` therefore creates the R Ulysses groups then the U ring groups in a
fixed order and must be called by every process with the same arguments. With one CP group (CP = the
world) that is simply every rank calling it once. With several CP groups (e.g. data parallel x CP),
every process calls it once per CP group, in the same order, passing that CP group's ranks as a list;
it returns ``(None, None)`` on processes outside that CP group.
"""
from __future__ import annotations

import numbers
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

from dist_attn.checks import check_group, fail


def _cp_ranks(where: str, cp_group) -> list[int]:
    """Global ranks of the CP group in CP-rank order (``None``: the whole world)."""
    if isinstance(cp_group, (list, tuple)):
        check_group(where, None)
        ranks = list(cp_group)
        world = dist.get_world_size()
        if not ranks or len(set(ranks)) != len(ranks) or \
                any(not isinstance(r, numbers.Integral) or not 0 <= r < world for r in ranks):
            fail(where, f"cp_group as a list of distinct global ranks in [0, {world})", repr(ranks),
                 "pass the CP group's global ranks, or its ProcessGroup")
        return sorted(int(r) for r in ranks)  # torch orders group ranks by global rank
    check_group(where, cp_group)
    if cp_group is None:
        return list(range(dist.get_world_size()))
    return list(dist.get_process_group_ranks(cp_group))


def usp_grid(cp_size: int, ulysses_degree: int, where: str = "usp") -> int:
    """Validate U against P; return R = P / U."""
    if not isinstance(ulysses_degree, numbers.Integral) or isinstance(ulysses_degree, bool) or \
            ulysses_degree < 1 or cp_size % ulysses_degree != 0:
        fail(where, f"ulysses_degree U a positive divisor of the CP size P={cp_size} (P = U x R)",
             repr(ulysses_degree), f"pick U in {[d for d in range(1, cp_size + 1) if cp_size % d == 0]}; "
             "usually the GPUs per node, so that the all-to-all stays on NVLink")
    return cp_size // int(ulysses_degree)


def ulysses_group_ranks(cp_size: int, ulysses_degree: int) -> list[list[int]]:
    """CP ranks of each Ulysses group: ``[[j·U + u for u in range(U)] for j in range(R)]``."""
    u_deg = ulysses_degree
    return [[j * u_deg + u for u in range(u_deg)] for j in range(cp_size // u_deg)]


def ring_group_ranks(cp_size: int, ulysses_degree: int) -> list[list[int]]:
    """CP ranks of each ring group: ``[[j·U + u for j in range(R)] for u in range(U)]``."""
    u_deg = ulysses_degree
    return [[j * u_deg + u for j in range(cp_size // u_deg)] for u in range(u_deg)]


def make_usp_groups(cp_group, ulysses_degree: int, timeout: Optional[timedelta] = None):
    """Split the CP group into Ulysses groups (size U, consecutive ranks) and ring groups (size R = P/U,
    strided); return ``(ulysses_group, ring_group)`` of the calling process.

    Args:
        cp_group: the CP ``ProcessGroup``, ``None`` for the whole world, or the CP group's global ranks
            (a list; needed with several CP groups, see the module docstring).
        ulysses_degree: U, a divisor of P. U = P is pure Ulysses, U = 1 pure ring.
        timeout: passed to ``new_group`` (default: the backend's).

    Collective over the whole job (every process, same arguments, same order). Raises ``ValueError``
    on every process, before any group is created, when U does not divide P.
    """
    where = "make_usp_groups"
    if timeout is not None and not isinstance(timeout, timedelta):
        fail(where, "timeout as a datetime.timedelta or None", repr(timeout), "pass timedelta(seconds=...)")
    ranks = _cp_ranks(where, cp_group)
    p = len(ranks)
    usp_grid(p, ulysses_degree, where)
    u_deg = int(ulysses_degree)
    me = dist.get_rank()
    found = {}
    # Same order on every process: all Ulysses groups, then all ring groups.
    for kind, layout in (("ulysses", ulysses_group_ranks(p, u_deg)), ("ring", ring_group_ranks(p, u_deg))):
        for cp_members in layout:
            members = [ranks[c] for c in cp_members]
            group = dist.new_group(ranks=members, timeout=timeout)
            if me in members:
                found[kind] = group
    if "ulysses" not in found:  # this process is not in the CP group
        return None, None
    return found["ulysses"], found["ring"]


def check_usp_groups(where: str, ulysses_group, ring_group) -> tuple[int, int, int, int]:
    """Local checks of the two groups; returns (U, R, u, j) with u, j this process's index in each."""
    for name, g in (("ulysses_group", ulysses_group), ("ring_group", ring_group)):
        if g is None:
            fail(where, f"{name} as a ProcessGroup from dist_attn.groups.make_usp_groups", "None",
                 "build both groups with make_usp_groups(cp_group, ulysses_degree)")
        check_group(f"{where}: {name}", g)
    u_deg, r_deg = dist.get_world_size(ulysses_group), dist.get_world_size(ring_group)
    u, j = dist.get_rank(ulysses_group), dist.get_rank(ring_group)
    u_ranks = dist.get_process_group_ranks(ulysses_group)
    r_ranks = dist.get_process_group_ranks(ring_group)
    # On the grid of make_usp_groups the two groups are orthogonal axes: they share only this process.
    if set(u_ranks) & set(r_ranks) != {dist.get_rank()}:
        fail(where, "ulysses_group and ring_group forming a U x R grid (sharing only this process)",
             f"Ulysses ranks {u_ranks}, ring ranks {r_ranks}", "build both with make_usp_groups")
    return u_deg, r_deg, u, j
