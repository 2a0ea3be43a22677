"""The engine registry: the one module of ``dist_attn`` that names the engine adapters.

    cls = engine_class("megatron")      # imports dist_attn.parallel.megatron, returns MegatronEngine

Each entry is an adapter module under :mod:`dist_attn.parallel` and the class in it implementing
:class:`dist_attn.train.engine.Engine`; the module is imported only when the engine is asked for, so
validating a DeepSpeed config never imports megatron-core and vice versa. A new engine is one entry
here plus its adapter.
"""
from __future__ import annotations

import importlib

ENGINES = {
    "deepspeed": ("dist_attn.parallel.deepspeed", "DeepSpeedEngine"),
    "megatron": ("dist_attn.parallel.megatron", "MegatronEngine"),
}


def engine_class(name: str):
    """The engine class registered as ``name`` (``backend.name`` of the config)."""
    if name not in ENGINES:
        from dist_attn.checks import fail
        fail("backend.name", f"one of {tuple(ENGINES)}", repr(name), "use backend=deepspeed or backend=megatron")
    module, cls = ENGINES[name]
    return getattr(importlib.import_module(module), cls)
