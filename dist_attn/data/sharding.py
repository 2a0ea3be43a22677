"""Split a global batch into this CP rank's shard, with the global positions of its tokens.

    input_ids, labels = dataset.get_batch(step, batch_size)               # [B, S], [B, S]
    ids, lab, pos = shard_batch(input_ids, labels, cp.rank, cp.world_size, cp.layout)   # [B, S/P] each
    logits = model(ids, pos)

Labels are shifted *globally*, before sharding: ``labels[:, t]`` is the token at ``t + 1`` of the
whole sequence. Sharding then only selects columns, so the last token of a shard keeps its true
target even when the next token lives on another rank (or, in the zigzag layout, far away in this
rank's own shard); shifting after sharding would pair it with the wrong token and lose P-1 or 2P-1
targets per sequence.

Packed documents (``data.documents=true``): :func:`shard_packed` does the same for a
:class:`~dist_attn.data.packing.PackedBatch` ``[1, B·S]``, whose positions restart at each document
and whose ``cu_seqlens`` stay global::

    ids, lab, pos, cu = shard_packed(dataset.get_batch(step, batch_size), cp.rank, cp.world_size, cp.layout)
    logits = model(ids, pos, cu_seqlens=cu)                                 # ids [1, B·S/P], cu global
"""
from __future__ import annotations

import torch

from dist_attn.layout import check_layout, check_seq_len, position_ids, shard, unshard


def shard_batch(input_ids: torch.Tensor, labels: torch.Tensor, cp_rank: int, cp_size: int, layout: str):
    """``input_ids, labels [B, S]`` (global) -> ``(input_ids, labels, position_ids)``, each
    ``[B, S/P]`` for rank ``cp_rank`` of ``cp_size`` in ``layout`` ("zigzag" | "contiguous").

    ``position_ids`` are the global positions (what RoPE must see), expanded over the batch so that a
    pipeline can split micro-batches along dim 0.
    """
    check_layout(layout, "shard_batch(layout)")
    if input_ids.dim() != 2 or labels.shape != input_ids.shape:
        raise ValueError(f"shard_batch: expected input_ids and labels of one shape [B, S], got "
                         f"{tuple(input_ids.shape)} and {tuple(labels.shape)}. Fix: pass the global batch "
                         f"from the dataset's get_batch (labels shifted already).")
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"shard_batch: expected 0 <= cp_rank < cp_size, got cp_rank={cp_rank}, "
                         f"cp_size={cp_size}. Fix: pass cp.rank and cp.world_size of the CP group.")
    b, s = input_ids.shape
    check_seq_len(s, cp_size, layout, "shard_batch")
    ids = shard(input_ids, cp_rank, cp_size, layout, dim=1)
    lab = shard(labels, cp_rank, cp_size, layout, dim=1)
    pos = position_ids(s, cp_rank, cp_size, layout, device=input_ids.device)  # (S/P,)
    return ids, lab, pos.unsqueeze(0).expand(b, -1).contiguous()


def unshard_batch(parts: list, layout: str) -> torch.Tensor:
    """Inverse along the sequence: every rank's ``[B, S/P, ...]`` (rank order) -> ``[B, S, ...]``
    (e.g. to gather logits for evaluation)."""
    return unshard(list(parts), layout, dim=1)


def shard_packed(batch, cp_rank: int, cp_size: int, layout: str):
    """A global :class:`~dist_attn.data.packing.PackedBatch` (``[1, N]`` with N = B·S) -> this CP
    rank's ``PackedBatch``: ``input_ids``, ``labels``, ``position_ids`` ``[1, N/P]`` in ``layout``
    (labels were set before sharding, so no target crosses a shard edge), ``cu_seqlens`` unchanged:
    the global document offsets ``[0, e_1, ..., N]``, identical on every rank, as the strategies take
    them."""
    from dist_attn.data.packing import PackedBatch
    check_layout(layout, "shard_packed(layout)")
    ids, labels, pos, cu = batch
    if ids.dim() != 2 or ids.shape[0] != 1 or labels.shape != ids.shape or pos.shape != ids.shape:
        raise ValueError(f"shard_packed: expected input_ids, labels and position_ids of one shape [1, N], got "
                         f"{tuple(ids.shape)}, {tuple(labels.shape)}, {tuple(pos.shape)}. Fix: pass the "
                         f"PackedBatch of DocumentDataset.get_batch.")
    n = ids.shape[1]
    if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != n:
        raise ValueError(f"shard_packed: expected cu_seqlens [0, ..., {n}] (1-D), got {cu.tolist()}. "
                         f"Fix: pass the PackedBatch of DocumentDataset.get_batch unchanged.")
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"shard_packed: expected 0 <= cp_rank < cp_size, got cp_rank={cp_rank}, "
                         f"cp_size={cp_size}. Fix: pass cp.rank and cp.world_size of the CP group.")
    check_seq_len(n, cp_size, layout, "shard_packed")
    return PackedBatch(*(shard(t, cp_rank, cp_size, layout, dim=1) for t in (ids, labels, pos)), cu)
