"""Multi-query associative recall (MQAR, "Zoology", Arora et al. 2023), generated on the fly.

Each sequence first lists ``num_kv_pairs`` key-value pairs, then, after filler, asks for some of the
keys again; the model must emit the value that followed the key at the start. Softmax attention
solves it with an induction head at any distance; a linear layer with decay must keep every pair in
its Dk x Dv state, which is why hybrids need a few full layers.

Vocabulary (V = ``vocab_size``): 0 is the filler token, keys are ``[1, 1 + K)`` with K = (V-1)//2,
values are ``[1 + K, V)``. Layout of one sequence of S tokens with n pairs and q queries::

    k1 v1 k2 v2 ... kn vn   0 0 kq vq 0 0 0 kq' vq' 0 ...      (queries at random even offsets)
    labels: -100 everywhere except at a query key position, where label = its value

``labels[t]`` is the target for the token *after* position t (already shifted, like the language
model data), and the value token also follows the query key in the input, so the answer is next-token
prediction. Every sequence is a pure function of ``(seed, step, index in the global batch)``, so a run
resumed at step t sees the batches it would have seen, whatever the number of data-parallel ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from dist_attn.checks import fail

IGNORE_INDEX = -100
FILLER = 0



@dataclass
class MQARDataset:
    """Reproducible MQAR batches. The defaults are sized so that a tiny hybrid model (d_model 64, 4
    layers ``LLLF``) learns the task in a few hundred CPU steps: see ``tests/test_data.py`` and the
    README's demo for the measured curve."""
    vocab_size: int = 64
    """V; must not exceed the model's vocabulary."""
    seq_len: int = 64
    """S, the global sequence length (before CP sharding)."""
    num_kv_pairs: int = 4
    """n pairs listed at the start of each sequence."""
    num_queries: Optional[int] = None
    """q <= n keys asked again later (distinct keys, random order). None: n (every pair is queried)."""
    seed: int = 0
    """Base seed; batch ``step`` depends only on (seed, step)."""

    def __post_init__(self):
        n, q = self.num_kv_pairs, self.queries
        n_keys = (self.vocab_size - 1) // 2
        if self.vocab_size < 3:
            fail("MQARDataset.vocab_size", ">= 3 (filler, keys, values)", self.vocab_size, "use e.g. 64")
        if n < 1 or n > n_keys:
            fail("MQARDataset.num_kv_pairs", f"1..{n_keys} distinct keys for vocab_size={self.vocab_size}", n,
                  "lower num_kv_pairs or raise vocab_size (keys take half of the non-filler tokens)")
        if q < 1 or q > n:
            fail("MQARDataset.num_queries", f"1..num_kv_pairs={n}", q, "query at most every key once")
        if 2 * n + 2 * q > self.seq_len:
            fail("MQARDataset.seq_len", f">= 2*num_kv_pairs + 2*num_queries = {2 * n + 2 * q}", self.seq_len,
                  "raise seq_len or lower num_kv_pairs / num_queries")

    @property
    def queries(self) -> int:
        return self.num_kv_pairs if self.num_queries is None else self.num_queries

    def sequence(self, step: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Sequence ``index`` of the global batch at ``step``: ``(tokens [S], labels [S])`` int64."""
        rng = np.random.default_rng([self.seed, step, index])
        s, n, q = self.seq_len, self.num_kv_pairs, self.queries
        n_keys = (self.vocab_size - 1) // 2
        keys = 1 + rng.choice(n_keys, size=n, replace=False)
        values = 1 + n_keys + rng.integers(0, self.vocab_size - 1 - n_keys, size=n)
        tokens = np.full(s, FILLER, dtype=np.int64)
        labels = np.full(s, IGNORE_INDEX, dtype=np.int64)
        tokens[0:2 * n:2], tokens[1:2 * n:2] = keys, values
        # query slots: pairs (p, p+1) at even offsets after the context, never overlapping
        n_slots = (s - 2 * n) // 2
        slots = np.sort(rng.choice(n_slots, size=q, replace=False))
        pos = 2 * n + 2 * slots
        which = rng.permutation(n)[:q]
        tokens[pos], tokens[pos + 1] = keys[which], values[which]
        labels[pos] = values[which]  # at the key, predict the value that follows it
        return tokens, labels

    def get_batch(self, step: int, batch_size: int, *, dp_rank: int = 0, dp_size: int = 1):
        """This data-parallel rank's ``batch_size`` sequences of the global batch at ``step``.

        The global batch is ``batch_size * dp_size`` sequences; rank r takes rows
        ``[r * batch_size, (r+1) * batch_size)``. Returns ``(input_ids [B, S], labels [B, S])`` long,
        both global along the sequence (shard them with :func:`dist_attn.data.sharding.shard_batch`).
        """
        if not 0 <= dp_rank < dp_size or batch_size < 1 or step < 0:
            fail("MQARDataset.get_batch", "step >= 0, batch_size >= 1 and 0 <= dp_rank < dp_size",
                  (step, batch_size, dp_rank, dp_size), "pass this rank's data-parallel rank and world size")
        rows = [self.sequence(step, dp_rank * batch_size + i) for i in range(batch_size)]
        tokens = torch.from_numpy(np.stack([r[0] for r in rows]))
        labels = torch.from_numpy(np.stack([r[1] for r in rows]))
        return tokens, labels


def recall_accuracy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX):
    """Greedy recall over the labelled positions: ``logits [B, S/P, V]``, ``labels [B, S/P]`` ->
    ``(correct, total)`` long scalars (tensors, so the trainer can all-reduce them over CP/DP ranks;
    accuracy = sum(correct) / sum(total))."""
    if logits.shape[:-1] != labels.shape:
        fail("recall_accuracy", f"labels of shape {tuple(logits.shape[:-1])}", tuple(labels.shape),
              "pass the labels sharded like the logits")
    mask = labels != ignore_index
    correct = ((logits.argmax(dim=-1) == labels) & mask).sum()
    return correct, mask.sum()
