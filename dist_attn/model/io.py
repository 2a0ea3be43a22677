"""Model files: a :class:`~dist_attn.model.hybrid.HybridLM` as a directory any process can load, without a
training engine, a process group or context parallelism.

    model.save_pretrained("out/model", tokenizer="byte")        # or a tokenizer.json path, or None
    model = HybridLM.from_pretrained("out/model", device="cpu", dtype=torch.float32)
    tok = load_tokenizer("out/model")                           # encode(text) -> ids, decode(ids) -> text

Directory layout::

    config.json         {"format": "dist_attn.hybridlm", "format_version": 1, "model": {ModelConfig fields},
                         "dtype": "float32", "tokenizer": {"kind": "byte", "vocab_size": 257, "eos_id": 256}
                                                        | {"kind": "hf", "file": "tokenizer.json", "eos_id": ...}
                                                        | null}
    model.safetensors   the HybridLM state dict (``safetensors`` format); with ``tie_embeddings`` the
                        shared matrix is stored once, as ``embed.tok.weight``
    tokenizer.json      a copy of the Hugging Face tokenizer (``kind: hf`` only)

Files are written under temporary names and renamed, weights before ``config.json``, so a directory
whose ``config.json`` exists is complete. Non-persistent buffers (the linear layers' decay schedule)
are functions of the config and rebuilt by the constructor.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, fields
from typing import Optional, Union

import torch

from dist_attn.checks import fail
from dist_attn.model.config import ModelConfig

FORMAT = "dist_attn.hybridlm"
FORMAT_VERSION = 1
CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_NAME = "config.json", "model.safetensors", "tokenizer.json"
BYTE_VOCAB, BYTE_EOS = 257, 256  # dist_attn.data.tokenize: bytes 0..255 + EOS
TIED_KEY, TIED_SOURCE = "head.out.weight", "embed.tok.weight"

__all__ = ["save_pretrained", "from_pretrained", "read_config", "save_state_dict", "tokenizer_info",
           "load_tokenizer", "ByteTokenizer", "FORMAT_VERSION"]


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError:  # pragma: no cover - a runtime dependency, see pyproject.toml
        fail("dist_attn.model.io", "the safetensors package", "not installed", "pip install safetensors")
    return st


def _write_atomic(path: str, write) -> None:
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}")
    write(tmp)
    os.replace(tmp, path)


def tokenizer_info(tokenizer) -> Optional[dict]:
    """Normalise a tokenizer description for ``config.json``.

    ``None`` (unknown), ``"byte"`` (the byte-level default: vocab 257, EOS 256), a path to a
    ``tokenizer.json``, a token file's meta data dict (``OUTPUT.json`` of ``dist_attn.data.prepare``:
    ``tokenizer_kind``, ``tokenizer``, ``eos_id``, ``vocab_size``) or a dict already in this format
    (``kind`` key) -> ``None`` or a dict (``source`` = the tokenizer.json to copy, for ``hf``)."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, str) and tokenizer == "byte":
        return {"kind": "byte", "vocab_size": BYTE_VOCAB, "eos_id": BYTE_EOS}
    if isinstance(tokenizer, (str, os.PathLike)):
        path = os.fspath(tokenizer)
        if not os.path.isfile(path):
            fail("save_pretrained(tokenizer=...)", "'byte', None or the path of a tokenizer.json", repr(path),
                 "pass the tokenizer.json the data was prepared with (OUTPUT.tokenizer.json for --train-tokenizer)")
        return {"kind": "hf", "source": os.path.abspath(path), "eos_id": None}
    if isinstance(tokenizer, dict) and "kind" in tokenizer:
        return dict(tokenizer)
    if isinstance(tokenizer, dict) and "tokenizer_kind" in tokenizer:  # a token file's meta data
        if tokenizer["tokenizer_kind"] == "byte":
            return {"kind": "byte", "vocab_size": int(tokenizer.get("vocab_size", BYTE_VOCAB)),
                    "eos_id": int(tokenizer.get("eos_id", BYTE_EOS))}
        return {"kind": "hf", "source": tokenizer["tokenizer"], "eos_id": tokenizer.get("eos_id"),
                "eos_token": tokenizer.get("eos_token"), "vocab_size": tokenizer.get("vocab_size")}
    fail("save_pretrained(tokenizer=...)", "None, 'byte', a tokenizer.json path or a token file's meta dict",
         type(tokenizer).__name__, "pass one of those")


def save_state_dict(directory: str, state_dict: dict, cfg: ModelConfig, *, tokenizer=None,
                    dtype: Optional[torch.dtype] = None, source: Optional[dict] = None) -> str:
    """Write a HybridLM ``state_dict`` of ``cfg`` as a model directory (see the module docstring); the
    export path uses it without building a model. ``dtype``: cast floating tensors (None: keep);
    ``source``: recorded in config.json (e.g. the checkpoint and step an export came from)."""
    cfg.validate()
    info = tokenizer_info(tokenizer)
    os.makedirs(directory, exist_ok=True)
    sd = {}
    for key, t in state_dict.items():
        if cfg.tie_embeddings and key == TIED_KEY:
            continue  # the same matrix as embed.tok.weight: stored once, re-tied on load
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        sd[key] = t.contiguous().clone()
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in sd.values() if t.is_floating_point()})
    st = _safetensors()
    _write_atomic(os.path.join(directory, WEIGHTS_NAME),
                  lambda p: st.save_file(sd, p, metadata={"format": "pt", "dist_attn": FORMAT}))
    if info is not None and info["kind"] == "hf":
        src = info.pop("source", None)
        dst = os.path.join(directory, TOKENIZER_NAME)
        if src is not None and os.path.abspath(src) != os.path.abspath(dst):
            if not os.path.isfile(src):
                fail("save_pretrained", f"the tokenizer.json recorded for the data at {src!r}", "no such file",
                     "pass tokenizer=PATH explicitly (or 'byte' / None)")
            _write_atomic(dst, lambda p: shutil.copyfile(src, p))
        info["file"] = TOKENIZER_NAME
        if info.get("eos_id") is None:
            info["eos_id"] = _hf_eos_id(dst)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": asdict(cfg),
              "dtype": dtypes[0] if len(dtypes) == 1 else dtypes, "tokenizer": info}
    if source is not None:
        config["source"] = source
    _write_atomic(os.path.join(directory, CONFIG_NAME),
                  lambda p: open(p, "w").write(json.dumps(config, indent=1) + "\n"))
    return directory


def save_pretrained(model, directory: str, *, tokenizer=None, dtype: Optional[torch.dtype] = None) -> str:
    """``model``'s config and weights (gathered nowhere: the model must hold full weights, as
    HybridLM does on every CP rank) into ``directory``. Call it on one rank only."""
    return save_state_dict(directory, model.state_dict(), model.cfg, tokenizer=tokenizer, dtype=dtype)


def read_config(directory: str) -> dict:
    """The checked ``config.json`` of a model directory (with ``model`` as a :class:`ModelConfig`)."""
    where = f"from_pretrained({directory!r})"
    if not os.path.isdir(directory):
        fail(where, "a model directory written by save_pretrained or launchers.export", "no such directory",
             "check the path")
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        fail(where, f"{CONFIG_NAME} in the directory", f"only {sorted(os.listdir(directory))}",
             "point at a directory written by save_pretrained / launchers.export (a half-written one has none)")
    try:
        with open(path) as f:
            config = json.load(f)
    except ValueError as e:
        fail(where, f"valid JSON in {path}", str(e), "re-export the model")
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        fail(where, f"a config.json with format {FORMAT!r}",
             repr(config.get("format")) if isinstance(config, dict) else type(config).__name__,
             "this is not a dist_attn model directory")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        fail(where, f"format_version <= {FORMAT_VERSION}", version, "upgrade dist_attn to read this model")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(config["model"]) - known)
    if unknown:
        fail(where, f"ModelConfig fields {sorted(known)}", f"unknown {unknown}", "upgrade dist_attn")
    config["model"] = ModelConfig(**config["model"])
    return config


def from_pretrained(directory: str, *, device=None, dtype: Optional[torch.dtype] = None, cls=None):
    """Build ``cls`` (HybridLM) from a model directory: no process group, CP off, eval mode.
    ``device``/``dtype``: where and in which dtype (None: CPU, the saved dtype)."""
    if cls is None:
        from dist_attn.model.hybrid import HybridLM as cls
    config = read_config(directory)
    cfg: ModelConfig = config["model"]
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        fail(f"from_pretrained({directory!r})", f"{WEIGHTS_NAME} beside config.json", "no such file",
             "re-export the model (launchers.export) or save it again")
    try:
        sd = _safetensors().load_file(path, device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        fail(f"from_pretrained({directory!r})", f"a readable {WEIGHTS_NAME}", f"{type(e).__name__}: {e}",
             "re-export the model")
    if cfg.tie_embeddings and TIED_KEY not in sd and TIED_SOURCE in sd:
        sd[TIED_KEY] = sd[TIED_SOURCE]
    model = cls(cfg)
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or extra or wrong:
        fail(f"from_pretrained({directory!r})", "weights matching config.json",
             f"missing {missing[:5]}, unexpected {extra[:5]}, wrong shapes {wrong[:5]}",
             "the weights and config.json come from different models: re-export")
    model.load_state_dict(sd, strict=True)  # tied: both keys copy the same values into the shared tensor
    if dtype is not None:
        model.to(dtype=dtype)
    if device is not None:
        model.to(device=device)
    model.eval()
    model.tokenizer_info = config.get("tokenizer")
    return model


# ---------------------------------------------------------------------------- tokenizers

class ByteTokenizer:
    """The byte-level tokenizer of :mod:`dist_attn.data.prepare`: ids 0..255 are UTF-8 bytes, 256 is EOS."""
    kind = "byte"
    eos_id = BYTE_EOS

    def encode(self, text: str) -> list:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer.json (local file)."""
    kind = "hf"

    def __init__(self, path: str, eos_id: Optional[int]):
        import tokenizers
        self.tok, self.eos_id = tokenizers.Tokenizer.from_file(path), eos_id

    def encode(self, text: str) -> list:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        vocab = self.tok.get_vocab_size(with_added_tokens=True)
        return self.tok.decode([i for i in ids if 0 <= i < vocab and i != self.eos_id])


def _hf_eos_id(path: str) -> Optional[int]:
    from dist_attn.data.tokenize import EOS_CANDIDATES
    import tokenizers
    tok = tokenizers.Tokenizer.from_file(path)
    return next((tok.token_to_id(t) for t in EOS_CANDIDATES if tok.token_to_id(t) is not None), None)


def load_tokenizer(directory: str) -> Union[ByteTokenizer, HFTokenizer, None]:
    """The tokenizer recorded in a model directory's config.json, or None when none was recorded."""
    info = read_config(directory).get("tokenizer")
    if info is None:
        return None
    if info["kind"] == "byte":
        return ByteTokenizer()
    path = os.path.join(directory, info.get("file", TOKENIZER_NAME))
    if not os.path.isfile(path):
        fail(f"load_tokenizer({directory!r})", f"the tokenizer file {info.get('file', TOKENIZER_NAME)} "
             "named in config.json", "no such file", "re-export the model with its tokenizer")
    return HFTokenizer(path, info.get("eos_id"))
