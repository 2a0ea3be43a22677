"""Test-wide setup. Triton kernels run in the CPU interpreter when no GPU is present; the
variable must be set before triton is first imported, which is why it lives here. Thread counts are
pinned before torch is imported: spawned gloo workers and the main process share 2 cores.

Tiers. Every test gets exactly one marker, assigned here (test files carry none):

* ``unit``        -- one process, small shapes: the everyday command ``pytest -m unit`` (about a minute);
* ``interpreter`` -- Triton kernels in the CPU interpreter (slow without a GPU);
* ``distributed`` -- spawns gloo processes (``tests.dist.run_distributed``) or runs the trainer;
* ``system``      -- launchers, torchrun, network namespaces, Slurm, wheels, fault injection.

A test's tier comes from :data:`TIERS` (``"module"`` or ``"module::test"``) if listed, else from what
its code (the test function, its fixtures and the test helpers they call, two levels deep) uses:
a subprocess or torchrun -> system, ``run_distributed`` / ``Trainer(`` -> distributed, ``triton`` ->
interpreter, otherwise unit. The full suite (``pytest``, the README's CI command) runs every tier.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import inspect  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402

TIER_NAMES = ("unit", "interpreter", "distributed", "system")
TIERS = {
    "test_faults": "system",
    "test_multinode": "system",
    "test_slurm": "system",
    "test_packaging": "system",
    "test_gpu_check": "system",
    "test_flash_attn": "interpreter",
    "test_lightning_triton": "interpreter",
    "test_train::test_torchrun_launcher_end_to_end": "system",
    "test_config::test_launcher_reports_config_errors_plainly": "system",
}
_RULES = (  # first match wins
    ("system", re.compile(r"\bsubprocess\.|torchrun|torch\.distributed\.run|\bsbatch\b")),
    ("distributed", re.compile(r"\brun_distributed\b|\bmp\.spawn\b|\bTrainer\(")),
    ("interpreter", re.compile(r"triton", re.IGNORECASE)),
)
_CALL = re.compile(r"\b([A-Za-z_]\w*)\s*\(")


def _source(obj) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def _code_of(item) -> str:
    """The test function's source, its fixtures', and that of module-level functions they call."""
    fn = getattr(item, "function", None)
    if fn is None:
        return ""
    module = inspect.getmodule(fn)
    todo = [fn] + [d.func for defs in getattr(item, "_fixtureinfo").name2fixturedefs.values() for d in defs]
    seen, parts = set(), []
    for _depth in range(3):  # the test, then what it calls, then what those call
        nxt = []
        for f in todo:
            if id(f) in seen:
                continue
            seen.add(id(f))
            src = _source(f)
            parts.append(src)
            for name in _CALL.findall(src):
                g = getattr(module, name, None)
                g = inspect.unwrap(g) if callable(g) and hasattr(g, "__wrapped__") else g  # lru_cache etc.
                if inspect.isfunction(g) and (g.__module__ or "").startswith("tests."):  # ours, not a library's
                    nxt.append(g)
        todo = nxt
    return "\n".join(parts)


def tier_of(item) -> str:
    module = item.module.__name__.rsplit(".", 1)[-1] if getattr(item, "module", None) else ""
    name = getattr(item, "originalname", None) or item.name
    for key in (f"{module}::{name}", module):
        if key in TIERS:
            return TIERS[key]
    code = _code_of(item)
    for tier, pattern in _RULES:
        if pattern.search(code):
            return tier
    return "unit"


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(getattr(pytest.mark, tier_of(item)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
