"""Tokenise a corpus into one token file for :class:`dist_attn.data.memmap.TokenDataset`.

    python -m dist_attn.data.prepare --input corpus/ --output data/train.bin              # bytes, EOS = 256
    python -m dist_attn.data.prepare --input docs.jsonl --text-field body --output data/t.bin --tokenizer tok.json
    python -m dist_attn.data.prepare --input corpus/ shard-*.parquet --output data/t.bin \\
        --train-tokenizer 8192 --val-fraction 0.01 --workers 8 --on-error skip

Inputs (see :mod:`dist_attn.data.sources`): text files (one document each), directories (recursively),
JSON Lines (``--text-field``, default ``text``) and Parquet (needs ``pyarrow``: ``pip install
'dist-attn[data]'``). Tokenizers (see :mod:`dist_attn.data.tokenize`): byte level by default (vocab 257,
EOS 256, nothing to install), ``--tokenizer PATH/tokenizer.json`` (local, never downloaded), or
``--train-tokenizer VOCAB``: a byte-level BPE trained on the training documents, saved as
``OUTPUT.tokenizer.json``. Documents are tokenised by ``--workers`` processes, in order: the output
does not depend on the worker count.

Outputs (``OUTPUT`` = ``--output``):

* ``OUTPUT``: raw little-endian token ids (uint16 if the vocabulary fits, else uint32), no header,
  ``doc_1 EOS doc_2 EOS ... doc_n EOS`` (empty documents are dropped).
* ``OUTPUT.json``: meta data: ``format``, ``split``, ``dtype``, ``num_tokens`` (EOS included),
  ``num_documents``, ``vocab_size``, ``eos_id``, ``eos_token``, ``tokenizer`` (``"byte"`` or the path of
  the tokenizer.json), ``tokenizer_kind``, ``inputs``, ``text_field``, ``val_fraction``, ``split_seed``,
  ``val_path``, ``train_path``, ``num_skipped`` and ``skipped`` (the first 100 bad inputs), ``num_empty``.
* with ``--val-fraction F``: ``OUTPUT.val`` and ``OUTPUT.val.json`` (same format, ``split: "val"``): the
  held-out documents, each chosen with probability F by a hash of its content and ``--seed``, never in
  ``OUTPUT``. Without it, a stale ``OUTPUT.val`` from an earlier run is removed.

Large corpora are streamed: memory holds about ``2 x workers`` chunks of documents (~1 MB each, or
one document if larger). A corrupt JSON line, a bad Parquet row or an unreadable file is reported with
its location and, with ``--on-error skip``, skipped (listed in the meta); ``fail`` (default) stops.
Every file is written under a temporary name, fsync'ed and renamed into place only when all of them
are complete; on any error or Ctrl-C the temporary files are removed and earlier outputs are untouched.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Iterator, Optional

from dist_attn.checks import fail
from dist_attn.data.memmap import META_SUFFIX, TOKENIZER_SUFFIX, val_path_for
from dist_attn.data.sources import InputError, expand_inputs, iter_documents
from dist_attn.data.tokenize import (EOS_TOKEN, DocError, byte_spec, encode_chunk, init_worker, load_spec,
                                     read_document, spec_from_tokenizer, split_draw, train_bpe)

FORMAT = "dist_attn.tokens/2"
CHUNK_DOCS, CHUNK_BYTES = 256, 1 << 20  # a unit of work sent to a worker
MAX_LISTED = 100  # skipped inputs listed in the meta


class _AtomicFile:
    """Written as ``FINAL.tmp-PID``; :meth:`commit` renames it to ``FINAL`` (after :meth:`sync`)."""

    def __init__(self, final: str):
        self.final, self.tmp = final, f"{final}.tmp-{os.getpid()}"
        self.f = open(self.tmp, "wb")

    def write(self, data: bytes) -> None:
        self.f.write(data)

    def sync(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()

    def commit(self) -> None:
        os.replace(self.tmp, self.final)

    def discard(self) -> None:
        self.f.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


class _Reporter:
    """``--on-error``: ``fail`` raises :class:`InputError`; ``skip`` warns on stderr and keeps a list."""

    def __init__(self, mode: str, quiet: bool = False):
        self.mode, self.quiet, self.count, self.listed = mode, quiet, 0, []

    def __call__(self, location: str, message: str) -> None:
        if self.mode == "fail":
            raise InputError(f"prepare input {location}: expected a readable document, got {message}. "
                             f"Fix: repair or remove it, or pass --on-error skip")
        self.count += 1
        if len(self.listed) < MAX_LISTED:
            self.listed.append(f"{location}: {message}")
        if not self.quiet:
            from tqdm import tqdm
            tqdm.write(f"warning: skipped {location}: {message}", file=sys.stderr)


def _chunks(docs) -> Iterator[list]:
    chunk, size = [], 0
    for doc in docs:
        chunk.append(doc)
        size += doc.size_hint()
        if len(chunk) >= CHUNK_DOCS or size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encoded(chunks, spec, seed: int, workers: int) -> Iterator[tuple]:
    """``(chunk, results)`` in input order; at most ``2 * workers`` chunks in flight."""
    if workers == 1:
        init_worker(spec, seed)
        for chunk in chunks:
            yield chunk, encode_chunk(chunk)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    ex = ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker, initargs=(spec, seed))
    try:
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, ex.submit(encode_chunk, chunk)))
            if len(pending) >= 2 * workers:
                c, fut = pending.popleft()
                yield c, fut.result()
        while pending:
            c, fut = pending.popleft()
            yield c, fut.result()
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def _training_texts(files, text_field, report, seed, val_fraction, bar) -> Iterator[str]:
    """Pass 1 of ``--train-tokenizer``: the training documents' text (held-out ones excluded)."""
    quiet = _Reporter(report.mode, quiet=True)  # pass 2 reports skipped inputs once
    for doc in iter_documents(files, text_field, quiet):
        try:
            data, text = read_document(doc, want_text=True)
        except DocError as e:
            quiet(doc.location, str(e))
            continue
        bar.update(1)
        if not (val_fraction > 0 and split_draw(data, seed) < val_fraction):
            yield text


def _check_args(output, workers, on_error, val_fraction, train_tokenizer, tokenizer, eos_token):
    out_dir = os.path.dirname(os.path.abspath(output))
    if os.path.isdir(output) or not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
        fail("prepare --output", "a file path in an existing writable directory", repr(output),
             f"create {out_dir} first or choose another --output")
    if not isinstance(workers, int) or workers < 1:
        fail("prepare --workers", "an int >= 1", repr(workers), "pass e.g. --workers 4")
    if on_error not in ("fail", "skip"):
        fail("prepare --on-error", "'fail' or 'skip'", repr(on_error), "choose one")
    if not 0.0 <= val_fraction < 1.0:
        fail("prepare --val-fraction", "a fraction in [0, 1)", repr(val_fraction), "pass e.g. 0.01")
    if train_tokenizer is not None and tokenizer not in (None, "byte"):
        fail("prepare", "either --tokenizer or --train-tokenizer", "both", "drop one of them")
    if eos_token is not None and tokenizer in (None, "byte"):
        fail("prepare --eos-token", "a --tokenizer tokenizer.json to look it up in",
             "the byte level or a trained tokenizer (their EOS is fixed)", "drop --eos-token")


def prepare(inputs: list, output: str, tokenizer: Optional[str] = None, *, train_tokenizer: Optional[int] = None,
            eos_token: Optional[str] = None, text_field: str = "text", workers: int = 1, on_error: str = "fail",
            val_fraction: float = 0.0, seed: int = 0, progress: bool = False) -> dict:
    """Tokenise ``inputs`` into ``output`` (+ ``.json``, ``.val``, ``.tokenizer.json``); returns the
    training meta dict. ``tokenizer``: None or ``"byte"`` for bytes, else a tokenizer.json path."""
    from tqdm import tqdm

    output = os.fspath(output)
    _check_args(output, workers, on_error, val_fraction, train_tokenizer, tokenizer, eos_token)
    own = os.path.abspath(output)  # never read our own outputs back (an --input directory holding them)
    files = [f for f in expand_inputs(inputs) if not (os.path.abspath(f) + ".").startswith(own + ".")]
    if not files:
        fail("prepare --input", "inputs other than the outputs", repr(inputs), "point --input at the corpus")
    report = _Reporter(on_error, quiet=not progress)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # our workers are the parallelism
    val_path = val_path_for(output) if val_fraction > 0 else None
    written: list = []

    def new_bar(desc):
        return tqdm(desc=desc, unit="doc", file=sys.stderr, disable=not progress, dynamic_ncols=True)

    bar = None
    try:
        if train_tokenizer is not None:
            bar = new_bar("read for the tokenizer")
            tok = train_bpe(_training_texts(files, text_field, report, seed, val_fraction, bar), train_tokenizer)
            tok_path = output + TOKENIZER_SUFFIX
            spec = spec_from_tokenizer(tok, os.path.abspath(tok_path), EOS_TOKEN)
            written.append(_AtomicFile(tok_path))
            written[-1].write(spec.json.encode())
        elif tokenizer not in (None, "byte"):
            spec = load_spec(tokenizer, eos_token)
        else:
            spec = byte_spec()
        train = _AtomicFile(output)
        written.append(train)
        val = _AtomicFile(val_path) if val_path else None
        written += [val] if val else []
        stats = {"train": [0, 0], "val": [0, 0]}  # documents, tokens
        empty = 0
        if bar is not None:
            bar.close()
        bar = new_bar("tokenize")
        docs = iter_documents(files, text_field, report)
        for chunk, results in _encoded(_chunks(docs), spec, seed, workers):
            for doc, (ids, draw, err) in zip(chunk, results):
                if err is not None:
                    report(doc.location, err)
                elif ids.size == 0:
                    empty += 1
                else:
                    side = "val" if val is not None and draw < val_fraction else "train"
                    (val if side == "val" else train).write(ids.tobytes())
                    stats[side][0] += 1
                    stats[side][1] += ids.size
            bar.update(len(chunk))
            bar.set_postfix(tokens=stats["train"][1] + stats["val"][1], refresh=False)
        bar.close()
        if stats["train"][0] == 0:
            fail("prepare", "at least one non-empty training document", f"none in {inputs}",
                 "check --input, --text-field and --on-error (or lower --val-fraction)")
        if val is not None and stats["val"][0] == 0:
            fail("prepare --val-fraction", f"at least one held-out document of {stats['train'][0]}",
                 f"none at {val_fraction}", "raise --val-fraction (or change --seed)")
        base = {"format": FORMAT, "dtype": spec.dtype, "vocab_size": spec.vocab_size, "eos_id": spec.eos_id,
                "eos_token": spec.eos_token, "tokenizer": spec.name, "tokenizer_kind": spec.kind,
                "inputs": [os.path.abspath(p) for p in inputs], "text_field": text_field,
                "val_fraction": val_fraction, "split_seed": seed, "train_path": os.path.abspath(output),
                "val_path": os.path.abspath(val_path) if val_path else None,
                "num_skipped": report.count, "skipped": report.listed, "num_empty": empty}
        metas = {}
        for side, path in (("train", output), ("val", val_path)):
            if path is None:
                continue
            metas[side] = dict(base, split=side, num_documents=stats[side][0], num_tokens=stats[side][1])
            written.append(_AtomicFile(path + META_SUFFIX))
            written[-1].write(json.dumps(metas[side], indent=1).encode())
        for w in written:  # everything complete and on disk before the first rename
            w.sync()
        for w in written:  # tokenizer, train tokens, val tokens, metas: a meta never precedes its tokens
            w.commit()
        if val_path is None:  # a stale held-out file would overlap this training file
            for stale in (val_path_for(output), val_path_for(output) + META_SUFFIX):
                if os.path.exists(stale):
                    os.remove(stale)
        _fsync_dir(os.path.dirname(os.path.abspath(output)))
        return metas["train"]
    except BaseException:
        if bar is not None:
            bar.close()
        for w in written:
            w.discard()
        raise


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dist_attn.data.prepare", description=__doc__.split("\n")[0],
                                 epilog="Formats and guarantees: see the module docstring (dist_attn/data/prepare.py).")
    ap.add_argument("--input", nargs="+", required=True, help="text files, directories, .jsonl[.gz], .parquet")
    ap.add_argument("--output", required=True, help="token file to write (meta: OUTPUT.json)")
    tk = ap.add_mutually_exclusive_group()
    tk.add_argument("--tokenizer", default=None, help="local tokenizer.json (default: byte level, EOS 256)")
    tk.add_argument("--train-tokenizer", type=int, metavar="VOCAB",
                    help="train a byte-level BPE of VOCAB ids on the corpus; saved as OUTPUT.tokenizer.json")
    ap.add_argument("--eos-token", default=None, help="end-of-document token of --tokenizer (default: auto)")
    ap.add_argument("--text-field", default="text", help="JSON Lines field / Parquet column (default: text)")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="tokenizer processes")
    ap.add_argument("--on-error", choices=("fail", "skip"), default="fail", help="corrupt or unreadable input")
    ap.add_argument("--val-fraction", type=float, default=0.0, help="documents held out into OUTPUT.val")
    ap.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    ap.add_argument("--quiet", action="store_true", help="no progress bar or skip warnings")
    a = ap.parse_args(argv)
    try:
        meta = prepare(a.input, a.output, a.tokenizer, train_tokenizer=a.train_tokenizer, eos_token=a.eos_token,
                       text_field=a.text_field, workers=a.workers, on_error=a.on_error,
                       val_fraction=a.val_fraction, seed=a.seed, progress=not a.quiet)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    print(f"wrote {meta['num_documents']} documents, {meta['num_tokens']} tokens ({meta['dtype']}, vocab "
          f"{meta['vocab_size']}, EOS {meta['eos_id']}) to {a.output}"
          + (f"; held out {meta['val_path']}" if meta["val_path"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
