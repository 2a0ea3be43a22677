"""dist_attn: context-parallel attention for long-context training.

Layout everywhere: ``[batch, seq, heads, head_dim]``; on a rank of a CP group of size P the local
tensors are ``[B, S/P, H, D]`` in the ``contiguous`` or ``zigzag`` layout (see :mod:`dist_attn.layout`).

One import root: the local kernels are :mod:`dist_attn.kernels`, the engine adapters
:mod:`dist_attn.parallel` (imported only by the entry point), the Hydra configs :mod:`dist_attn.configs`.
"""
from dist_attn.allgather import allgather_attention
from dist_attn.comm import CommRecorder
from dist_attn.context import CPContext
from dist_attn.gated_delta import gated_delta_attention
from dist_attn.groups import make_usp_groups
from dist_attn.lasp2 import lasp2_attention
from dist_attn.layout import LAYOUTS, position_ids, shard, unshard
from dist_attn.ring import ring_attention
from dist_attn.ulysses import ulysses_attention
from dist_attn.usp import usp_attention

__all__ = [
    "ring_attention", "allgather_attention", "ulysses_attention", "usp_attention", "lasp2_attention",
    "gated_delta_attention",
    "make_usp_groups", "CPContext", "CommRecorder", "LAYOUTS", "position_ids", "shard", "unshard",
]
