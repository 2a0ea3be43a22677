"""Helpers shared by the benchmarks: process launching, timing, result files.

A benchmark runs either under torchrun (``WORLD_SIZE`` set: NCCL on GPUs, gloo on CPU) or spawns its
own gloo CPU processes (``--nproc N``), so the same command works on a laptop and on a GPU node.
"""
from __future__ import annotations

import json
import os
import platform
import queue as queue_mod
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _spawned(rank, world_size, init_file, fn, args, out_q):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(minutes=10))
    try:
        res = fn(rank, world_size, torch.device("cpu"), *args)
        out_q.put((rank, res))
    finally:
        dist.destroy_process_group()


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
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_spawned, args=(r, nproc, os.path.join(tmp, "init"), fn, args, q))
                 for r in range(nproc)]
        for p in procs:
            p.start()
        results: dict = {}
        while len(results) < nproc:  # a child that dies without reporting must not hang us
            try:
                rank, res = q.get(timeout=1.0)
                results[rank] = res
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    for p in procs:
                        p.kill()
                    raise RuntimeError(f"benchmark ranks {dead} died (exit codes "
                                       f"{[procs[r].exitcode for r in dead]}); see their output above")
        for p in procs:
            p.join()
    return results[0]


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
