"""Tokenizers for :mod:`dist_attn.data.prepare`: byte level, a local ``tokenizer.json``, or a byte-level BPE
trained on the corpus; and the worker that turns a chunk of documents into token ids.

End of document (EOS). Every document is written as its tokens followed by one EOS id, so the EOS
*belongs to the document it ends* and the file reads ``doc_1 EOS doc_2 EOS ... doc_n EOS``:

* byte level: ids 0..255 are the bytes, EOS = 256, vocabulary 257;
* a ``tokenizer.json``: EOS is ``--eos-token`` or the first of :data:`EOS_CANDIDATES` in its vocabulary;
  if it has none, EOS is a new id equal to the tokenizer's vocabulary size (vocabulary + 1);
* ``--train-tokenizer V``: byte-level BPE (every byte is in the initial alphabet, so any text encodes
  and ``decode(encode(text)) == text``), with ``<|endoftext|>`` as special token 0, vocabulary V.

Special-token *text* inside a document (a literal ``<|endoftext|>``) is encoded as ordinary text, so
an EOS id in the file is always a real document end.

Validation split by document: a document goes to validation when ``split_draw(its UTF-8 bytes, seed)
< val_fraction``. The draw hashes the content, so it is deterministic, independent of the worker count
and of the order of the inputs, and exact duplicates always land on the same side.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from dist_attn.checks import fail
from dist_attn.data.sources import Doc

EOS_TOKEN = "<|endoftext|>"
EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
BYTE_VOCAB = 257  # 256 bytes + EOS


@dataclass(frozen=True)
class TokenizerSpec:
    """What a worker needs to encode, and what the meta data records."""
    kind: str                 # "byte" | "hf"
    name: str                 # "byte" or the absolute path of the tokenizer.json
    vocab_size: int           # including EOS
    eos_id: int
    eos_token: Optional[str]  # None: byte level, or an EOS id added past the tokenizer's vocabulary
    json: Optional[str] = None  # the tokenizer.json text (hf)

    @property
    def dtype(self) -> str:
        """Smallest unsigned type for the ids: uint16 up to 65536 ids, else uint32."""
        return "uint16" if self.vocab_size <= 1 << 16 else "uint32"


def byte_spec() -> TokenizerSpec:
    return TokenizerSpec("byte", "byte", BYTE_VOCAB, 256, None)


def _import_tokenizers(where: str):
    try:
        import tokenizers
    except ImportError:
        fail(where, "the `tokenizers` package", "it is not installed",
             "pip install tokenizers (nothing is downloaded at run time), or use the byte-level default")
    return tokenizers


def spec_from_tokenizer(tok, name: str, eos_token: Optional[str] = None) -> TokenizerSpec:
    """Spec of a ``tokenizers.Tokenizer``; ``eos_token`` None picks one of :data:`EOS_CANDIDATES`."""
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if eos_token is not None:
        eos_id = tok.token_to_id(eos_token)
        if eos_id is None:
            fail("prepare --eos-token", f"a token of the tokenizer's vocabulary ({name})", repr(eos_token),
                 f"pass one it has (e.g. {EOS_CANDIDATES[0]!r} or '</s>'), or omit --eos-token")
    else:
        eos_token = next((t for t in EOS_CANDIDATES if tok.token_to_id(t) is not None), None)
        eos_id = tok.token_to_id(eos_token) if eos_token is not None else vocab  # a new id past the vocab
    return TokenizerSpec("hf", name, max(vocab, eos_id + 1), eos_id, eos_token, tok.to_str())


def load_spec(path: str, eos_token: Optional[str] = None) -> TokenizerSpec:
    """A local ``tokenizer.json`` (never downloaded)."""
    if not os.path.isfile(path):
        fail("prepare --tokenizer", "the path of a local tokenizer.json", repr(path),
             "pass an existing file (nothing is downloaded), --train-tokenizer VOCAB, or no --tokenizer for bytes")
    tokenizers = _import_tokenizers("prepare --tokenizer")
    try:
        tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - the library raises its own exception type
        fail("prepare --tokenizer", "a valid Hugging Face tokenizer.json", f"{path}: {e}",
             "point at the tokenizer.json file of a tokenizers/transformers model")
    return spec_from_tokenizer(tok, os.path.abspath(path), eos_token)


def train_bpe(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` of ``vocab_size`` ids trained on ``texts`` (streamed)."""
    if vocab_size < BYTE_VOCAB:
        fail("prepare --train-tokenizer", f"a vocabulary of at least {BYTE_VOCAB} (256 bytes + EOS)", vocab_size,
             "pass e.g. --train-tokenizer 8192")
    tk = _import_tokenizers("prepare --train-tokenizer")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def split_draw(data: bytes, seed: int) -> float:
    """A uniform number in [0, 1) from the document's bytes and the seed (the validation draw)."""
    h = hashlib.blake2b(data, digest_size=8, key=str(int(seed)).encode()[:64])
    return int.from_bytes(h.digest(), "little") / 2.0 ** 64


class DocError(Exception):
    """A document that cannot be read (message without the location)."""


def read_document(doc: Doc, want_text: bool) -> tuple:
    """``(UTF-8 bytes, text or None)`` of a document; raises :class:`DocError` if unreadable."""
    if doc.text is not None:
        return doc.text.encode("utf-8"), doc.text
    try:
        with open(doc.path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DocError(f"cannot read: {e}") from None
    if not want_text:
        return data, None
    try:
        return data, data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DocError(f"not UTF-8 text ({e}); convert it or use the byte-level tokenizer") from None


# ---------------------------------------------------------------- worker side (one per process)
_STATE: dict = {}


def init_worker(spec: TokenizerSpec, seed: int) -> None:
    """Process initialiser: build the encoder once per worker."""
    _STATE.clear()
    _STATE.update(spec=spec, seed=seed, dtype=np.dtype(spec.dtype).newbyteorder("<"))
    if spec.kind == "hf":
        tk = _import_tokenizers("prepare")
        tok = tk.Tokenizer.from_str(spec.json)
        tok.encode_special_tokens = True  # a literal "<|endoftext|>" in a document is text, not an EOS
        _STATE["tok"] = tok


def encode_chunk(chunk: list) -> list:
    """Documents -> ``[(ids or None, draw, error or None)]`` in order. ``ids`` is a little-endian
    array of the document's tokens followed by EOS (just ``[]`` for an empty document)."""
    spec, seed, dtype = _STATE["spec"], _STATE["seed"], _STATE["dtype"]
    out: list = [None] * len(chunk)
    texts, where = [], []
    for i, doc in enumerate(chunk):
        try:
            data, text = read_document(doc, want_text=spec.kind == "hf")
        except DocError as e:
            out[i] = (None, 0.0, str(e))
            continue
        draw = split_draw(data, seed)
        if not data:
            out[i] = (np.zeros(0, dtype), draw, None)
        elif spec.kind == "byte":
            ids = np.empty(len(data) + 1, dtype)
            ids[:-1] = np.frombuffer(data, np.uint8)
            ids[-1] = spec.eos_id
            out[i] = (ids, draw, None)
        else:
            texts.append(text)
            where.append((i, draw))
    if texts:
        for (i, draw), enc in zip(where, _STATE["tok"].encode_batch(texts, add_special_tokens=False)):
            if not enc.ids:  # e.g. only whitespace under a word-level tokenizer: an empty document
                out[i] = (np.zeros(0, dtype), draw, None)
                continue
            ids = np.empty(len(enc.ids) + 1, dtype)
            ids[:-1] = enc.ids
            ids[-1] = spec.eos_id
            out[i] = (ids, draw, None)
    return out

