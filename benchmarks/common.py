"""Helpers shared by the benchmarks: process launching, timing, result files.

A benchmark runs either under torchrun (``WORLD_SIZE`` set: NCCL on GPUs, gloo on CPU) or spawns its
own gloo CPU processes (``--nproc N``), so the same command works on a laptop and on a GPU node.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _spawned(rank, world_size, fn, *args):
    return fn(rank, world_size, torch.device("cpu"), *args)


def launch(fn, nproc: int, *args):
    """Run ``fn(rank, world_size, device, *args)`` on every rank; returns rank 0's result."""
    if "WORLD_SIZE" in os.environ:  # under torchrun
        use_cuda = torch.cuda.is_available()
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=10))
        rank = dist.get_rank()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        try:
            return fn(rank, dist.get_world_size(), device, *args)
        finally:
            dist.destroy_process_group()
    # spawned gloo CPU processes through the repository's one harness (tests/dist.py): rendezvous,
    # result collection and dead-child detection; a rank's error is raised here with its traceback
    from tests.dist import run_distributed
    return run_distributed(_spawned, nproc, fn, *args, timeout=None, pg_timeout=600.0,
                           threads=max(1, (os.cpu_count() or 1) // nproc))[0]


def timed(fn, device, warmup: int = 1, iters: int = 3) -> float:
    """Median wall time of ``fn()`` in seconds (CUDA-synchronised, barrier-aligned across ranks)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if dist.is_initialized():
            dist.barrier()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_results(name: str, rows: list[dict], columns: list[str], meta: dict, out_dir: str) -> tuple[str, str]:
    """Write ``<name>.json`` and ``<name>.md`` (a table with ``columns``) under ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    jpath, mpath = os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.md")
    with open(jpath, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"# {name}", "", *(f"- {k}: {v}" for k, v in meta.items()), "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    with open(mpath, "w") as f:
        f.write("\n".join(lines) + "\n")
    return jpath, mpath


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "" if x is None else str(x)
