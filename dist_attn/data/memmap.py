"""A memory-mapped token file (written by :mod:`dist_attn.data.prepare`) as reproducible LM batches.

File format: ``PATH`` holds the raw token ids (little-endian uint16 or uint32, no header) and
``PATH.json`` the meta data (dtype, num_tokens, vocab_size, eos_id, num_documents, tokenizer; see
:mod:`dist_attn.data.prepare`). Files from ``prepare`` end every document with the EOS id. Beside it:
``PATH.val`` (+ ``PATH.val.json``), the held-out documents (``prepare --val-fraction``), and
``PATH.tokenizer.json`` (``prepare --train-tokenizer``). Nothing is read into memory but the windows a
batch needs.

Each sequence of a batch is a window of S + 1 tokens: ``input_ids = w[:-1]``, ``labels = w[1:]``
(labels shifted globally, before any CP sharding).

* training (default): a random window whose start is a pure function of ``(seed, step, index in the
  global batch)``, so a run resumed at step t sees the same data, whatever the number of DP ranks;
* ``sequential=True`` (validation): global row g of batch ``step`` is window
  ``k = (step * global_batch + g) mod num_windows`` = tokens ``[k S, k S + S + 1)``: consecutive,
  non-overlapping windows that predict every token of the file once, the same on every call, whatever
  the seed, the training step or a restart.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import torch

from dist_attn.checks import fail

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
META_SUFFIX = ".json"
VAL_SUFFIX = ".val"
TOKENIZER_SUFFIX = ".tokenizer.json"


def val_path_for(path: str) -> str:
    """Where ``prepare --val-fraction`` writes the held-out documents of token file ``path``."""
    return os.fspath(path) + VAL_SUFFIX



def read_meta(path: str) -> Optional[dict]:
    """The JSON meta next to a token file, or None if there is none."""
    meta_path = path + META_SUFFIX
    if not os.path.exists(meta_path):
        return None
    try:
        with open(meta_path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        fail("TokenDataset", f"readable JSON meta at {meta_path}", str(e),
              "re-run `python -m dist_attn.data.prepare` to rewrite it")


def vocab_size_from_meta(path: str) -> int:
    """The vocabulary size recorded in token file ``path``'s meta (for ``model.vocab_size=auto``)."""
    meta = read_meta(os.fspath(path))
    if meta is None or not isinstance(meta.get("vocab_size"), int):
        fail("model.vocab_size=auto", f"a vocab_size in {os.fspath(path) + META_SUFFIX}",
              None if meta is None else meta.get("vocab_size"),
              "write the token file with `python -m dist_attn.data.prepare`, or set model.vocab_size=N")
    return meta["vocab_size"]


def eos_id_from_meta(path: str) -> Optional[int]:
    """The end-of-document id recorded in ``path``'s meta (None: no meta, or an older file without EOS)."""
    return (read_meta(os.fspath(path)) or {}).get("eos_id")


def resolve_val_path(data_path: Optional[str], val_path: Optional[str] = None) -> Optional[str]:
    """The validation token file: ``val_path`` if given (it must exist), else the held-out file that
    ``prepare --val-fraction`` wrote beside ``data_path`` if there is one, else None."""
    if val_path:
        if not os.path.isfile(val_path):
            fail("data.val_path", "an existing token file", val_path,
                  "write one with `python -m dist_attn.data.prepare --val-fraction F` (it is OUTPUT.val)")
        return os.fspath(val_path)
    if data_path:
        meta = read_meta(os.fspath(data_path)) or {}
        for cand in (val_path_for(data_path), meta.get("val_path")):  # beside it (moved directories) first
            if cand and os.path.isfile(cand):
                return cand
    return None


class TokenDataset:
    """``TokenDataset(path, seq_len, dtype=None, seed=0, sequential=False)``: windows of a token file.

    ``dtype`` is ``"uint16"`` or ``"uint32"``; None takes it from ``PATH.json`` (a given dtype must
    agree with the meta). ``vocab_size`` and ``eos_id`` come from the meta (None without one).
    ``sequential=True`` gives the fixed validation windows (module docstring).
    """

    def __init__(self, path: str, seq_len: int, dtype: Optional[str] = None, seed: int = 0,
                 sequential: bool = False):
        path = os.fspath(path)
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            fail("TokenDataset.path", "a readable token file", path,
                  "write one with `python -m dist_attn.data.prepare --input FILES --output PATH`")
        meta = read_meta(path) or {}
        if dtype is None:
            dtype = meta.get("dtype")
            if dtype is None:
                fail("TokenDataset.dtype", "'uint16' or 'uint32' (no PATH.json meta to read it from)", None,
                      "pass dtype=... or write the file with dist_attn.data.prepare")
        if dtype not in DTYPES:
            fail("TokenDataset.dtype", f"one of {sorted(DTYPES)}", dtype, "use uint16 for vocabularies <= 65536")
        if meta.get("dtype", dtype) != dtype:
            fail("TokenDataset.dtype", f"{meta['dtype']!r} as recorded in {path + META_SUFFIX}", dtype,
                  "drop the dtype argument to use the recorded one")
        if not isinstance(seq_len, int) or seq_len < 1:
            fail("TokenDataset.seq_len", "a positive int", seq_len, "pass the global sequence length S")
        itemsize = np.dtype(DTYPES[dtype]).itemsize
        size = os.path.getsize(path)
        if size % itemsize != 0:
            fail("TokenDataset", f"a file size that is a multiple of {itemsize} bytes ({dtype})", size,
                  "check the dtype (uint16 vs uint32) or re-run prepare")
        self.num_tokens = size // itemsize
        if self.num_tokens < seq_len + 1:
            fail("TokenDataset", f"at least seq_len + 1 = {seq_len + 1} tokens in {path}", self.num_tokens,
                  "prepare more text or lower seq_len")
        self.path, self.seq_len, self.dtype, self.seed = path, seq_len, dtype, seed
        self.sequential = bool(sequential)
        self.vocab_size = meta.get("vocab_size")
        self.eos_id = meta.get("eos_id")
        self.num_documents = meta.get("num_documents")
        self.num_windows = (self.num_tokens - 1) // seq_len  # sequential windows [kS, kS + S + 1)
        self.tokens = np.memmap(path, dtype=DTYPES[dtype], mode="r", shape=(self.num_tokens,))

    def window(self, step: int, index: int, global_batch: int = 1) -> np.ndarray:
        """The S + 1 tokens of row ``index`` of the global batch (of ``global_batch`` rows; only the
        sequential windows depend on it) at ``step`` (int64)."""
        if self.sequential:
            start = ((step * global_batch + index) % self.num_windows) * self.seq_len
        else:
            rng = np.random.default_rng([self.seed, step, index])
            start = int(rng.integers(0, self.num_tokens - self.seq_len))  # start + S + 1 <= num_tokens
        return self.tokens[start:start + self.seq_len + 1].astype(np.int64)

    def windows(self, step: int, batch_size: int, *, dp_rank: int = 0, dp_size: int = 1) -> torch.Tensor:
        """This data-parallel rank's rows ``[dp_rank * B, (dp_rank + 1) * B)`` of the global batch at
        ``step``, as ``[B, S + 1]`` long windows (inputs and their next tokens)."""
        if not 0 <= dp_rank < dp_size or batch_size < 1 or step < 0:
            fail(f"{type(self).__name__}.get_batch", "step >= 0, batch_size >= 1 and 0 <= dp_rank < dp_size",
                  (step, batch_size, dp_rank, dp_size), "pass this rank's data-parallel rank and world size")
        g = batch_size * dp_size
        return torch.from_numpy(np.stack([self.window(step, dp_rank * batch_size + i, g)
                                          for i in range(batch_size)]))

    def get_batch(self, step: int, batch_size: int, *, dp_rank: int = 0, dp_size: int = 1):
        """This data-parallel rank's rows of the global batch at ``step``: ``(input_ids [B, S],
        labels [B, S])`` long, labels already shifted by one token."""
        w = self.windows(step, batch_size, dp_rank=dp_rank, dp_size=dp_size)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()
