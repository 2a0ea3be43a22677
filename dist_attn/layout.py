"""Token layouts over a context-parallel (CP) group of size P, and sharding helpers.

Notation (used in every docstring of this package): B batch, S global sequence length, P CP size,
H heads, D head dim. Tensors are ``[B, S, H, D]`` globally and ``[B, S/P, H, D]`` on each rank.

* ``contiguous``: rank r holds tokens ``[r*S/P, (r+1)*S/P)``. Needs S % P == 0.
* ``zigzag``: the sequence is cut into 2P chunks of C = S/(2P) tokens; rank r holds chunks r and
  2P-1-r, concatenated. Under a causal mask every rank then does the same work. Needs S % 2P == 0.

A layout is chosen once per model, so a hybrid model never reshuffles tokens between layers.
"""
from __future__ import annotations

import torch

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: str, where: str = "layout") -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"{where}: expected one of {LAYOUTS}, got {layout!r}. "
                         f"Fix: pass layout='zigzag' (balanced causal work) or 'contiguous'.")


def num_chunks(world_size: int, layout: str) -> int:
    """How many equal chunks the global sequence is cut into (P or 2P)."""
    check_layout(layout)
    return 2 * world_size if layout == "zigzag" else world_size


def rank_chunks(rank: int, world_size: int, layout: str) -> tuple[int, ...]:
    """Global chunk indices held by ``rank``, in local order."""
    if layout == "zigzag":
        return (rank, 2 * world_size - 1 - rank)
    check_layout(layout)
    return (rank,)


def check_seq_len(seq_len: int, world_size: int, layout: str, where: str = "sequence") -> None:
    """``seq_len`` is the *global* length S; raise if it cannot be split in this layout."""
    n = num_chunks(world_size, layout)
    if seq_len % n != 0 or seq_len == 0:
        raise ValueError(f"{where}: the {layout} layout over {world_size} ranks expects a global sequence "
                         f"length divisible by {n}, got {seq_len}. Fix: pad the sequence to a multiple of "
                         f"{n} (mask the padding in the loss).")


def shard(x: torch.Tensor, rank: int, world_size: int, layout: str, dim: int = 1) -> torch.Tensor:
    """Global ``[.., S, ..]`` -> this rank's ``[.., S/P, ..]`` along ``dim``."""
    check_seq_len(x.shape[dim], world_size, layout)
    chunks = x.chunk(num_chunks(world_size, layout), dim=dim)
    return torch.cat([chunks[c] for c in rank_chunks(rank, world_size, layout)], dim=dim).contiguous()


def unshard(parts: list[torch.Tensor], layout: str, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard`: the list of every rank's shard (rank order) -> the global tensor."""
    p = len(parts)
    n = num_chunks(p, layout)
    chunks: list = [None] * n
    for r, part in enumerate(parts):
        for c, piece in zip(rank_chunks(r, p, layout), part.chunk(len(rank_chunks(r, p, layout)), dim=dim)):
            chunks[c] = piece
    return torch.cat(chunks, dim=dim)


def position_ids(seq_len: int, rank: int, world_size: int, layout: str, device=None) -> torch.Tensor:
    """Global positions ``[S/P]`` of this rank's tokens (for RoPE), ``seq_len`` being the global S."""
    return shard(torch.arange(seq_len, device=device), rank, world_size, layout, dim=0)


def rank_ranges(seq_len: int, rank: int, world_size: int, layout: str) -> tuple[tuple[int, int], ...]:
    """Global token ranges ``[start, end)`` held by ``rank``, in local order (one per chunk): local
    rows ``[i·C, (i+1)·C)`` are global positions ``[start_i, end_i)``, so a kernel call on chunk i
    takes ``q_offset = start_i``. Host integers, no tensor."""
    check_seq_len(seq_len, world_size, layout)
    c = seq_len // num_chunks(world_size, layout)
    return tuple((ch * c, (ch + 1) * c) for ch in rank_chunks(rank, world_size, layout))


def gathered_to_global_index(seq_len: int, world_size: int, layout: str, device=None) -> torch.Tensor:
    """Index ``idx`` such that ``cat(shards in rank order)[idx]`` is in global order.

    After an all-gather or all-to-all along the sequence the tokens arrive in rank order; for the
    zigzag layout that is chunks (0, 2P-1, 1, 2P-2, ...), which causal attention must not see.
    """
    order = torch.cat([position_ids(seq_len, r, world_size, layout, device) for r in range(world_size)])
    return torch.argsort(order)
