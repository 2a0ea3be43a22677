"""Training data: synthetic MQAR, memory-mapped token files, and CP sharding of a batch.

* :class:`MQARDataset` / :func:`recall_accuracy` -- multi-query associative recall, made on the fly.
* :class:`TokenDataset` -- windows of a token file written by ``python -m dist_attn.data.prepare``.
* :func:`shard_batch` -- a global ``[B, S]`` batch -> this CP rank's ``[B, S/P]`` ids, labels, positions.

Both datasets share ``get_batch(step, batch_size, *, dp_rank=0, dp_size=1) -> (input_ids, labels)``,
a pure function of (seed, step): resuming at a step reproduces the data.
"""
from dist_attn.data.memmap import TokenDataset
from dist_attn.data.mqar import MQARDataset, recall_accuracy
from dist_attn.data.sharding import shard_batch, unshard_batch

__all__ = ["MQARDataset", "recall_accuracy", "TokenDataset", "shard_batch", "unshard_batch"]
