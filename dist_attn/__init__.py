"""dist_attn: context-parallel attention for long-context training.

Layout everywhere: ``[batch, seq, heads, head_dim]``; on a rank of a CP group of size P the local
tensors are ``[B, S/P, H, D]`` in the ``contiguous`` or ``zigzag`` layout (see :mod:`dist_attn.layout`).
"""
from dist_attn.comm import CommRecorder
from dist_attn.layout import LAYOUTS, position_ids, shard, unshard

__all__ = ["CommRecorder", "LAYOUTS", "position_ids", "shard", "unshard"]
