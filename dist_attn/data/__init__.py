"""Training data: synthetic MQAR, token files (and how to make them), packed documents, CP sharding.

* :class:`MQARDataset` / :func:`recall_accuracy` -- multi-query associative recall, made on the fly.
* ``python -m dist_attn.data.prepare`` -- a corpus (text files, directories, JSON Lines, Parquet) into a
  token file with an EOS after every document, its meta data and an optional held-out file.
* :class:`TokenDataset` -- windows of such a file (random for training, ``sequential=True`` for validation).
* :class:`DocumentDataset` / :func:`pack_windows` -- the same windows as one packed row with
  ``cu_seqlens``, document-local positions and no loss across documents (``data.documents=true``).
* :func:`shard_batch` / :func:`shard_packed` -- a global batch -> this CP rank's shard in the layout.

Every dataset has ``get_batch(step, batch_size, *, dp_rank=0, dp_size=1)``, a pure function of
(seed, step): resuming at a step reproduces the data.
"""
from dist_attn.data.memmap import (TokenDataset, eos_id_from_meta, resolve_val_path, val_path_for,
                                   vocab_size_from_meta)
from dist_attn.data.mqar import MQARDataset, recall_accuracy
from dist_attn.data.packing import (IGNORE_INDEX, DocumentDataset, PackedBatch, open_dataset, pack_windows,
                                    validation_dataset)
from dist_attn.data.sharding import shard_batch, shard_packed, unshard_batch

__all__ = ["MQARDataset", "recall_accuracy", "TokenDataset", "DocumentDataset", "PackedBatch", "pack_windows",
           "open_dataset", "validation_dataset", "shard_batch", "shard_packed", "unshard_batch",
           "vocab_size_from_meta", "eos_id_from_meta", "resolve_val_path", "val_path_for", "IGNORE_INDEX"]
