"""Tokenise text files into one token file for :class:`dist_attn.data.memmap.TokenDataset`.

    python -m dist_attn.data.prepare --input a.txt b.txt --output data/train.bin
    python -m dist_attn.data.prepare --input corpus/*.txt --output data/train.bin --tokenizer /path/tokenizer.json

``--tokenizer byte`` (default) maps each byte to its id (vocab 256, uint16): no download, no
dependency, any file. A path to a local Hugging Face ``tokenizer.json`` uses the ``tokenizers``
package if it is installed (it is never downloaded); ids are stored as uint16 when the vocabulary
fits, uint32 otherwise. Files are concatenated in the order given, with no separator token.
Writes ``PATH`` (raw ids) and ``PATH.json`` (meta).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from dist_attn.data.memmap import META_SUFFIX

_BLOCK = 1 << 24  # bytes read at a time by the byte tokenizer


def _fail(where: str, expected: str, got, fix: str) -> None:
    raise ValueError(f"{where}: expected {expected}, got {got!r}. Fix: {fix}")


def _load_tokenizer(spec: str):
    """Returns (encode(text) -> list[int] or None for bytes, vocab_size, name)."""
    if spec == "byte":
        return None, 256, "byte"
    if not os.path.isfile(spec):
        _fail("prepare --tokenizer", "'byte' or the path of a local tokenizer.json", spec,
              "pass an existing file (nothing is downloaded) or use --tokenizer byte")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        _fail("prepare --tokenizer", "the `tokenizers` package for a tokenizer.json", "it is not installed",
              "pip install tokenizers, or use --tokenizer byte")
    try:
        tok = Tokenizer.from_file(spec)
    except Exception as e:  # noqa: BLE001 - the library raises its own exception type
        _fail("prepare --tokenizer", "a valid Hugging Face tokenizer.json", f"{spec}: {e}",
              "point at the tokenizer.json file of a tokenizers/transformers model")
    return (lambda text: tok.encode(text).ids), tok.get_vocab_size(), os.path.abspath(spec)


def prepare(inputs: list, output: str, tokenizer: str = "byte") -> dict:
    """Tokenise ``inputs`` into ``output`` and ``output.json``; returns the meta dict."""
    if not inputs:
        _fail("prepare --input", "at least one text file", inputs, "pass --input FILE [FILE ...]")
    for p in inputs:
        if not os.path.isfile(p) or not os.access(p, os.R_OK):
            _fail("prepare --input", "readable files", p, "check the path and its permissions")
    encode, vocab_size, name = _load_tokenizer(tokenizer)
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
        _fail("prepare --output", "a path in an existing writable directory", output,
              f"create {out_dir} first or choose another --output")
    n = 0
    with open(output, "wb") as out:
        for p in inputs:
            if encode is None:  # byte tokenizer: stream the file, one id per byte
                with open(p, "rb") as f:
                    while block := f.read(_BLOCK):
                        ids = np.frombuffer(block, dtype=np.uint8).astype(dtype)
                        out.write(ids.astype("<" + ids.dtype.str[1:]).tobytes())
                        n += ids.size
                continue
            try:
                with open(p, encoding="utf-8") as f:
                    text = f.read()
            except UnicodeDecodeError as e:
                _fail("prepare --input", "UTF-8 text for a tokenizer.json", f"{p}: {e}",
                      "convert the file to UTF-8 or use --tokenizer byte")
            ids = np.asarray(encode(text), dtype=dtype)
            out.write(ids.astype("<" + ids.dtype.str[1:]).tobytes())
            n += ids.size
    meta = {"format": "dist_attn.tokens/1", "dtype": np.dtype(dtype).name, "num_tokens": n,
            "vocab_size": vocab_size, "tokenizer": name, "inputs": [os.path.abspath(p) for p in inputs]}
    with open(output + META_SUFFIX, "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dist_attn.data.prepare", description=__doc__.split("\n")[0])
    ap.add_argument("--input", nargs="+", required=True, help="text files, concatenated in this order")
    ap.add_argument("--output", required=True, help="token file to write (meta goes to OUTPUT.json)")
    ap.add_argument("--tokenizer", default="byte", help="'byte' (default) or a local tokenizer.json")
    args = ap.parse_args(argv)
    try:
        meta = prepare(args.input, args.output, args.tokenizer)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {meta['num_tokens']} tokens ({meta['dtype']}, vocab {meta['vocab_size']}) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
