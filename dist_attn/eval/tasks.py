"""Recall prompts: a needle (key -> value) at a chosen depth of a long filler, the question at the end.

Every prompt is ``L`` tokens exactly, answers included (teacher forcing: one forward pass scores it)::

    [ filler (round(d·F) tokens) | needle | filler (the rest of F) | query | answer ]      (passkey)
    [ 0 ... 0 | k1 v1 ... kn vn | 0 ... 0 | kq1 vq1 kq2 vq2 ... ]                            (mqar)

with ``F`` the filler length (``L`` minus needle, query and answer) and ``d`` in [0, 1] the depth:
0 puts the needle first, 1 right before the query. A prompt holds one or more *items* (passkey: one,
the value's tokens; mqar: one per queried key); an item is recalled when the model's greedy
next-token prediction is right at every one of its answer positions: ``argmax logits[pos_j] ==
target_j`` with ``target_j = input_ids[pos_j + 1]``.

Determinism: the filler, keys and values of sample ``i`` at length ``L`` come from
``numpy.random.default_rng([seed, L, i])``: a pure function of (seed, L, i), shared by every depth,
so across a row of the heat map only the needle's position changes.

Tasks (:func:`make_task` picks one by name):

* ``passkey`` (:class:`PasskeyTask`): the text "The pass key of {word} is {5 digits}." in filler, asked
  back at the end; text is encoded by the data's tokenizer (byte level, or a ``tokenizer.json``). The
  filler is a seeded slice of the validation token stream when there is one (:class:`StreamFiller`),
  else seeded pseudo-English text (:class:`SyntheticTextFiller`, needs no data file). Needs a model
  whose vocabulary holds the tokenizer's ids (byte level: >= 256): a language model.
* ``mqar`` (:class:`MQARProbe`): the training format of :mod:`dist_attn.data.mqar` (filler 0, keys
  ``[1, 1+K)``, values ``[1+K, V)``) with the key-value block at depth d and every pair queried at
  the end: the length curve of a model trained on the embedded MQAR task (e.g. the tiny main job).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from dist_attn.checks import fail

MQAR_FILLER = 0  # dist_attn.data.mqar.FILLER


@dataclass(frozen=True)
class RecallPrompt:
    """One prompt. ``answer_pos[i, j]``: the position whose logits must predict ``answer_ids[i, j]``
    (= ``input_ids[answer_pos[i, j] + 1]``) for item i to count as recalled."""
    input_ids: np.ndarray    # [L] int64
    answer_pos: np.ndarray   # [items, tokens per item] int64
    answer_ids: np.ndarray   # [items, tokens per item] int64
    needle_start: int        # first token of the needle (passkey) / key-value block (mqar)
    needle_len: int
    filler_len: int          # F: filler tokens in all (before and after the needle)


def sample_rng(seed: int, length: int, sample: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(length), int(sample)])


def needle_offset(depth: float, free: int, align: int = 1) -> int:
    """Where the needle starts: ``round(depth · free)`` filler tokens before it (rounded down to a
    multiple of ``align``), ``free`` being the total filler length."""
    return (int(round(depth * free)) // align) * align


def _assemble(filler: np.ndarray, depth: float, needle: np.ndarray, tail: np.ndarray, align: int = 1):
    at = needle_offset(depth, len(filler), align)
    ids = np.concatenate([filler[:at], needle, filler[at:], tail]).astype(np.int64)
    return ids, at


# ---------------------------------------------------------------------------------- text and filler
class Encoder:
    """Text -> token ids: the byte level of :mod:`dist_attn.data.prepare` (``path=None``), or a local
    ``tokenizer.json`` (Hugging Face ``tokenizers``; special-token text is encoded as text)."""

    def __init__(self, path: Optional[str] = None):
        self.path = path
        self._tok = None
        if path not in (None, "byte"):
            if not os.path.isfile(path):
                fail("recall task passkey", "the tokenizer.json of the token file", repr(path),
                     "pass --tokenizer PATH (prepare writes OUTPUT.tokenizer.json), or use task=mqar")
            import tokenizers
            self._tok = tokenizers.Tokenizer.from_file(path)
            self._tok.encode_special_tokens = True
        self.vocab_size = 256 if self._tok is None else self._tok.get_vocab_size(with_added_tokens=True)

    def __call__(self, text: str) -> np.ndarray:
        if self._tok is None:
            return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int64)
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int64)


class StreamFiller:
    """``take(n, rng)``: ``n`` consecutive tokens of a token stream (the validation file's memmap),
    starting at a seeded offset; a stream shorter than ``n`` is repeated."""

    def __init__(self, tokens):
        if len(tokens) < 1:
            fail("recall filler", "a non-empty token stream", len(tokens), "prepare a validation file")
        self.tokens = tokens

    def take(self, n: int, rng: np.random.Generator) -> np.ndarray:
        total = len(self.tokens)
        start = int(rng.integers(0, max(total - n, 0) + 1))
        if n <= total:
            return np.asarray(self.tokens[start:start + n], np.int64)
        reps = -(-n // total)
        return np.tile(np.asarray(self.tokens, np.int64), reps)[:n]


_SYLLABLES = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"]


class SyntheticTextFiller:
    """Seeded pseudo-English (words of 1-3 syllables, sentences of 4-12 words), encoded: filler that
    needs no data file. ``take(n, rng)`` encodes text until it has ``n`` tokens and cuts there."""

    def __init__(self, encode: Callable[[str], np.ndarray]):
        self.encode = encode

    def take(self, n: int, rng: np.random.Generator) -> np.ndarray:
        parts, have = [], 0
        while have < n:
            words = []
            for _ in range(int(rng.integers(4, 13))):
                k = int(rng.integers(1, 4))
                words.append("".join(_SYLLABLES[i] for i in rng.integers(0, len(_SYLLABLES), k)))
            ids = self.encode(" " + " ".join(words).capitalize() + ".")
            parts.append(ids)
            have += len(ids)
        return np.concatenate(parts)[:n]


# ---------------------------------------------------------------------------------- tasks
class PasskeyTask:
    """Key-value passkey retrieval in filler (module docstring). One item per prompt: every token of
    ``" {value}"`` must be predicted. ``chance`` = 10^-digits (guessing the digits)."""
    name = "passkey"

    def __init__(self, encoder: Encoder, filler, digits: int = 5, filler_name: str = ""):
        if not 1 <= digits <= 12:
            fail("PasskeyTask.digits", "1..12", digits, "use 5 (the usual pass key)")
        self.encode, self.filler, self.digits, self.filler_name = encoder, filler, digits, filler_name
        self.chance = 10.0 ** -digits

    def _parts(self, rng):
        key = "".join(_SYLLABLES[i] for i in rng.integers(0, len(_SYLLABLES), 2))
        value = "".join(str(d) for d in [int(rng.integers(1, 10))] + list(rng.integers(0, 10, self.digits - 1)))
        needle = self.encode(f" The pass key of {key} is {value}. Remember it.")
        query = self.encode(f" What is the pass key of {key}? The pass key of {key} is")
        answer = self.encode(f" {value}")
        return needle, query, answer

    def min_length(self) -> int:
        return sum(len(p) for p in self._parts(sample_rng(0, 0, 0))) + 8

    def prompt(self, length: int, depth: float, seed: int, sample: int) -> RecallPrompt:
        rng = sample_rng(seed, length, sample)
        needle, query, answer = self._parts(rng)
        free = length - len(needle) - len(query) - len(answer)
        if free < 0:
            fail("recall passkey", f"a context length >= {length - free} (needle, question and answer)", length,
                 "evaluate longer contexts")
        ids, at = _assemble(self.filler.take(free, rng), depth, needle, np.concatenate([query, answer]))
        pos = np.arange(length - len(answer) - 1, length - 1)[None]
        return RecallPrompt(ids, pos, ids[pos + 1], at, len(needle), free)

    def describe(self) -> dict:
        return dict(name=self.name, digits=self.digits, filler=self.filler_name, chance=self.chance)


class MQARProbe:
    """MQAR at length L (module docstring): ``num_kv_pairs`` pairs at depth d (an even offset, as in
    training), then every pair's key and value again at the end in a random order; one item per query
    (its value predicted at the key). ``chance`` = 1 / number of values."""
    name = "mqar"

    def __init__(self, vocab_size: int = 16, num_kv_pairs: int = 4):
        n_keys = (vocab_size - 1) // 2
        if vocab_size < 3 or not 1 <= num_kv_pairs <= n_keys:
            fail("MQARProbe", f"vocab_size >= 3 and 1 <= num_kv_pairs <= (vocab_size - 1) // 2 = {n_keys}",
                 (vocab_size, num_kv_pairs), "use the data.vocab_size / data.num_kv_pairs the model was trained on")
        self.vocab_size, self.num_kv_pairs, self.n_keys = vocab_size, num_kv_pairs, n_keys
        self.chance = 1.0 / (vocab_size - 1 - n_keys)

    def min_length(self) -> int:
        return 4 * self.num_kv_pairs

    def prompt(self, length: int, depth: float, seed: int, sample: int) -> RecallPrompt:
        rng = sample_rng(seed, length, sample)
        n, v, k = self.num_kv_pairs, self.vocab_size, self.n_keys
        if length < self.min_length() or length % 2:
            fail("recall mqar", f"an even context length >= {self.min_length()}", length, "use e.g. 1024")
        keys = 1 + rng.choice(k, size=n, replace=False)
        values = 1 + k + rng.integers(0, v - 1 - k, size=n)
        which = rng.permutation(n)
        block = np.stack([keys, values], 1).reshape(-1)
        tail = np.stack([keys[which], values[which]], 1).reshape(-1)
        filler = np.full(length - 4 * n, MQAR_FILLER, np.int64)
        ids, at = _assemble(filler, depth, block, tail, align=2)
        pos = (length - 2 * n + 2 * np.arange(n))[:, None]  # each query key predicts its value
        return RecallPrompt(ids, pos, ids[pos + 1], at, 2 * n, len(filler))

    def describe(self) -> dict:
        return dict(name=self.name, vocab_size=self.vocab_size, num_kv_pairs=self.num_kv_pairs, chance=self.chance)


TASKS = ("passkey", "mqar")


def make_task(name: str, *, vocab_size: int, data_path: Optional[str] = None, val_path: Optional[str] = None,
              tokenizer: Optional[str] = None, num_kv_pairs: int = 4, mqar_vocab_size: Optional[int] = None,
              digits: int = 5):
    """The task ``name`` for a model of ``vocab_size`` ids.

    ``passkey``: filler from the validation stream of ``data_path`` / ``val_path``
    (:func:`dist_attn.data.resolve_val_path`) if there is one, else synthetic text; the tokenizer is
    ``tokenizer`` or the one recorded in the token file's meta (byte level when neither).
    ``mqar``: keys and values of an MQAR vocabulary of ``mqar_vocab_size`` (default ``vocab_size``).
    """
    if name == "mqar":
        return MQARProbe(mqar_vocab_size or vocab_size, num_kv_pairs)
    if name != "passkey":
        fail("recall task", f"one of {TASKS}", repr(name), "pass task=passkey (text) or task=mqar (MQAR models)")
    from dist_attn.data.memmap import TokenDataset, read_meta, resolve_val_path
    path = resolve_val_path(data_path, val_path)
    meta = (read_meta(path) or {}) if path else ((read_meta(data_path) or {}) if data_path else {})
    encoder = Encoder(tokenizer or meta.get("tokenizer"))
    if encoder.vocab_size > vocab_size:
        fail("recall task passkey", f"a model vocabulary >= the tokenizer's {encoder.vocab_size} ids", vocab_size,
             "evaluate a language model trained on this tokenizer, or use task=mqar for an MQAR model")
    if path is not None:
        filler, filler_name = StreamFiller(TokenDataset(path, 1, sequential=True).tokens), f"stream:{path}"
    else:
        filler, filler_name = SyntheticTextFiller(encoder), "synthetic"
    return PasskeyTask(encoder, filler, digits, filler_name)


def check_lengths(task, lengths: Sequence[int], depths: Sequence[float], max_len: int, chunks: int = 1) -> None:
    """Host-only checks (same on every rank, before any collective): lengths within ``[task minimum,
    max_len]`` and divisible by ``chunks`` (the CP layout's 2P or P), depths in [0, 1]."""
    if not lengths or not depths:
        fail("recall", "at least one length and one depth", (list(lengths), list(depths)), "pass both lists")
    lo = task.min_length()
    for n in lengths:
        if not isinstance(n, (int, np.integer)) or not lo <= n <= max_len or n % chunks:
            fail("recall lengths", f"ints in [{lo}, max_seq_len={max_len}] divisible by {chunks} (CP layout)", n,
                 "drop it, or raise model.max_seq_len (lengths like 1024, 2048, ... fit every layout)")
    for d in depths:
        if not 0.0 <= float(d) <= 1.0:
            fail("recall depths", "fractions in [0, 1]", d, "use e.g. 0, 0.25, 0.5, 0.75, 1")
