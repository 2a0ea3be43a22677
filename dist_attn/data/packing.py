"""Packed documents (``data.documents=true``): batches whose attention and loss stop at document ends.

A token file from :mod:`dist_attn.data.prepare` reads ``doc_1 EOS doc_2 EOS ...``. The rows of a batch
are the same windows of S + 1 tokens as :class:`~dist_attn.data.memmap.TokenDataset` (random for
training, sequential for validation), so switching documents on changes the masks, not the data.
A micro-batch of B rows is delivered as ONE packed row of B·S tokens (:class:`PackedBatch`):

* ``input_ids [1, B·S]``: the rows, concatenated;
* ``cu_seqlens [n + 1]`` int32: global document offsets ``[0, e_1, ..., B·S]`` over the packed row. A
  document starts at every row start and after every EOS; the offsets are strictly increasing.
* ``labels [1, B·S]``: the next token, except :data:`IGNORE_INDEX` (-100, the ignore index of
  ``HybridLM.loss_sum``) where the next token belongs to another document, i.e. at every EOS: the
  last token of a document does not predict the first of the next. The token before an EOS predicts
  the EOS, so the model learns to end documents.
* ``position_ids [1, B·S]``: position inside the document, 0 at every document start (for RoPE).

Decisions:

* **EOS** ends a document and belongs to it (it is the document's last token, label -100).
* **A document longer than S, or cut by a window edge**, is split at the row boundary: the piece in
  the next row is a new document for attention (a new ``cu_seqlens`` entry, positions from 0); nothing
  is attended across rows. Likewise a window that starts inside a document starts a document. The
  last token of a row keeps its true next token as label (it is the same document in the file) unless
  it is an EOS.

CP sharding: :func:`dist_attn.data.sharding.shard_packed` shards ids, labels and positions along the
packed sequence with the layout; ``cu_seqlens`` stays global, identical on every rank.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from dist_attn.checks import fail
from dist_attn.data.memmap import TokenDataset

IGNORE_INDEX = -100


class PackedBatch(NamedTuple):
    """One packed row (global ``[1, B·S]``, or this CP rank's ``[1, B·S/P]`` after sharding)."""
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    """``[num_docs + 1]`` int32 global offsets over the packed row, the same on every CP rank."""


def pack_windows(windows: torch.Tensor, eos_id: int) -> PackedBatch:
    """``windows [B, S + 1]`` (inputs and their next tokens) -> the packed row of B·S tokens."""
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[1] < 2:
        fail("pack_windows", "windows of shape [B, S + 1] with S >= 1",
             f"{tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__}",
             "pass TokenDataset.windows(step, batch_size)")
    b, s = windows.shape[0], windows.shape[1] - 1
    x, nxt = windows[:, :-1], windows[:, 1:]
    is_eos = x == eos_id
    labels = nxt.masked_fill(is_eos, IGNORE_INDEX)
    starts = torch.zeros_like(is_eos)
    starts[:, 0] = True                 # every row starts a document (or a piece of one)
    starts[:, 1:] = is_eos[:, :-1]      # ... and so does the token after each EOS
    starts = starts.reshape(-1)
    idx = torch.arange(b * s)
    # position = distance to the last document start at or before the token
    last_start = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=0).values
    positions = idx - last_start
    cu = torch.cat([idx[starts], torch.tensor([b * s])]).to(torch.int32)
    return PackedBatch(x.reshape(1, -1).contiguous(), labels.reshape(1, -1).contiguous(),
                       positions.reshape(1, -1), cu)


class DocumentDataset:
    """``DocumentDataset(path, seq_len, dtype=None, seed=0, sequential=False, eos_id=None)``: the windows
    of :class:`TokenDataset` packed with their document boundaries.

    ``get_batch(step, batch_size, dp_rank=0, dp_size=1) -> PackedBatch`` (global along the sequence,
    ``[1, batch_size·S]``): a pure function of ``(seed, step, rows)`` like every dataset here;
    ``sequential=True`` for the validation stream. ``eos_id`` None reads it from the meta.
    """

    def __init__(self, path: str, seq_len: int, dtype: Optional[str] = None, seed: int = 0,
                 sequential: bool = False, eos_id: Optional[int] = None):
        self.tokens = TokenDataset(path, seq_len, dtype, seed=seed, sequential=sequential)
        eos_id = self.tokens.eos_id if eos_id is None else eos_id
        if not isinstance(eos_id, int) or eos_id < 0:
            fail("data.documents=true", f"an end-of-document id in {path}.json (eos_id)", repr(eos_id),
                 "re-run `python -m dist_attn.data.prepare` (it writes EOS between documents), "
                 "or pass eos_id=")
        self.eos_id = eos_id
        self.seq_len, self.vocab_size = seq_len, self.tokens.vocab_size
        self.num_windows = self.tokens.num_windows

    def get_batch(self, step: int, batch_size: int, *, dp_rank: int = 0, dp_size: int = 1) -> PackedBatch:
        w = self.tokens.windows(step, batch_size, dp_rank=dp_rank, dp_size=dp_size)
        return pack_windows(w, self.eos_id)


def open_dataset(path: str, seq_len: int, *, documents: bool, dtype: Optional[str] = None, seed: int = 0,
                 sequential: bool = False):
    """The dataset the trainer wants: :class:`DocumentDataset` (``get_batch`` -> :class:`PackedBatch`)
    when ``documents``, else :class:`TokenDataset` (``get_batch`` -> ``(input_ids, labels)``)."""
    if documents:
        return DocumentDataset(path, seq_len, dtype, seed=seed, sequential=sequential)
    return TokenDataset(path, seq_len, dtype, seed=seed, sequential=sequential)


def validation_dataset(data_path: Optional[str], seq_len: int, *, val_path: Optional[str] = None,
                       documents: bool = False, dtype: Optional[str] = None):
    """The fixed validation stream (sequential windows, same every call, independent of training
    progress, seed and restarts) of ``val_path`` or of the held-out file beside ``data_path``
    (``prepare --val-fraction``); None when there is neither."""
    from dist_attn.data.memmap import resolve_val_path
    path = resolve_val_path(data_path, val_path)
    if path is None:
        return None
    return open_dataset(path, seq_len, documents=documents, dtype=dtype, sequential=True)
