"""Document readers for :mod:`dist_attn.data.prepare`: text files, directories, JSON Lines, Parquet.

One *document* is

* a text file: its whole content (read later, by the tokenizer worker, so file reads run in parallel);
* one line of a JSON Lines file (``.jsonl``, ``.ndjson``, ``.jsonl.gz``): the string field ``text_field``;
* one row of a Parquet file (``.parquet``, needs ``pyarrow``): the string column ``text_field``.

A directory stands for every regular, non-hidden file below it, in sorted path order (so the token
file does not depend on the file system's listing order), each read by its extension as above.

Nothing is read whole: JSON Lines are read line by line, Parquet in record batches of 1024 rows, and
only the documents in flight are held in memory. A corrupt line, a bad row or an unreadable file is
passed to ``report(location, message)`` with its location (``path:LINE``, ``path:row N`` or
``path``); the reporter raises (``--on-error fail``) or records it and the reader moves on (``skip``).
"""
from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from dist_attn.checks import fail

JSONL_EXT = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
PARQUET_EXT = (".parquet",)
PARQUET_BATCH_ROWS = 1024

Reporter = Callable[[str, str], None]
"""``report(location, message)``: raises :class:`InputError` to stop, returns to skip the bad item."""


class InputError(ValueError):
    """A corrupt or unreadable input under ``--on-error fail``; the message names its location."""


@dataclass(frozen=True)
class Doc:
    """One input document: inline ``text`` (JSONL / Parquet) or a ``path`` whose whole content it is."""
    location: str
    text: Optional[str] = None
    path: Optional[str] = None

    def size_hint(self) -> int:
        """Bytes, roughly (to cut work into chunks of similar size)."""
        if self.text is not None:
            return len(self.text)
        try:
            return os.path.getsize(self.path)
        except OSError:
            return 0


def kind_of(path: str) -> str:
    """``"jsonl" | "parquet" | "text"`` by the file name."""
    low = path.lower()
    if low.endswith(JSONL_EXT):
        return "jsonl"
    if low.endswith(PARQUET_EXT):
        return "parquet"
    return "text"


def expand_inputs(inputs: list) -> list:
    """The ``--input`` paths -> a list of files, directories walked recursively in sorted order.

    A path that does not exist is a mistake in the command, not a corrupt input: it always raises."""
    if not inputs:
        fail("prepare --input", "at least one file or directory", repr(inputs), "pass --input PATH [PATH ...]")
    files = []
    for p in map(os.fspath, inputs):
        if os.path.isdir(p):
            found = []
            for root, dirs, names in os.walk(p):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                found += [os.path.join(root, n) for n in names if not n.startswith(".")]
            files += sorted(f for f in found if os.path.isfile(f))
        elif os.path.exists(p):
            files.append(p)
        else:
            fail("prepare --input", "existing files or directories", repr(p), "check the path")
    if not files:
        fail("prepare --input", "at least one file (the directories given are empty)", repr(inputs),
             "point --input at the corpus files")
    return files


def iter_documents(files: list, text_field: str, report: Reporter) -> Iterator[Doc]:
    """Every document of ``files`` (from :func:`expand_inputs`), in order."""
    for path in files:
        kind = kind_of(path)
        if kind == "text":
            yield Doc(location=path, path=path)
        elif kind == "jsonl":
            yield from _jsonl(path, text_field, report)
        else:
            yield from _parquet(path, text_field, report)


def _jsonl(path: str, field: str, report: Reporter) -> Iterator[Doc]:
    opener = gzip.open if path.lower().endswith(".gz") else open
    try:
        f = opener(path, "rb")
    except OSError as e:
        report(path, f"cannot open: {e}")
        return
    lineno = 0
    with f:
        while True:
            try:
                raw = f.readline()
            except (OSError, EOFError) as e:  # e.g. a truncated gzip stream
                report(f"{path}:{lineno + 1}", f"cannot read: {e}")
                return
            if not raw:
                return
            lineno += 1
            loc = f"{path}:{lineno}"
            if not raw.strip():
                continue  # blank lines carry no document
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                report(loc, f"not a JSON line ({e})")
                continue
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                report(loc, f"no string field {field!r} (a {type(record).__name__} with "
                            f"{type(text).__name__ if text is not None else 'no such field'}); set --text-field")
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # JSON allows lone surrogates ("\ud800"); no tokenizer does
                report(loc, f"invalid Unicode in field {field!r} ({e})")
                continue
            yield Doc(location=loc, text=text)


def _parquet(path: str, field: str, report: Reporter) -> Iterator[Doc]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        fail("prepare --input", "the `pyarrow` package to read Parquet", f"{path} and no pyarrow",
             "pip install 'dist-attn[data]' (or pyarrow), or convert the file to JSON Lines")
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
        report(path, f"not a readable Parquet file: {e}")
        return
    if field not in names:
        report(path, f"no column {field!r} (columns: {names}); set --text-field")
        return
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
            for text in batch.column(0).to_pylist():
                loc = f"{path}:row {row}"
                row += 1
                if not isinstance(text, str):
                    report(loc, f"column {field!r} holds {type(text).__name__}, not a string")
                    continue
                yield Doc(location=loc, text=text)
    except InputError:
        raise  # the reporter's own --on-error fail, from inside the loop
    except Exception as e:  # noqa: BLE001 - a corrupt page surfaces while iterating
        report(f"{path}:row {row}", f"cannot read: {e}")
