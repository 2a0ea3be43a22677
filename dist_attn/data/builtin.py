"""A real-text corpus that every Python installation carries: the docstrings of the standard library.

    path = builtin_token_file("pydocs", out_dir)   # token file (byte level, EOS 256) + PATH.val, built once

``data.path=builtin:pydocs`` (the ``data=pydocs`` config) lets the main job train on packed documents of
real English text without downloading or preparing anything: the module, class and function docstrings
(at least 64 characters) of the ``.py`` files under the interpreter's standard library, read with
``ast`` (nothing is imported or executed), in sorted file order, capped at :data:`MAX_CHARS`
characters. Each docstring is one document: lengths are long-tailed (one-line summaries to module
essays), which is what packing is for. :func:`dist_attn.data.prepare.prepare` tokenises them (byte
level) with 5 % of the documents held out for validation.

The file is deterministic for a given Python version and written once per output directory; on a
machine, only the launcher's LOCAL_RANK 0 builds it and the other local ranks wait for its meta file
(no process group exists yet when the configuration is resolved).
"""
from __future__ import annotations

import ast
import json
import os
import sysconfig
import tempfile
import time

from dist_attn.checks import fail

PREFIX = "builtin:"
CORPORA = ("pydocs",)
MAX_CHARS = 4_000_000
MIN_CHARS = 64


def _docstrings(limit: int | None = None):
    """Docstrings of the standard library's .py files (sorted walk, no tests/ or site-packages)."""
    limit = MAX_CHARS if limit is None else limit
    root = sysconfig.get_paths()["stdlib"]
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "idle_test",
                                                              "__pycache__"))
        for name in sorted(f for f in filenames if f.endswith(".py")):
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= MIN_CHARS:
                        yield doc
                        total += len(doc)
                        if total >= limit:
                            return


def builtin_token_file(name: str, out_dir: str, timeout_s: float = 600.0) -> str:
    """The token file of built-in corpus ``name`` under ``out_dir/data/`` (built on first use)."""
    if name not in CORPORA:
        fail("data.path", f"{PREFIX}<one of {CORPORA}> or a token file", PREFIX + name,
             "use data.path=builtin:pydocs (or data=pydocs), or prepare your own text")
    path = os.path.join(os.path.abspath(out_dir), "data", f"{name}.bin")
    meta = path + ".json"
    if os.path.exists(meta):
        return path
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:  # the node's first process builds it
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(meta):
            if time.monotonic() > deadline:
                fail("data.path", f"{path} built by LOCAL_RANK 0 within {timeout_s:.0f} s", "no file",
                     "check that LOCAL_RANK 0 runs and can write trainer.out_dir")
            time.sleep(0.2)
        return path
    from dist_attn.data.prepare import prepare
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, f"{name}.jsonl")
        with open(src, "w") as f:
            for doc in _docstrings():
                f.write(json.dumps({"text": doc}) + "\n")
        prepare([src], path, val_fraction=0.05, seed=0)  # atomic: the meta appears with the complete file
    return path
